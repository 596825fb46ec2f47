//! Rotary position embeddings, applied in place to flat `[tokens, heads, head_dim]` rows at
//! each token's own position (positions differ per token in a continuous batch). Host rows are
//! rotated by [`RotaryEmbedding::apply`]; device tensors by [`RopeTables::apply`] with candle's
//! rope kernels (each token as its own batch entry, so each gets its own position).

use candle_core::{DType, Device, Tensor};

/// How rotary dimensions are paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// GPT-NeoX / Hugging Face: dimension `i` pairs with `i + rotary_dim / 2`.
    Neox,
    /// Original Llama / GGUF `llama` (Q/K rows permuted at conversion): `2i` pairs with `2i + 1`.
    Interleaved,
}

/// How the base frequencies are rescaled for long contexts.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RopeScaling {
    #[default]
    None,
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN (DeepSeek-V2): frequencies blended between interpolated (`/ factor`) and original
    /// by a linear ramp over the dimensions; cos/sin scaled by an attention factor.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        /// `attention_factor` if given, else from `mscale` / `mscale_all_dim`.
        attention_factor: f64,
        /// DeepSeek's softmax scale multiplier (`mscale(factor, mscale_all_dim)^2`; 1 without
        /// `mscale_all_dim`).
        softmax_scale_factor: f64,
        truncate: bool,
    },
}

/// The rotary keys of a Hugging Face `config.json`, in both forms: the hub's top-level
/// `rope_theta` / `rope_scaling` / `partial_rotary_factor`, and transformers 5's
/// `rope_parameters` holding all three. Family configs `#[serde(flatten)]` it, so every family
/// reads them one way.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct HfRope {
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    partial_rotary_factor: Option<f64>,
}

impl HfRope {
    fn parameter(&self, key: &str) -> Option<f64> {
        self.rope_parameters.as_ref()?.get(key)?.as_f64()
    }

    /// The base; `default` when the config names none.
    pub fn theta(&self, default: f64) -> f64 {
        self.rope_theta
            .or_else(|| self.parameter("rope_theta"))
            .unwrap_or(default)
    }

    /// The context-extension scaling (`rope_scaling`, else `rope_parameters`).
    pub fn scaling(&self) -> Result<RopeScaling, String> {
        RopeScaling::from_hf(self.rope_scaling.as_ref().or(self.rope_parameters.as_ref()))
    }

    /// The fraction of each head that rotates; `default` when the config names none.
    pub fn partial_rotary_factor(&self, default: f64) -> f64 {
        self.partial_rotary_factor
            .or_else(|| self.parameter("partial_rotary_factor"))
            .unwrap_or(default)
    }
}

/// YaRN's magnitude correction.
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeScaling {
    /// Read Hugging Face's `rope_scaling` (hub configs: `rope_type` or `type`) or transformers
    /// 5.x's `rope_parameters`; unknown or default types mean no scaling.
    pub fn from_hf(v: Option<&serde_json::Value>) -> Result<Self, String> {
        let Some(v) = v.filter(|v| v.is_object()) else {
            return Ok(Self::None);
        };
        let kind = v["rope_type"]
            .as_str()
            .or_else(|| v["type"].as_str())
            .unwrap_or("default");
        let num = |k: &str| {
            v[k].as_f64()
                .ok_or_else(|| format!("rope_scaling.{k} is missing"))
        };
        let opt = |k: &str| v[k].as_f64().filter(|x| *x != 0.0);
        match kind {
            "default" => Ok(Self::None),
            "yarn" => {
                let factor = num("factor")?;
                let (mscale, all) = (opt("mscale"), opt("mscale_all_dim"));
                let attention_factor = match (opt("attention_factor"), mscale, all) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(a)) => yarn_mscale(factor, m) / yarn_mscale(factor, a),
                    _ => yarn_mscale(factor, 1.0),
                };
                Ok(Self::Yarn {
                    factor,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                    beta_fast: opt("beta_fast").unwrap_or(32.0),
                    beta_slow: opt("beta_slow").unwrap_or(1.0),
                    attention_factor,
                    softmax_scale_factor: all.map_or(1.0, |a| yarn_mscale(factor, a).powi(2)),
                    truncate: v["truncate"].as_bool().unwrap_or(true),
                })
            }
            "llama3" => Ok(Self::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }),
            other => Err(format!("rope scaling type `{other}` is not supported")),
        }
    }

    /// The inverse frequencies of a `dim`-dimensional rotation with base `theta`.
    pub fn inv_freqs(&self, theta: f64, dim: usize) -> Vec<f64> {
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / dim as f64))
            .collect();
        match *self {
            Self::None => base,
            Self::Llama3 { .. } => base.into_iter().map(|f| self.llama3(f)).collect(),
            Self::Yarn {
                factor,
                original_max_position_embeddings: old,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let d = dim as f64;
                let correction = |rot: f64| {
                    d * (old / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, high) = (low.max(0.0), high.min(d - 1.0));
                let high = if low == high { high + 0.001 } else { high };
                base.into_iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        f / factor * (1.0 - extrapolation) + f * extrapolation
                    })
                    .collect()
            }
        }
    }

    /// What cos/sin are multiplied by.
    pub fn attention_factor(&self) -> f64 {
        match *self {
            Self::Yarn {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        }
    }

    /// What the softmax scale is multiplied by (DeepSeek's YaRN `mscale_all_dim`).
    pub fn softmax_scale_factor(&self) -> f64 {
        match *self {
            Self::Yarn {
                softmax_scale_factor,
                ..
            } => softmax_scale_factor,
            _ => 1.0,
        }
    }

    fn llama3(&self, inv_freq: f64) -> f64 {
        let Self::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } = *self
        else {
            return inv_freq;
        };
        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
        if wavelen < old / high_freq_factor {
            inv_freq
        } else if wavelen > old / low_freq_factor {
            inv_freq / factor
        } else {
            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
            (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
        }
    }
}

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    style: RopeStyle,
    rotary_dim: usize,
    /// `[max_positions, rotary_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    max_positions: usize,
}

impl RotaryEmbedding {
    /// Standard RoPE with base `theta` over the first `rotary_dim` dimensions of each head.
    pub fn new(theta: f64, rotary_dim: usize, max_positions: usize, style: RopeStyle) -> Self {
        Self::scaled(theta, rotary_dim, max_positions, style, RopeScaling::None)
    }

    pub fn scaled(
        theta: f64,
        rotary_dim: usize,
        max_positions: usize,
        style: RopeStyle,
        scaling: RopeScaling,
    ) -> Self {
        Self::from_inv_freqs(
            &scaling.inv_freqs(theta, rotary_dim),
            scaling.attention_factor(),
            max_positions,
            style,
        )
    }

    /// From explicit inverse frequencies (one per rotated pair), e.g. a GGUF's base frequencies
    /// divided by its `rope_freqs.weight` factors; cos/sin are multiplied by `attention_factor`.
    pub fn from_inv_freqs(
        inv_freq: &[f64],
        attention_factor: f64,
        max_positions: usize,
        style: RopeStyle,
    ) -> Self {
        let rotary_dim = inv_freq.len() * 2;
        let half = inv_freq.len();
        let attn = attention_factor as f32;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in inv_freq {
                // Angles in f32 like the reference implementations, so long positions round the
                // same way.
                let a = (p as f32) * (*f as f32);
                cos.push(a.cos() * attn);
                sin.push(a.sin() * attn);
            }
        }
        Self {
            style,
            rotary_dim,
            cos,
            sin,
            max_positions,
        }
    }

    /// Rotate `x` (`[positions.len(), num_heads, head_dim]`, flat) in place.
    pub fn apply(&self, x: &mut [f32], positions: &[u32], num_heads: usize, head_dim: usize) {
        let half = self.rotary_dim / 2;
        for (t, &p) in positions.iter().enumerate() {
            let p = (p as usize).min(self.max_positions - 1);
            let cos = &self.cos[p * half..(p + 1) * half];
            let sin = &self.sin[p * half..(p + 1) * half];
            for h in 0..num_heads {
                let row = &mut x[(t * num_heads + h) * head_dim..][..head_dim];
                match self.style {
                    RopeStyle::Neox => {
                        for i in 0..half {
                            let (a, b) = (row[i], row[i + half]);
                            row[i] = a * cos[i] - b * sin[i];
                            row[i + half] = b * cos[i] + a * sin[i];
                        }
                    }
                    RopeStyle::Interleaved => {
                        for i in 0..half {
                            let (a, b) = (row[2 * i], row[2 * i + 1]);
                            row[2 * i] = a * cos[i] - b * sin[i];
                            row[2 * i + 1] = b * cos[i] + a * sin[i];
                        }
                    }
                }
            }
        }
    }
}

/// The cos/sin tables as tensors on the model's device, for [`RotaryEmbedding`]'s style.
#[derive(Debug, Clone)]
pub struct RopeTables {
    style: RopeStyle,
    rotary_dim: usize,
    /// `[max_positions, rotary_dim / 2]` in the model's dtype.
    cos: Tensor,
    sin: Tensor,
    /// On the CPU, f32 rows are rotated by this plain loop: a rope kernel call per layer costs
    /// a thread-pool dispatch for a few hundred values (~5% of a one-token decode step).
    host: Option<RotaryEmbedding>,
}

/// One forward pass's rows of the tables: cos and sin `[tokens, 1, rotary_dim / 2]` for the
/// kernel path (`None` when the host loop rotates), and the positions for the loop.
pub struct RopeRows {
    tables: Option<(Tensor, Tensor)>,
    positions: Vec<u32>,
}

impl RotaryEmbedding {
    pub fn tables(&self, device: &Device, dtype: DType) -> candle_core::Result<RopeTables> {
        let half = self.rotary_dim / 2;
        let t =
            |v: &[f32]| Tensor::from_slice(v, (self.max_positions, half), device)?.to_dtype(dtype);
        Ok(RopeTables {
            style: self.style,
            rotary_dim: self.rotary_dim,
            cos: t(&self.cos)?,
            sin: t(&self.sin)?,
            host: device.is_cpu().then(|| self.clone()),
        })
    }
}

impl RopeTables {
    /// The rows for `positions` (`[tokens]` u32 on the device; clamped like the host path).
    pub fn rows(&self, positions: &[u32]) -> candle_core::Result<RopeRows> {
        let tables = if self.host_loop() {
            None
        } else {
            let max = self.cos.dim(0)? as u32 - 1;
            let p: Vec<u32> = positions.iter().map(|&p| p.min(max)).collect();
            let idx = Tensor::from_vec(p, positions.len(), self.cos.device())?;
            let shape = (positions.len(), 1, self.rotary_dim / 2);
            Some((
                self.cos.index_select(&idx, 0)?.reshape(shape)?,
                self.sin.index_select(&idx, 0)?.reshape(shape)?,
            ))
        };
        Ok(RopeRows {
            tables,
            positions: positions.to_vec(),
        })
    }

    /// f32 rows on the CPU are rotated by the plain loop (activations have the tables' dtype).
    fn host_loop(&self) -> bool {
        self.host.is_some() && self.cos.dtype() == DType::F32
    }

    /// Rotate `x` (`[tokens, num_heads * head_dim]`); the first `rotary_dim` dims of each head.
    pub fn apply(
        &self,
        x: &Tensor,
        rows: &RopeRows,
        num_heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<Tensor> {
        let Some((cos, sin)) = &rows.tables else {
            // `rows` left the tables out: f32 on the CPU, rotated by the loop (`host_loop`).
            let h = self
                .host
                .as_ref()
                .ok_or_else(|| candle_core::Error::Msg("RoPE rows without tables".into()))?;
            let mut v = x.flatten_all()?.to_vec1::<f32>()?;
            h.apply(&mut v, &rows.positions, num_heads, head_dim);
            return Tensor::from_vec(v, x.shape(), x.device());
        };
        let t = x.dim(0)?;
        // Token t is batch entry t with one position: [t, heads, 1, head_dim].
        let x = x.reshape((t, num_heads, 1, head_dim))?;
        let (rot, pass) = if self.rotary_dim == head_dim {
            (x, None)
        } else {
            (
                x.narrow(3, 0, self.rotary_dim)?.contiguous()?,
                Some(x.narrow(3, self.rotary_dim, head_dim - self.rotary_dim)?),
            )
        };
        let cos = cos.to_dtype(rot.dtype())?;
        let sin = sin.to_dtype(rot.dtype())?;
        let rot = match self.style {
            RopeStyle::Neox => candle_nn::rotary_emb::rope(&rot, &cos, &sin)?,
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&rot, &cos, &sin)?,
        };
        let out = match pass {
            Some(p) => Tensor::cat(&[&rot, &p], 3)?,
            None => rot,
        };
        out.reshape((t, num_heads * head_dim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_ramps_between() {
        let v = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let s = RopeScaling::from_hf(Some(&v)).unwrap();
        let tau = 2.0 * std::f64::consts::PI;
        // Wavelength 1000 < 8192/4: unchanged. Wavelength 10000 > 8192/1: divided by 8.
        assert_eq!(s.llama3(tau / 1000.0), tau / 1000.0);
        assert!((s.llama3(tau / 10000.0) - tau / 10000.0 / 8.0).abs() < 1e-15);
        // Wavelength 4096: smooth = (8192/4096 - 1) / 3 = 1/3.
        let f = tau / 4096.0;
        assert!((s.llama3(f) - (2.0 / 3.0 * f / 8.0 + f / 3.0)).abs() < 1e-15);
        assert_eq!(RopeScaling::from_hf(None), Ok(RopeScaling::None));
        let legacy = serde_json::json!({"type": "default"});
        assert_eq!(RopeScaling::from_hf(Some(&legacy)), Ok(RopeScaling::None));
        let yarn = serde_json::json!({"type": "yarn", "factor": 4.0});
        assert!(
            RopeScaling::from_hf(Some(&yarn)).is_err(),
            "original_max_position_embeddings is needed"
        );
        let dynamic = serde_json::json!({"type": "dynamic", "factor": 4.0});
        assert!(RopeScaling::from_hf(Some(&dynamic)).is_err());
    }

    #[test]
    fn position_zero_is_identity_and_styles_pair_differently() {
        let r = RotaryEmbedding::new(10000.0, 4, 8, RopeStyle::Neox);
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        r.apply(&mut x, &[0], 1, 4);
        assert_eq!(x, vec![1.0, 2.0, 3.0, 4.0]);

        // At position 1 the first frequency is 1 rad: (a, b) -> (a cos1 - b sin1, b cos1 + a sin1).
        let (c, s) = (1f32.cos(), 1f32.sin());
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        r.apply(&mut x, &[1], 1, 4);
        assert!((x[0] - c).abs() < 1e-6 && (x[2] - s).abs() < 1e-6, "{x:?}");

        let r = RotaryEmbedding::new(10000.0, 4, 8, RopeStyle::Interleaved);
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        r.apply(&mut x, &[1], 1, 4);
        assert!((x[0] - c).abs() < 1e-6 && (x[1] - s).abs() < 1e-6, "{x:?}");
    }

    #[test]
    fn tensor_rope_matches_host_rope_for_both_styles() {
        let dev = Device::Cpu;
        let positions = [0u32, 5, 3, 17];
        let (heads, hd) = (3, 8);
        let x: Vec<f32> = (0..positions.len() * heads * hd)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
            let r = RotaryEmbedding::new(10000.0, hd, 32, style);
            let mut want = x.clone();
            r.apply(&mut want, &positions, heads, hd);
            let mut tables = r.tables(&dev, DType::F32).unwrap();
            // The kernel path accelerators use, not the CPU's plain loop.
            tables.host = None;
            let rows = tables.rows(&positions).unwrap();
            let xt = Tensor::from_slice(&x, (positions.len(), heads * hd), &dev).unwrap();
            let got = tables.apply(&xt, &rows, heads, hd).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "{style:?}: {a} vs {b}");
            }
        }
    }
}
