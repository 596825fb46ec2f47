//! The gated MLP (SwiGLU): `down(silu(gate(x)) * up(x))`, with gate and up as two projections
//! (Llama, Qwen2, DeepSeek experts) or one fused `gate_up` projection, gate first (GLM-4).

use candle_core::Tensor;

use super::{swiglu, Linear, Projections};
use crate::models::weights::Weights;
use crate::models::{ModelError, Result};

/// How a checkpoint stores the gate and up projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateUpLayout {
    /// `gate_proj` and `up_proj` (Llama, Qwen2, DeepSeek).
    Separate,
    /// One `gate_up_proj` of twice the intermediate size, gate rows first (GLM-4).
    Fused,
}

#[derive(Debug, Clone)]
enum GateUp {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate_up: GateUp,
    down: Linear,
}

impl GatedMlp {
    /// The MLP under `w`: `[hidden] -> [intermediate] -> [hidden]`.
    pub fn load(
        w: &Weights,
        hidden: usize,
        intermediate: usize,
        layout: GateUpLayout,
    ) -> Result<Self> {
        let down = |w: &Weights| Linear::load(&w.pp("down_proj"), intermediate, hidden, false);
        match layout {
            GateUpLayout::Fused => {
                let gate_up = Linear::load(&w.pp("gate_up_proj"), hidden, 2 * intermediate, false)?;
                Ok(Self::fused(gate_up, down(w)?))
            }
            GateUpLayout::Separate => {
                let names = ["gate_proj", "up_proj"];
                let dims = [intermediate, intermediate];
                match Projections::load(w, &names, hidden, &dims, false)? {
                    Projections::Fused { linear, .. } => Ok(Self::fused(linear, down(w)?)),
                    Projections::Separate(mut p) => match (p.pop(), p.pop()) {
                        (Some(up), Some(gate)) => Ok(Self::new(gate, up, down(w)?)),
                        _ => Err(ModelError::MissingWeight(w.full_name("gate_proj.weight"))),
                    },
                }
            }
        }
    }

    pub fn new(gate: Linear, up: Linear, down: Linear) -> Self {
        Self {
            gate_up: GateUp::Separate { gate, up },
            down,
        }
    }

    /// `gate_up` projects to `[gate | up]`, twice the intermediate size.
    pub fn fused(gate_up: Linear, down: Linear) -> Self {
        Self {
            gate_up: GateUp::Fused(gate_up),
            down,
        }
    }

    /// `x`: `[tokens, hidden]` → `[tokens, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.gate_up {
            GateUp::Separate { gate, up } => swiglu::silu_mul(&gate.forward(x)?, &up.forward(x)?)?,
            GateUp::Fused(gate_up) => {
                let y = gate_up.forward(x)?;
                let n = y.dim(1)? / 2;
                swiglu::silu_mul(&y.narrow(1, 0, n)?, &y.narrow(1, n, n)?)?
            }
        };
        self.down.forward(&h)
    }
}
