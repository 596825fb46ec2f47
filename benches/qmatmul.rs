//! Micro-benchmark of the quantized matmuls the CPU forward pass is made of, by dtype and
//! rows: candle's kernels (`QMatMul`), then inferd's tiles on every kernel path this CPU runs.
//! `cargo bench --bench qmatmul [-- tiles|candle [DTYPE...]]` (e.g. `-- tiles Q8_0 Q5_0`)
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use inferd::models::layers::qtiles::TiledMatrix;
use inferd::models::layers::simd::KernelPath;

const DTYPES: [GgmlDType; 10] = [
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q4_1,
    GgmlDType::Q4_0,
    GgmlDType::Q3K,
    GgmlDType::Q2K,
];

/// Seconds per call of `f`, over enough calls to take ~0.2 s.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-6);
    let iters = ((0.2 / once) as usize).clamp(3, 200);
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_secs_f64() / iters as f64
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let only = args.first().cloned();
    let dtypes = &args[args.len().min(1)..];
    let dev = Device::Cpu;
    // Qwen2.5-0.5B's ffn_down shape: k is a multiple of 256, as K-quants need.
    let (n, k) = (896, 4864);
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
    let gflops = |m: usize, per: f64| 2.0 * (m * n * k) as f64 / per / 1e9;
    for dtype in DTYPES {
        if !dtypes.is_empty() && !dtypes.iter().any(|d| *d == format!("{dtype:?}")) {
            continue;
        }
        let qt = QTensor::quantize(&w, dtype).unwrap();
        let tiled = TiledMatrix::from_qtensor(&qt).unwrap();
        if only.as_deref() != Some("tiles") {
            let q = QMatMul::from_qtensor(qt).unwrap();
            for m in [1usize, 2, 8, 64] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let per = time(|| {
                    q.forward(&x).unwrap();
                });
                println!(
                    "candle {dtype:?} m={m:3}: {:8.3} ms  {:7.2} GFLOP/s",
                    per * 1e3,
                    gflops(m, per)
                );
            }
        }
        let Some(tiled) = tiled.filter(|_| only.as_deref() != Some("candle")) else {
            continue;
        };
        for path in KernelPath::all_supported() {
            for m in [1usize, 4, 16, 64] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i % 97) as f32 - 48.0) / 50.0)
                    .collect();
                let per = time(|| {
                    tiled.matmul_with(path, &x, m);
                });
                println!(
                    "tiles {:8} {dtype:?} m={m:3}: {:8.3} ms  {:7.2} GFLOP/s",
                    path.name(),
                    per * 1e3,
                    gflops(m, per)
                );
            }
        }
    }
}
