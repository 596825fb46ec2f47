//! Every model family against Hugging Face transformers: tiny random-weight checkpoints and the
//! reference logits of a fixed token sequence, made once by
//! `scripts/fixtures/make_reference_fixtures.py` and committed under `tests/fixtures/`.
//!
//! For each fixture, through both KV cache storages (host blocks read by the CPU kernel, and
//! tensors read by the gather path the GPU uses): prefill logits at every position, token-by-token
//! decode, a chunk at an offset, and a batch of sequences of different lengths in scattered
//! blocks — each within 1e-4 of the reference.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use inferd::models::{load_model, CacheSpec, CausalLm, ForwardBatch, KvCache};

const TOL: f32 = 1e-4;
/// With K/V stored in f16 (logits of std ~0.63).
const TOL_F16: f32 = 1e-2;
const BS: usize = 4;
const BLOCKS: usize = 48;

struct Golden {
    ids: Vec<u32>,
    /// `[tokens][vocab]`.
    logits: Vec<Vec<f32>>,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn golden(dir: &Path) -> Golden {
    let t = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    let ids = t["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let logits = t["logits"].to_vec2::<f32>().unwrap();
    Golden { ids, logits }
}

/// One forward pass; `parts` are (new tokens, start position, block table). With `every_row`,
/// logits of every token come back, else of each sequence's last token.
fn run(
    m: &dyn CausalLm,
    kv: &mut KvCache,
    parts: &[(&[u32], usize, Vec<u32>)],
    every_row: bool,
) -> Vec<Vec<f32>> {
    let mut b = ForwardBatch::new(BS);
    for (new, start, table) in parts {
        b.push_sequence(new, *start, table);
    }
    if every_row {
        b.logits_indices = (0..b.num_tokens()).collect();
    }
    let out: Tensor = m.forward(&b, kv).unwrap();
    out.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
}

/// At how many positions `rows` and `want` have the same greedy token.
fn greedy_agreement(rows: &[Vec<f32>], want: &[Vec<f32>]) -> usize {
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0
    };
    rows.iter()
        .zip(want)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count()
}

fn worst(rows: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(rows.len(), want.len());
    rows.iter()
        .zip(want)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0f32, f32::max)
}

/// All checks through one cache, each within `tol`; returns the largest difference seen.
fn check_cache(m: &dyn CausalLm, kv: &mut KvCache, g: &Golden, what: &str, tol: f32) -> f32 {
    let n = g.ids.len();
    let mut seen = 0f32;
    let mut check = |d: f32, step: &str| {
        assert!(d < tol, "{what}: {step} differs from the reference by {d}");
        seen = seen.max(d);
    };

    // Prefill of the whole sequence in scattered blocks, every position.
    let table: Vec<u32> = vec![7, 2, 30, 11];
    let rows = run(m, kv, &[(&g.ids, 0, table)], true);
    check(worst(&rows, &g.logits), "prefill");

    // Token by token through the paged cache.
    let table: Vec<u32> = vec![40, 3, 17, 25];
    for i in 0..n {
        let rows = run(m, kv, &[(&g.ids[i..=i], i, table.clone())], false);
        check(worst(&rows, &g.logits[i..=i]), &format!("decode step {i}"));
    }

    // A 5-token prefill, then the rest as one chunk at offset 5.
    let table: Vec<u32> = vec![20, 21, 5, 9];
    run(m, kv, &[(&g.ids[..5], 0, table.clone())], false);
    let rows = run(m, kv, &[(&g.ids[5..], 5, table.clone())], true);
    check(worst(&rows, &g.logits[5..]), "chunk at an offset");

    // A batch: two prefills of different lengths around a decode (the chunked sequence's
    // last token again, recomputed at its position), blocks scattered.
    let rows = run(
        m,
        kv,
        &[
            (&g.ids[..3], 0, vec![33]),
            (&g.ids[n - 1..], n - 1, table),
            (&g.ids[..9], 0, vec![34, 12, 46]),
        ],
        false,
    );
    let want = [
        g.logits[2].clone(),
        g.logits[n - 1].clone(),
        g.logits[8].clone(),
    ];
    check(worst(&rows, &want), "mixed batch");
    seen
}

fn check_fixture(name: &str) -> f32 {
    let dir = fixture(name);
    let g = golden(&dir);
    let loaded = load_model(&dir, &Device::Cpu, Some(256)).unwrap();
    let m = loaded.model.as_ref();
    let spec = m.cache_spec();
    let mut host = KvCache::new(spec, BLOCKS, BS);
    let a = check_cache(m, &mut host, &g, &format!("{name} (host cache)"), TOL);
    let mut tensors = KvCache::tensors(spec, BLOCKS, BS, &Device::Cpu).unwrap();
    let b = check_cache(m, &mut tensors, &g, &format!("{name} (tensor cache)"), TOL);
    // The daemon's CPU default: K/V rounded to f16 (the only difference from the above).
    let f16 = CacheSpec {
        dtype: DType::F16,
        ..spec
    };
    let mut half = KvCache::new(f16, BLOCKS, BS);
    let c = check_cache(
        m,
        &mut half,
        &g,
        &format!("{name} (f16 host cache)"),
        TOL_F16,
    );
    eprintln!(
        "{name}: largest logit difference {:.2e} (f16 cache {c:.2e})",
        a.max(b)
    );
    a.max(b)
}

#[test]
fn llama3_hub_config() {
    check_fixture("llama3-hub");
}

#[test]
fn llama3_rope_parameters_config() {
    check_fixture("llama3-rope-parameters");
}

#[test]
fn qwen2_tied_hub_config() {
    check_fixture("qwen2-tied-hub");
}

#[test]
fn glm4_hf_layout_hub_config() {
    check_fixture("glm4-hf-hub");
}

#[test]
fn glm4_hf_layout_rope_parameters_config() {
    check_fixture("glm4-hf-rope-parameters");
}

/// GLM-4-0414 (`Glm4ForCausalLM`): the attention and MLP outputs normed before each
/// residual add.
#[test]
fn glm4_0414_hub_config() {
    check_fixture("glm4-0414-hub");
}

#[test]
fn glm4_thudm_layout() {
    check_fixture("glm4-thudm");
}

#[test]
fn deepseek_v2_lite_shape_greedy_routing_hub_config() {
    check_fixture("deepseek-v2-lite-hub");
}

#[test]
fn deepseek_v2_shape_q_lora_group_limited_routing() {
    check_fixture("deepseek-v2-grouped");
}

/// The cache of an MLA model holds the latent and the rotary key once per token and layer —
/// not per-head K and V.
#[test]
fn deepseek_v2_caches_only_the_latent() {
    let m = load_model(&fixture("deepseek-v2-grouped"), &Device::Cpu, Some(64)).unwrap();
    let spec = m.model.cache_spec();
    // 3 layers x (kv_lora_rank 32 + qk_rope_head_dim 8) x 4 bytes.
    assert_eq!(spec.bytes_per_token(), 3 * (32 + 8) * 4);
    let per_head_kv = 3 * 4 * ((16 + 8) + 16) * 4;
    assert!(spec.bytes_per_token() * 4 <= per_head_kv);
    let host = KvCache::new(spec, 4, BS);
    assert!(!host.host_layer(0).unwrap().has_values(), "no V storage");
}

/// The grouped fixture really exercises group-limited routing: routed greedily instead, the
/// same weights give logits far from the reference.
#[test]
fn group_limited_routing_is_what_matches_the_reference() {
    let src = fixture("deepseek-v2-grouped");
    let dir = std::env::temp_dir().join(format!("inferd-greedy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["model.safetensors", "golden.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["topk_method"] = "greedy".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let g = golden(&dir);
    let m = load_model(&dir, &Device::Cpu, Some(64)).unwrap().model;
    let mut kv = KvCache::new(m.cache_spec(), BLOCKS, BS);
    let rows = run(m.as_ref(), &mut kv, &[(&g.ids, 0, vec![0, 1, 2, 3])], true);
    let d = worst(&rows, &g.logits);
    assert!(d > 1e-2, "greedy routing should not match ({d})");
    std::fs::remove_dir_all(&dir).ok();
}

/// A copy of fixture `name` whose config.json has `changes` applied, in a fresh directory.
fn altered_fixture(name: &str, tag: &str, changes: serde_json::Value) -> PathBuf {
    let src = fixture(name);
    let dir = std::env::temp_dir().join(format!("inferd-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    for (k, v) in changes.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    let err = match load_model(dir, &Device::Cpu, Some(64)) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    };
    std::fs::remove_dir_all(dir).ok();
    err
}

/// A config that disagrees with its tensors fails at load, naming the tensor and both shapes
/// (it used to load and serve garbage).
#[test]
fn a_config_that_disagrees_with_the_weights_fails_at_load() {
    let dir = altered_fixture(
        "qwen2-tied-hub",
        "shape",
        serde_json::json!({"intermediate_size": 192}),
    );
    let err = load_error(&dir);
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight")
            && err.contains("[128, 64]")
            && err.contains("[192, 64]"),
        "{err}"
    );
    // THUDM's fused query_key_value is checked whole: with one KV group instead of two, q/k/v
    // would split 128 rows as 64 + 16 + 16.
    let dir = altered_fixture(
        "glm4-thudm",
        "qkv",
        serde_json::json!({"multi_query_group_num": 1}),
    );
    let err = load_error(&dir);
    assert!(
        err.contains("transformer.encoder.layers.0.self_attention.query_key_value.weight")
            && err.contains("[128, 64]")
            && err.contains("[96, 64]"),
        "{err}"
    );
}

/// An architecture no family reads is refused with the list of those that are.
#[test]
fn an_unknown_architecture_lists_the_supported_ones() {
    let dir = altered_fixture(
        "llama3-hub",
        "arch",
        serde_json::json!({"architectures": ["MambaForCausalLM"]}),
    );
    let err = load_error(&dir);
    assert!(err.contains("`MambaForCausalLM`"), "{err}");
    for arch in [
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "GlmForCausalLM",
        "ChatGLMModel",
        "Glm4ForCausalLM",
        "DeepseekV2ForCausalLM",
    ] {
        assert!(err.contains(arch), "{err}");
    }
}

/// Write the `llama3-hub` fixture as llama.cpp's converter would: GGUF `llama`, Q/K rows
/// permuted for adjacent-pair RoPE, and Llama 3.1's scaling as `rope_freqs.weight` divisors
/// (only when `rope_freqs`).
fn llama3_fixture_as_gguf(path: &Path, rope_freqs: bool) {
    use candle_core::quantized::gguf_file::{self, Value as V};
    use candle_core::quantized::{GgmlDType, QTensor};
    let dir = fixture("llama3-hub");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let u = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (hidden, heads, kv_heads) = (
        u("hidden_size"),
        u("num_attention_heads"),
        u("num_key_value_heads"),
    );
    let hd = hidden / heads;
    let st = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let permute = |w: &Tensor, n: usize| {
        w.reshape((n, 2, hd / 2, hidden))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((n * hd, hidden))
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &st {
        let t = if name.ends_with("q_proj.weight") {
            permute(t, heads)
        } else if name.ends_with("k_proj.weight") {
            permute(t, kv_heads)
        } else {
            t.clone()
        };
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        tensors.push((inferd::models::weights::gguf_name(name), q));
    }
    if rope_freqs {
        let s = &cfg["rope_scaling"];
        let f = |k: &str| s[k].as_f64().unwrap();
        let (factor, low, high, old) = (
            f("factor"),
            f("low_freq_factor"),
            f("high_freq_factor"),
            f("original_max_position_embeddings"),
        );
        let theta = cfg["rope_theta"].as_f64().unwrap();
        let divisors: Vec<f32> = (0..hd / 2)
            .map(|i| {
                let wavelen = 2.0 * std::f64::consts::PI * theta.powf(2.0 * i as f64 / hd as f64);
                let d = if wavelen < old / high {
                    1.0
                } else if wavelen > old / low {
                    factor
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                d as f32
            })
            .collect();
        let t = Tensor::new(divisors.as_slice(), &Device::Cpu).unwrap();
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let md: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.context_length", V::U32(256)),
        ("llama.embedding_length", V::U32(hidden as u32)),
        (
            "llama.feed_forward_length",
            V::U32(u("intermediate_size") as u32),
        ),
        ("llama.block_count", V::U32(u("num_hidden_layers") as u32)),
        ("llama.attention.head_count", V::U32(heads as u32)),
        ("llama.attention.head_count_kv", V::U32(kv_heads as u32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            V::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (
            "llama.rope.freq_base",
            V::F32(cfg["rope_theta"].as_f64().unwrap() as f32),
        ),
        ("llama.rope.dimension_count", V::U32(hd as u32)),
        ("llama.vocab_size", V::U32(u("vocab_size") as u32)),
    ];
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &md_refs, &t_refs).unwrap();
}

/// Llama 3.1 converted by llama.cpp carries its rope scaling only as `rope_freqs.weight`:
/// loaded from such a GGUF, the model matches the reference; without the tensor it would not.
#[test]
fn llama3_gguf_with_rope_freqs_matches_reference() {
    let g = golden(&fixture("llama3-hub"));
    let tmp = std::env::temp_dir().join(format!("inferd-llama3-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut diffs = Vec::new();
    for with_freqs in [true, false] {
        let path = tmp.join(format!("llama3-{with_freqs}.gguf"));
        llama3_fixture_as_gguf(&path, with_freqs);
        let m = load_model(&path, &Device::Cpu, Some(64)).unwrap().model;
        let mut kv = KvCache::new(m.cache_spec(), BLOCKS, BS);
        let rows = run(m.as_ref(), &mut kv, &[(&g.ids, 0, vec![3, 1, 4, 0])], true);
        diffs.push(worst(&rows, &g.logits));
    }
    std::fs::remove_dir_all(&tmp).ok();
    assert!(diffs[0] < TOL, "with rope_freqs.weight: {}", diffs[0]);
    assert!(
        diffs[1] > 1e-2,
        "without it the scaling is lost: {}",
        diffs[1]
    );
}

/// The GPU's numerics where there is no GPU: weights, activations and the KV cache in bf16 on
/// the CPU, through the tensor cache path and candle's RoPE kernels (what CUDA runs). Every
/// family stays close to the f32 reference: logits within bf16 error, and the same greedy token
/// at nearly every position. One exception is expected and allowed: in the DeepSeek fixture,
/// position 1 of layer 2 routes on a near-tie (group-best scores 0.1724 vs 0.1717 in f32), which
/// bf16 rounding flips to another group of experts — discontinuous routing, not a kernel error.
#[test]
fn bf16_tensor_path_stays_close_to_the_reference() {
    use inferd::models::loader::load_model_as;
    for name in [
        "llama3-hub",
        "qwen2-tied-hub",
        "glm4-thudm",
        "deepseek-v2-grouped",
    ] {
        let dir = fixture(name);
        let g = golden(&dir);
        let m = load_model_as(&dir, &Device::Cpu, DType::BF16, Some(64))
            .unwrap()
            .model;
        let spec = m.cache_spec();
        assert_eq!(spec.dtype, DType::BF16);
        let mut kv = KvCache::tensors(spec, BLOCKS, BS, &Device::Cpu).unwrap();
        let rows = run(m.as_ref(), &mut kv, &[(&g.ids, 0, vec![5, 9, 2, 7])], true);
        // Then decode the last two tokens again one by one (a write and a gather per step).
        let mut kv2 = KvCache::tensors(spec, BLOCKS, BS, &Device::Cpu).unwrap();
        let n = g.ids.len();
        run(
            m.as_ref(),
            &mut kv2,
            &[(&g.ids[..n - 2], 0, vec![1, 3, 8, 6])],
            false,
        );
        let d1 = run(
            m.as_ref(),
            &mut kv2,
            &[(&g.ids[n - 2..n - 1], n - 2, vec![1, 3, 8, 6])],
            false,
        );
        let d2 = run(
            m.as_ref(),
            &mut kv2,
            &[(&g.ids[n - 1..], n - 1, vec![1, 3, 8, 6])],
            false,
        );
        let agree = greedy_agreement(&rows, &g.logits);
        let per: Vec<f32> = rows
            .iter()
            .zip(&g.logits)
            .map(|(a, b)| max_abs_diff(a, b))
            .collect();
        let off = per.iter().filter(|&&x| x >= 0.15).count();
        let allowed = usize::from(name.starts_with("deepseek"));
        assert!(off <= allowed, "{name}: per-position differences {per:?}");
        let d = per
            .iter()
            .copied()
            .filter(|&x| x < 0.15)
            .fold(0f32, f32::max);
        let dd = worst(&[d1[0].clone(), d2[0].clone()], &g.logits[n - 2..]);
        eprintln!(
            "{name}: bf16 max logit difference {d:.3} (decode {dd:.3}), greedy agreement {agree}/{n}, routing flips {off}"
        );
        assert!(d < 0.15 && dd < 0.15, "{name}: {d} / {dd}");
        assert!(
            agree + 1 >= n,
            "{name}: greedy tokens agree at {agree} of {n} positions"
        );
    }
}

/// Largest difference from the reference of the prefill logits of `dir` loaded with `quantize`,
/// and how many positions keep the reference's greedy token.
fn quantized_prefill(dir: &Path, quantize: &str) -> (f32, usize, usize) {
    let g = golden(dir);
    let rows = prefill_logits(dir, &with_quantize(Some(quantize)), &g.ids);
    let agree = greedy_agreement(&rows, &g.logits);
    (worst(&rows, &g.logits), agree, g.ids.len())
}

/// Prefill logits (every position) of the model at `path` loaded as `opts` say.
fn prefill_logits(path: &Path, opts: &inferd::models::LoadOptions, ids: &[u32]) -> Vec<Vec<f32>> {
    let m = inferd::models::load_model_with(path, &Device::Cpu, opts)
        .unwrap()
        .model;
    let mut kv = KvCache::new(m.cache_spec(), BLOCKS, BS);
    run(m.as_ref(), &mut kv, &[(ids, 0, vec![6, 2, 9, 4])], true)
}

fn with_quantize(q: Option<&str>) -> inferd::models::LoadOptions {
    inferd::models::LoadOptions {
        max_positions: Some(64),
        dtype: None,
        quantize: q.map(|q| inferd::models::quantize::LoadQuant::parse(q).unwrap()),
    }
}

/// The fixtures as llama.cpp's own converter writes them (`scripts/fixtures/
/// make_gguf_fixtures.py`, llama-cpp-python 0.3.36's tree): GGUF `chatglm` from both GLM-4
/// layouts (separate q/k/v, and THUDM's fused `attn_qkv`), `glm4` (GLM-4-0414's sandwich
/// norms as `post_attention_norm` / `post_ffw_norm`), `deepseek2` (MLA's `kv_b_proj`
/// split into a transposed `attn_k_b` and `attn_v_b`, experts stacked, YaRN and group-limited
/// routing from metadata), `llama` and `qwen2` (tied embeddings: no `output.weight`). The f32
/// files give the transformers reference logits.
const CONVERTED: [&str; 7] = [
    "qwen2-tied-hub",
    "glm4-hf-hub",
    "glm4-thudm",
    "glm4-0414-hub",
    "deepseek-v2-lite-hub",
    "deepseek-v2-grouped",
    "llama3-hub",
];

fn converted(name: &str, outtype: &str) -> PathBuf {
    fixture("gguf").join(format!("{name}-{outtype}.gguf"))
}

/// The logits a converted file of fixture `name` should give: the reference's, except for
/// `deepseek-v2-grouped`. GGUF has no field for YaRN's `mscale` beside `mscale_all_dim`
/// (stored as `yarn_log_multiplier`), and llama.cpp computes DeepSeek-V2 as if the two were
/// equal — they are, 0.707, in every DeepSeek-V2 checkpoint; this fixture sets `mscale` to 1.0
/// on purpose. Its file therefore means the same checkpoint with `mscale = mscale_all_dim`,
/// whose logits come from the safetensors path (itself checked against the reference above).
fn converted_reference(name: &str, ids: &[u32], tag: &str) -> (Vec<Vec<f32>>, Option<PathBuf>) {
    if name != "deepseek-v2-grouped" {
        return (golden(&fixture(name)).logits, None);
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap())
            .unwrap();
    let mut rope = cfg["rope_parameters"].clone();
    rope["mscale"] = rope["mscale_all_dim"].clone();
    let dir = altered_fixture(name, tag, serde_json::json!({ "rope_parameters": rope }));
    (prefill_logits(&dir, &with_quantize(None), ids), Some(dir))
}

#[test]
fn llama_cpp_converted_f32_ggufs_match_the_reference() {
    for name in CONVERTED {
        let g = golden(&fixture(name));
        let (want, tmp) = converted_reference(name, &g.ids, "gguf-f32");
        let rows = prefill_logits(&converted(name, "f32"), &with_quantize(None), &g.ids);
        let d = worst(&rows, &want);
        if let Some(dir) = tmp {
            std::fs::remove_dir_all(dir).ok();
        }
        eprintln!("{name}: converted f32 GGUF, largest logit difference {d:.2e}");
        if name == "glm4-hf-hub" {
            // llama.cpp's converter reads GLM-4's epsilon only under THUDM's key
            // (`layernorm_epsilon`), so from glm-4-9b-chat-hf's `rms_norm_eps` (1.5625e-07)
            // it writes its default, 1e-5; the file is served as written.
            let header = inferd::models::loader::read_gguf_header(&converted(name, "f32")).unwrap();
            let eps = inferd::models::loader::GgufMeta::new(&header)
                .unwrap()
                .arch_f64("attention.layer_norm_rms_epsilon")
                .unwrap();
            assert!((eps - 1e-5).abs() < 1e-9, "{eps}");
            assert!(d < 1e-2, "{name}: {d}");
        } else {
            assert!(d < TOL, "{name}: {d}");
        }
    }
    // The routing and MLA layout come from the file: the grouped fixture's metadata
    // says so.
    let header =
        inferd::models::loader::read_gguf_header(&converted("deepseek-v2-grouped", "f32")).unwrap();
    assert!(header
        .tensor_infos
        .contains_key("blk.1.ffn_gate_exps.weight"));
    assert!(header.tensor_infos.contains_key("blk.0.attn_k_b.weight"));
    assert!(!header.tensor_infos.contains_key("blk.0.attn_kv_b.weight"));
}

/// `--quantize q8_0` of a safetensors checkpoint and llama.cpp's own Q8_0 conversion of it
/// give the same model: their logits agree more closely than either agrees with the f32
/// reference — exactly where the converter quantizes every matrix (GLM-4 THUDM, Llama); where
/// it keeps small matrices whose rows are not whole blocks in F16 (DeepSeek's `q_b`/`k_b`)
/// or writes another epsilon (GLM-4 HF, above), within the difference those make.
#[test]
fn quantized_at_load_equals_llama_cpp_q8_0() {
    for name in CONVERTED {
        let g = golden(&fixture(name));
        let (want, tmp) = converted_reference(name, &g.ids, "gguf-q8");
        let source = tmp.clone().unwrap_or_else(|| fixture(name));
        let ours = prefill_logits(&source, &with_quantize(Some("q8_0")), &g.ids);
        let theirs = prefill_logits(&converted(name, "q8_0"), &with_quantize(None), &g.ids);
        if let Some(dir) = tmp {
            std::fs::remove_dir_all(dir).ok();
        }
        let (between, ours_ref, theirs_ref) = (
            worst(&ours, &theirs),
            worst(&ours, &want),
            worst(&theirs, &want),
        );
        eprintln!(
            "{name}: q8_0 at load vs llama.cpp's q8_0 {between:.2e}; vs reference: ours {ours_ref:.3}, llama.cpp's {theirs_ref:.3}"
        );
        assert!(ours_ref < 0.2 && theirs_ref < 0.2, "{name}");
        assert!(between < ours_ref.min(theirs_ref), "{name}: {between}");
        if matches!(
            name,
            "glm4-thudm" | "glm4-0414-hub" | "llama3-hub" | "qwen2-tied-hub"
        ) {
            // Every matrix is Q8_0 on both sides (none kept in F16): the same quantized
            // values; Llama's GGUF differs only by the Q/K row permutation of its RoPE.
            assert!(between < 1e-5, "{name}: {between}");
        }
    }
}

/// --quantize is for safetensors checkpoints: on a GGUF it is a clear error.
#[test]
fn quantize_on_a_gguf_is_refused() {
    let path = converted("llama3-hub", "f32");
    let err =
        match inferd::models::load_model_with(&path, &Device::Cpu, &with_quantize(Some("q4_k"))) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        };
    assert!(
        err.contains("--quantize q4_k") && err.contains("GGUF"),
        "{err}"
    );
}

/// `--quantize` on every family: Q8_0 stays within 0.2 of the f32 reference (logits of std
/// ~0.6; 8-bit activations included) with the reference's greedy token at all but at most one
/// position; fewer bits cost more — q5_k (here Q5_1: the fixtures' 64-wide rows are not whole
/// 256-element super-blocks, and the head Q8_0) and q4_k (here Q5_0; either may be the closer
/// on random weights) land between q8_0 and q4_0.
#[test]
fn quantized_at_load_stays_close_to_the_reference() {
    for name in [
        "llama3-hub",
        "qwen2-tied-hub",
        "glm4-hf-hub",
        "glm4-thudm",
        "glm4-0414-hub",
        "deepseek-v2-lite-hub",
        "deepseek-v2-grouped",
    ] {
        let mut diffs = Vec::new();
        for q in ["q8_0", "q5_k", "q4_k", "q4_0"] {
            let (d, agree, n) = quantized_prefill(&fixture(name), q);
            eprintln!("{name} {q}: max logit difference {d:.4}, greedy agreement {agree}/{n}");
            if q == "q8_0" {
                assert!(d < 0.2 && agree + 1 >= n, "{name} {q}: {d}, {agree}/{n}");
            }
            diffs.push(d);
        }
        let (q8, q4_0) = (diffs[0], diffs[3]);
        assert!(
            diffs[1..3].iter().all(|&d| q8 < d && d < q4_0),
            "{name}: {diffs:?}"
        );
    }
}

/// A copy of fixture `name` with its tensors stored as `dtype` (after rounding to bf16 when
/// `round_bf16`), in a fresh directory.
fn retyped_fixture(name: &str, tag: &str, dtype: DType, round_bf16: bool) -> PathBuf {
    let src = fixture(name);
    let dir = std::env::temp_dir().join(format!("inferd-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let st = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let st: std::collections::HashMap<String, Tensor> = st
        .into_iter()
        .map(|(k, t)| {
            let t = if round_bf16 {
                t.to_dtype(DType::BF16).unwrap()
            } else {
                t
            };
            (k, t.to_dtype(dtype).unwrap())
        })
        .collect();
    candle_core::safetensors::save(&st, dir.join("model.safetensors")).unwrap();
    dir
}

/// A bf16 checkpoint on the CPU keeps its matrices in bf16 (inferd's bf16 kernel, f32
/// activations) instead of an f32 copy twice its size: its logits are those of an f32
/// checkpoint holding the same bf16-rounded values (to f32 summation order), and near the
/// f32 reference — tied (Qwen2) and untied (Llama, DeepSeek) heads alike.
#[test]
fn bf16_checkpoints_run_as_bf16_with_f32_activations() {
    for name in ["qwen2-tied-hub", "llama3-hub", "deepseek-v2-lite-hub"] {
        let g = golden(&fixture(name));
        let bf16 = retyped_fixture(name, &format!("bf16-{name}"), DType::BF16, true);
        let rounded = retyped_fixture(name, &format!("bf16r-{name}"), DType::F32, true);
        let opts = with_quantize(None);
        let a = prefill_logits(&bf16, &opts, &g.ids);
        let b = prefill_logits(&rounded, &opts, &g.ids);
        std::fs::remove_dir_all(&bf16).ok();
        std::fs::remove_dir_all(&rounded).ok();
        let (same, vs_ref) = (worst(&a, &b), worst(&a, &g.logits));
        eprintln!("{name}: bf16 checkpoint vs its f32 copy {same:.2e}, vs reference {vs_ref:.3}");
        assert!(same < 1e-4, "{name}: {same}");
        assert!(vs_ref < 0.1, "{name}: {vs_ref}");
    }
}

/// A deepseek2 file routed as llama.cpp routes it: llama.cpp ranks expert groups by the sum
/// of their two best scores (DeepSeek-V3's rule) for every model with groups, where
/// DeepSeek-V2's `group_limited_greedy` — what inferd serves, matching transformers — ranks
/// them by their best score. With the grouped fixture the two pick different experts at 5 of
/// its 14 positions (logits up to 2.6 apart).
fn deepseek_as_llama_cpp_routes(path: &Path) -> Box<dyn CausalLm> {
    use inferd::models::deepseek2::DeepseekV2Config;
    use inferd::models::family::FamilyConfig;
    use inferd::models::layers::TopkMethod;
    use inferd::models::loader::{read_gguf_header, GgufMeta};
    use inferd::models::weights::Weights;
    let w = Weights::gguf(path, read_gguf_header(path).unwrap(), &Device::Cpu).unwrap();
    let header = read_gguf_header(path).unwrap();
    let md = GgufMeta::new(&header).unwrap();
    let mut cfg = DeepseekV2Config::from_gguf(&md, &w).unwrap();
    assert_eq!(cfg.topk_method, TopkMethod::GroupLimitedGreedy);
    cfg.topk_method = TopkMethod::GroupTopTwoSum;
    Box::new(cfg).load(&w, 64).unwrap()
}

/// llama.cpp's own reading of the Q8_0 files (`make_gguf_fixtures.py --llama-cpp-goldens`,
/// llama-cpp-python 0.3.36 over the same tree): inferd's logits on the same file agree with
/// its logits at every position of the fixture sequence, and 12 greedy tokens after it are
/// llama.cpp's — DeepSeek-V2 routed by llama.cpp's group rule (above). (V2-Lite is absent:
/// llama.cpp tells V2-Lite by its layer count, 26 or 27, and refuses a 3-layer file without
/// `q_lora_rank`.)
#[test]
fn llama_cpp_reads_the_q8_0_files_as_inferd_does() {
    let goldens: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("gguf").join("llama_cpp_goldens.json")).unwrap(),
    )
    .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for (name, g) in goldens.as_object().unwrap() {
        let input = ids(&g["input_ids"]);
        let want_greedy = ids(&g["greedy"]);
        let theirs: Vec<Vec<f32>> = g["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect();
        let path = converted(name, "q8_0");
        let m = if name.starts_with("deepseek") {
            deepseek_as_llama_cpp_routes(&path)
        } else {
            load_model(&path, &Device::Cpu, Some(64)).unwrap().model
        };
        let mut kv = KvCache::new(m.cache_spec(), BLOCKS, BS);
        let table: Vec<u32> = (0..12).collect();
        let rows = run(m.as_ref(), &mut kv, &[(&input, 0, table.clone())], true);
        let d = worst(&rows, &theirs);
        // Follow llama.cpp's greedy tokens: each must be inferd's top token too, or within the
        // logits' agreement bound of it (0.05; DeepSeek, whose routed experts are scaled by 16:
        // 0.15) — a near tie that 8-bit activations and f16 caches may break either way.
        let tie = if name.starts_with("deepseek") {
            0.15
        } else {
            0.05
        };
        let mut last = rows.last().unwrap().clone();
        let (mut exact, mut pos) = (0, input.len());
        for &want in &want_greedy {
            let best = last.iter().copied().fold(f32::MIN, f32::max);
            let gap = best - last[want as usize];
            assert!(
                gap <= tie,
                "{name}: llama.cpp's token {want} is {gap} below inferd's top"
            );
            exact += usize::from(gap == 0.0);
            last = run(m.as_ref(), &mut kv, &[(&[want], pos, table.clone())], false).remove(0);
            pos += 1;
        }
        eprintln!(
            "{name}: logits vs llama.cpp {d:.2e}; llama.cpp's greedy token is inferd's top at {exact}/{} steps",
            want_greedy.len()
        );
        if !name.starts_with("deepseek") {
            assert!(exact + 2 >= want_greedy.len(), "{name}: {exact}");
        }
        let d_max = if name.starts_with("deepseek") {
            0.15
        } else {
            0.05
        };
        assert!(d < d_max, "{name}: {d}");
    }
}

/// Context-extension scaling past the original window (`make_reference_fixtures.py long`: 48
/// tokens, `original_max_position_embeddings` 16): Qwen2's YaRN in the hub's form, Llama
/// 3.1's llama3, GLM-4's `rope_ratio` (THUDM layout, 500 as in glm-4-9b-chat-1m) and
/// DeepSeek-V2's YaRN with mscale — prefill of every position, token-by-token decode through
/// the paged cache, and a chunk at an offset past the window, each within 1e-4 of transformers.
#[test]
fn rope_scaling_matches_the_reference_past_the_original_window() {
    for name in [
        "qwen2-yarn-long",
        "llama3-long",
        "glm4-thudm-rope-ratio-long",
        "deepseek-v2-yarn-long",
    ] {
        let dir = fixture(name);
        let g = golden(&dir);
        assert_eq!(g.ids.len(), 48);
        let m = load_model(&dir, &Device::Cpu, Some(64)).unwrap().model;
        let table: Vec<u32> = (0..12).rev().collect();
        let mut kv = KvCache::new(m.cache_spec(), BLOCKS, BS);
        let rows = run(m.as_ref(), &mut kv, &[(&g.ids, 0, table.clone())], true);
        let prefill = worst(&rows, &g.logits);
        let mut kv = KvCache::new(m.cache_spec(), BLOCKS, BS);
        let mut decode = 0f32;
        for i in 0..g.ids.len() {
            let rows = run(
                m.as_ref(),
                &mut kv,
                &[(&g.ids[i..=i], i, table.clone())],
                false,
            );
            decode = decode.max(worst(&rows, &g.logits[i..=i]));
        }
        let mut kv = KvCache::new(m.cache_spec(), BLOCKS, BS);
        run(
            m.as_ref(),
            &mut kv,
            &[(&g.ids[..20], 0, table.clone())],
            false,
        );
        let rows = run(
            m.as_ref(),
            &mut kv,
            &[(&g.ids[20..], 20, table.clone())],
            true,
        );
        let chunk = worst(&rows, &g.logits[20..]);
        eprintln!("{name}: prefill {prefill:.1e}, decode {decode:.1e}, chunk {chunk:.1e}");
        assert!(prefill < TOL && decode < TOL && chunk < TOL, "{name}");
    }
    // Without the scaling the same weights are far from the reference: the fixtures test it.
    for (name, unscaled) in [
        ("qwen2-yarn-long", serde_json::json!({"rope_scaling": null})),
        (
            "glm4-thudm-rope-ratio-long",
            serde_json::json!({"rope_ratio": 1}),
        ),
    ] {
        let g = golden(&fixture(name));
        let dir = altered_fixture(name, "unscaled", unscaled);
        let m = load_model(&dir, &Device::Cpu, Some(64)).unwrap().model;
        std::fs::remove_dir_all(&dir).ok();
        let mut kv = KvCache::new(m.cache_spec(), BLOCKS, BS);
        let rows = run(m.as_ref(), &mut kv, &[(&g.ids, 0, (0..12).collect())], true);
        let d = worst(&rows, &g.logits);
        assert!(d > 1e-2, "{name} unscaled: {d}");
    }
}
