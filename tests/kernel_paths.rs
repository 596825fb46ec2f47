//! Every CPU kernel path this machine runs (`INFERD_CPU_KERNELS=avx512|avxvnni|avx2|portable`)
//! serves both real models (SmolLM2 Q4_1; Qwen2.5 Q4_K_M: Q4_K, Q6_K, Q5_0, Q8_0) and says which
//! path it runs in `/version`. The quantized matmuls and activation quantization are bit for bit
//! the portable twin's on every path (`qtiles`' unit tests), and so are the AVX2 and AVX-512
//! attention lanes (`attention`'s: one FMA chain per score, one exp polynomial, one summation
//! tree), so every path gives the portable path's greedy tokens and logprobs exactly. An unknown
//! path is refused at start.
mod common;

use common::*;
use inferd::models::layers::simd::KernelPath;
use serde_json::{json, Value};

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
];

/// Per prompt: the greedy tokens and their logprobs.
async fn greedy(base: &str, name: &str) -> Vec<(Vec<String>, Vec<f64>)> {
    let mut out = Vec::new();
    for p in PROMPTS {
        let (status, v) = post(
            base,
            "/v1/completions",
            &json!({"model": name, "prompt": p, "max_tokens": 8, "temperature": 0,
                    "ignore_eos": true, "logprobs": 0}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let tokens: Vec<String> = v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_str().unwrap_or_default().to_string())
            .collect();
        let logprobs: Vec<f64> = v["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .expect("token_logprobs")
            .iter()
            .map(|l| l.as_f64().unwrap_or(f64::NAN))
            .collect();
        assert_eq!(tokens.len(), 8, "{v}");
        out.push((tokens, logprobs));
    }
    out
}

async fn tokens_on_every_path(model: &str, name: &str) {
    let mut runs = Vec::new();
    for path in KernelPath::all_supported() {
        let (_daemon, base) = spawn_serve(
            &model_path(model),
            name,
            &["--kv-cache-memory", "64MiB", "--max-model-len", "256"],
            &[("INFERD_CPU_KERNELS", path.name())],
        );
        let (_, v): (u16, Value) = get(&base, "/version").await;
        assert_eq!(v["cpu_kernels"], path.name(), "{v}");
        runs.push((path, greedy(&base, name).await));
    }
    let (first_path, first) = &runs[0];
    for (path, run) in &runs[1..] {
        assert_eq!(run, first, "{name}: {path:?} vs {first_path:?}");
    }
}

#[tokio::test]
async fn smollm_runs_on_every_path() {
    tokens_on_every_path(SMOLLM, "smol").await;
}

#[tokio::test]
async fn qwen_runs_on_every_path() {
    tokens_on_every_path(QWEN, "qwen").await;
}

#[test]
fn an_unknown_path_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inferd"))
        .args(["serve", "--port", "0", "--model"])
        .arg(model_path(SMOLLM))
        .env("INFERD_CPU_KERNELS", "neon9000")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("INFERD_CPU_KERNELS=neon9000"), "{err}");
}

#[tokio::test]
async fn threads_are_the_ones_asked_for() {
    let (_daemon, base) = spawn_serve(&model_path(SMOLLM), "smol", &["--threads", "1"], &[]);
    let (_, v) = get(&base, "/version").await;
    assert_eq!(v["cpu_threads"], 1, "{v}");
    let (status, _) = post(
        &base,
        "/v1/completions",
        &json!({"model": "smol", "prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);
}

/// The real models' weight matrices, one of each type they hold (Qwen2.5: Q4_K, Q5_0, Q6_K,
/// Q8_0; SmolLM2: Q4_1) and requantized to the types people download next (Q5_K, Q5_1, Q4_0,
/// Q3_K, Q2_K): every path's matmul gives the portable twin's bits, for a batch and for one
/// row.
#[test]
fn real_tensors_give_the_portable_bits_on_every_path() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::Device;
    use inferd::models::layers::qtiles::TiledMatrix;

    let read = |file: &str, names: &[&str]| -> Vec<QTensor> {
        let path = model_path(file);
        let mut f = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        names
            .iter()
            .map(|n| content.tensor(&mut f, n, &Device::Cpu).unwrap())
            .collect()
    };
    let mut tensors = read(
        QWEN,
        &[
            "blk.0.ffn_down.weight",
            "blk.2.ffn_down.weight",
            "blk.0.attn_q.weight",
            "blk.0.attn_v.weight",
        ],
    );
    tensors.extend(read(SMOLLM, &["blk.0.attn_q.weight"]));
    let requantize = |t: &QTensor, dtype: GgmlDType| {
        QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), dtype).unwrap()
    };
    let (down, q) = (&tensors[0], &tensors[2]);
    let extra = [
        requantize(down, GgmlDType::Q5K),
        requantize(q, GgmlDType::Q5_1),
        requantize(q, GgmlDType::Q4_0),
        requantize(down, GgmlDType::Q3K),
        requantize(down, GgmlDType::Q2K),
    ];
    tensors.extend(extra);
    let mut seen = Vec::new();
    for t in &tensors {
        let tiled = TiledMatrix::from_qtensor(t).unwrap().expect("a tile type");
        let (m, k, n) = (5, tiled.cols(), tiled.rows());
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 500.0)
            .collect();
        let want = tiled.matmul_with(KernelPath::Portable, &x, m);
        for path in KernelPath::all_supported() {
            assert_eq!(
                tiled.matmul_with(path, &x, m),
                want,
                "{:?} on {path:?}",
                t.dtype()
            );
            assert_eq!(
                tiled.matmul_with(path, &x[2 * k..3 * k], 1),
                want[2 * n..3 * n],
                "{:?} on {path:?}, one row",
                t.dtype()
            );
        }
        seen.push(t.dtype());
    }
    for dtype in [
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5K,
        GgmlDType::Q5_1,
        GgmlDType::Q4_0,
        GgmlDType::Q3K,
        GgmlDType::Q2K,
    ] {
        assert!(seen.contains(&dtype), "no {dtype:?} among {seen:?}");
    }
}
