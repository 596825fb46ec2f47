//! Where a Hugging Face tensor name is in a GGUF file: the one table mapping Hugging Face
//! names to llama.cpp's, and the row ranges of tensors llama.cpp's converters fuse (THUDM's
//! `attn_qkv`) or stack (routed experts), read with one positioned read of just those rows.

use std::borrow::Cow;
use std::fs::File;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Shape};

use super::weights::{Renamed, RowRange};
use super::{ModelError, Result};

/// Hugging Face name suffix → GGUF name suffix, for the llama-style families.
const GGUF_NAMES: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    // GLM-4 (`chatglm`, `glm4`): the fused gate/up projection, gate rows first; GLM-4-0414's
    // sandwich norms.
    ("mlp.gate_up_proj", "ffn_up"),
    ("post_self_attn_layernorm", "post_attention_norm"),
    ("post_mlp_layernorm", "post_ffw_norm"),
    // DeepSeek-V2 (`deepseek2`): MLA and the experts' router and shared experts. Routed
    // experts are rows of stacked tensors (see `gguf_locate`).
    ("self_attn.q_a_proj", "attn_q_a"),
    ("self_attn.q_a_layernorm", "attn_q_a_norm"),
    ("self_attn.q_b_proj", "attn_q_b"),
    ("self_attn.kv_a_proj_with_mqa", "attn_kv_a_mqa"),
    ("self_attn.kv_a_layernorm", "attn_kv_a_norm"),
    ("self_attn.kv_b_proj", "attn_kv_b"),
    ("self_attn.k_b_proj", "attn_k_b"),
    ("self_attn.v_b_proj", "attn_v_b"),
    ("mlp.gate", "ffn_gate_inp"),
    ("mlp.shared_experts.gate_proj", "ffn_gate_shexp"),
    ("mlp.shared_experts.up_proj", "ffn_up_shexp"),
    ("mlp.shared_experts.down_proj", "ffn_down_shexp"),
];

/// `model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`.
pub fn gguf_name(hf: &str) -> String {
    let (stem, leaf) = hf.rsplit_once('.').unwrap_or((hf, ""));
    let mapped = if let Some(rest) = stem.strip_prefix("model.layers.") {
        let (layer, module) = rest.split_once('.').unwrap_or((rest, ""));
        let m = GGUF_NAMES
            .iter()
            .find(|(h, _)| *h == module)
            .map_or(module, |(_, g)| g);
        format!("blk.{layer}.{m}")
    } else {
        GGUF_NAMES
            .iter()
            .find(|(h, _)| *h == stem)
            .map_or(stem.to_string(), |(_, g)| g.to_string())
    };
    format!("{mapped}.{leaf}")
}

/// Where the Hugging Face tensor `hf` (of `shape`) is in a GGUF file with tensors `infos`:
/// its [`gguf_name`], or rows of a tensor llama.cpp's converters fuse or stack — q/k/v in
/// `attn_qkv` (THUDM's GLM-4 layout: q rows, then k and v of equal size) and routed expert `e`
/// in `ffn_{gate,up,down}_exps` (`[experts, rows, cols]`).
pub(super) fn gguf_locate(
    infos: &std::collections::HashMap<String, gguf_file::TensorInfo>,
    hf: &str,
    shape: &Shape,
) -> Renamed {
    let name = gguf_name(hf);
    let whole = |name: String| Renamed { name, rows: None };
    if infos.contains_key(&name) {
        return whole(name);
    }
    let stored_rows = |n: &str| {
        infos.get(n).map(|i| match i.shape.dims() {
            [n] => *n,
            d => d.iter().rev().skip(1).product(),
        })
    };
    let len = shape.dims().first().copied().unwrap_or(0);
    let (stem, leaf) = hf.rsplit_once('.').unwrap_or((hf, ""));
    let Some(rest) = stem.strip_prefix("model.layers.") else {
        return whole(name);
    };
    let (layer, module) = rest.split_once('.').unwrap_or((rest, ""));
    let qkv = format!("blk.{layer}.attn_qkv.{leaf}");
    let fused = |offset: usize, of: usize| Renamed {
        name: qkv.clone(),
        rows: Some(RowRange { offset, len, of }),
    };
    if let Some(of) = stored_rows(&qkv) {
        match module {
            "self_attn.q_proj" => return fused(0, of),
            "self_attn.k_proj" => return fused(of.saturating_sub(2 * len), of),
            "self_attn.v_proj" => return fused(of.saturating_sub(len), of),
            _ => {}
        }
    }
    if let Some(expert) = module.strip_prefix("mlp.experts.") {
        if let Some((e, proj)) = expert.split_once('.') {
            let kind = proj.strip_suffix("_proj").unwrap_or(proj);
            let stacked = format!("blk.{layer}.ffn_{kind}_exps.{leaf}");
            if let (Ok(e), Some(of)) = (e.parse::<usize>(), stored_rows(&stacked)) {
                return Renamed {
                    name: stacked,
                    rows: Some(RowRange {
                        offset: e * len,
                        len,
                        of,
                    }),
                };
            }
        }
    }
    whole(name)
}

/// Rows `r` of GGUF tensor `name` (its leading dimensions flattened), reading only their bytes.
pub(super) fn read_gguf_rows(
    content: &gguf_file::Content,
    file: &File,
    name: &str,
    r: RowRange,
    device: &Device,
) -> Result<QTensor> {
    use std::os::unix::fs::FileExt;
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| ModelError::MissingWeight(name.to_string()))?;
    let dims = info.shape.dims();
    // A vector (a fused bias) is a column of rows.
    let vector = dims.len() == 1;
    let (rows, cols) = match dims {
        [n] => (*n, 1),
        _ => (
            dims.iter().rev().skip(1).product(),
            dims.last().copied().unwrap_or(0),
        ),
    };
    if rows != r.of || r.offset + r.len > rows {
        return Err(ModelError::WeightShape {
            name: name.to_string(),
            expected: vec![r.of, cols],
            found: dims.to_vec(),
        });
    }
    let dtype = info.ggml_dtype;
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let mut bytes = vec![0u8; r.len * row_bytes];
    let at = content.tensor_data_offset + info.offset + (r.offset * row_bytes) as u64;
    file.read_exact_at(&mut bytes, at)?;
    let storage = candle_core::quantized::QStorage::from_data(Cow::Owned(bytes), device, dtype)?;
    if vector {
        Ok(QTensor::new(storage, r.len)?)
    } else {
        Ok(QTensor::new(storage, (r.len, cols))?)
    }
}
