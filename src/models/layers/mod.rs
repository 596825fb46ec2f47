//! Building blocks shared by the model families: linear layers that are dense or quantized,
//! embeddings, RMSNorm, rotary embeddings and paged attention.

pub mod attention;
pub mod linear;
pub mod rope;

pub use attention::{paged_attention, AttnDims};
pub use linear::{Embedding, Linear, RmsNorm};
pub use rope::{RopeScaling, RopeStyle, RotaryEmbedding};
