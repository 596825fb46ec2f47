//! The gated MLP (SwiGLU): `down(silu(gate(x)) * up(x))`, with gate and up as two projections
//! (Llama, Qwen2, DeepSeek experts) or one fused `gate_up` projection, gate first (GLM-4).

use candle_core::Tensor;

use super::Linear;
use crate::models::Result;

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
            GateUp::Separate { gate, up } => {
                (candle_nn::ops::silu(&gate.forward(x)?)? * up.forward(x)?)?
            }
            GateUp::Fused(gate_up) => {
                let y = gate_up.forward(x)?;
                let n = y.dim(1)? / 2;
                (candle_nn::ops::silu(&y.narrow(1, 0, n)?)? * y.narrow(1, n, n)?)?
            }
        };
        self.down.forward(&h)
    }
}
