//! Building blocks shared by the model families: linear layers that are dense or quantized,
//! embeddings, RMSNorm, the gated MLP, mixture of experts, rotary embeddings and paged attention
//! (a CPU kernel over host blocks, and a tensor path for device caches), and inferd's CPU
//! kernels for quantized weights (`qtiles`) and bf16 weights (`bf16`).

pub mod attention;
pub mod bf16;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod paged;
pub mod paged_tensor;
pub mod pool;
pub mod qtiles;
pub mod rope;
pub mod simd;
pub mod swiglu;
pub mod trunk;

pub use attention::{paged_attention, AttnDims};
pub use linear::{Embedding, Linear, Projections, RmsNorm};
pub use mlp::{GateUpLayout, GatedMlp};
pub use moe::{Moe, MoeDims, Routing, TopkMethod};
pub use paged::{paged_attend, CachePath};
pub use paged_tensor::TensorAttnPlan;
pub use rope::{HfRope, RopeRows, RopeScaling, RopeStyle, RopeTables, RotaryEmbedding};
pub use trunk::{Pass, Trunk, TrunkDims};
