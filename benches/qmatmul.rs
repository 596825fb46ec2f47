//! Micro-benchmark of the quantized matmuls the CPU forward pass is made of, by dtype and rows.
//! `cargo bench --bench qmatmul`
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

fn main() {
    let dev = Device::Cpu;
    // Qwen2.5-0.5B's ffn_down shape: k is a multiple of 256, as K-quants need.
    let (n, k) = (896, 4864);
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
    for dtype in [
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::Q5_0,
        GgmlDType::Q4_1,
    ] {
        let q = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
        for m in [1usize, 2, 8, 64] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            q.forward(&x).unwrap();
            let iters = 20;
            let t = Instant::now();
            for _ in 0..iters {
                q.forward(&x).unwrap();
            }
            let per = t.elapsed().as_secs_f64() / iters as f64;
            println!(
                "{dtype:?} m={m:3}: {:8.3} ms  {:7.2} GFLOP/s",
                per * 1e3,
                2.0 * (m * n * k) as f64 / per / 1e9
            );
        }
    }
}
