//! inferd: an OpenAI-compatible LLM inference daemon.
//!
//! `api → engine → models → candle`, and `api`/`engine → tokenizer`. [`load`] builds the served
//! models (weights, tokenizer, engine thread); [`serve`] runs the HTTP API on a listener until a
//! shutdown future resolves, so tests can bind port 0.

pub mod api;
pub mod bench;
pub mod config;
pub mod engine;
pub mod eval;
pub mod models;
pub mod server;
pub mod telemetry;
pub mod tokenizer;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use candle_core::Device;
use tokio::net::TcpListener;

use api::{AppState, ServedModel};
use config::{Config, EngineSettings, ModelConfig};
use engine::{spawn_engine, EngineConfig, EngineThread};
use tokenizer::Tokenizer;

/// Load every configured model and start its engine thread. Blocking (reads weights).
pub fn load(config: &Config) -> anyhow::Result<AppState> {
    let kernels = models::layers::simd::KernelPath::from_env().map_err(anyhow::Error::msg)?;
    tracing::info!(
        cpu_kernels = kernels.name(),
        cpu_flags = models::layers::simd::cpu_flags().join(" "),
        "CPU kernel path"
    );
    // First: engines register their metrics with the recorder as they start.
    let metrics = telemetry::install();
    let mut models = Vec::new();
    let mut engines = Vec::new();
    for m in &config.models {
        let (model, engine) = load_model(m)?;
        let model = Arc::new(model);
        // The grammar compiler walks the whole vocabulary (about a second for 150k tokens):
        // build it now, beside serving, rather than in the first constrained request.
        let warm = model.clone();
        let _ = std::thread::Builder::new()
            .name("grammar-warmup".into())
            .spawn(move || warm.grammars.warm());
        models.push(model);
        engines.push(engine);
    }
    Ok(AppState {
        models: Arc::new(models),
        api_key: config.api_key.as_deref().map(Arc::from),
        metrics,
        engines: Arc::new(Mutex::new(engines)),
        stop: Arc::new(tokio::sync::watch::channel(false).0),
        allowed_origins: config.allowed_origins.clone().into(),
        draining: Arc::default(),
    })
}

/// Load one model (weights, tokenizer), size its KV pool and start its engine.
fn load_model(config: &ModelConfig) -> anyhow::Result<(ServedModel, EngineThread)> {
    let path = &config.path;
    let synthetic = models::synthetic::preset_name(path).is_some();
    if !synthetic && !path.exists() {
        bail!(
            "model {} not found (run scripts/fetch-models.sh to fetch the default models, or pass --model)",
            path.display()
        );
    }
    let e = &config.engine;
    let device = models::device::open(e.device.cuda_ordinal())?;
    let started = std::time::Instant::now();
    tracing::info!(model = %path.display(), name = %config.served_model_name, device = %e.device, "loading model");
    let opts = models::LoadOptions {
        max_positions: e.max_model_len,
        dtype: None,
        quantize: e.quantize,
    };
    let loaded = models::load_model_with(path, &device, &opts)
        .with_context(|| format!("loading {}", path.display()))?;
    let model = loaded.model;
    let mut tokenizer = if synthetic {
        Tokenizer::synthetic(model.vocab_size())?
    } else if path.is_dir() {
        Tokenizer::from_hf_dir(path)?
    } else {
        Tokenizer::from_gguf(&models::loader::read_gguf_header(path)?)?
    };
    if let Some(arg) = &config.chat_template {
        let (source, from) = chat_template_source(arg)?;
        tokenizer
            .set_chat_template(&source)
            .with_context(|| format!("--chat-template {from}"))?;
        tracing::info!(name = %config.served_model_name, chat_template = %from, "chat template overridden");
    }
    let cache_dtype = e
        .kv_cache_dtype
        .resolve(device.is_cpu(), model.cache_spec().dtype);
    let spec = models::CacheSpec {
        dtype: cache_dtype,
        ..model.cache_spec()
    };
    if cache_dtype == models::kv_cache::KV_Q8_0 {
        if !device.is_cpu() {
            bail!("--kv-cache-dtype q8_0 is for the CPU (its host cache); use f16 or bf16 on CUDA");
        }
        if let Some(why) = spec.q8_0_unsupported() {
            bail!("--kv-cache-dtype q8_0: {why}");
        }
    }
    let block_bytes = (spec.bytes_per_token() * e.block_size) as u64;
    let kv_bytes = kv_budget(e, &device)?;
    let num_blocks = (kv_bytes / block_bytes) as usize;
    let pool_tokens = num_blocks * e.block_size;
    if num_blocks == 0 {
        bail!(
            "the KV cache budget ({kv_bytes} bytes) holds no block of {} tokens ({block_bytes} bytes each)",
            e.block_size
        );
    }
    let max_model_len = match e.max_model_len {
        Some(m) if m > pool_tokens => bail!(
            "max_model_len {m} does not fit the KV cache ({pool_tokens} tokens); raise --kv-cache-memory"
        ),
        Some(m) => m,
        None => model.max_position_embeddings().min(pool_tokens),
    };
    tracing::info!(
        name = %config.served_model_name,
        architecture = %loaded.architecture,
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        num_blocks,
        kv_tokens = pool_tokens,
        max_model_len,
        prefix_caching = e.enable_prefix_caching,
        kv_cache_dtype = ?cache_dtype,
        threads = models::layers::pool::threads(),
        "model loaded"
    );
    let tokenizer = Arc::new(tokenizer);
    let vocab_size = model.vocab_size();
    let (engine, thread) = spawn_engine(
        &config.served_model_name,
        model,
        tokenizer.clone(),
        EngineConfig {
            max_num_seqs: e.max_num_seqs,
            max_num_batched_tokens: e.max_num_batched_tokens,
            block_size: e.block_size,
            num_blocks,
            max_model_len,
            max_waiting_requests: e.max_waiting_requests,
            enable_prefix_caching: e.enable_prefix_caching,
            cache_dtype,
        },
    )?;
    let served = ServedModel::new(
        config.served_model_name.clone(),
        engine,
        tokenizer,
        vocab_size,
    );
    Ok((served, thread))
}

/// `--chat-template`'s argument: a file's text, or the template itself when no file has that
/// name and it reads as Jinja (vLLM's rule). Also what to call it in logs and errors.
fn chat_template_source(arg: &str) -> anyhow::Result<(String, String)> {
    let path = std::path::Path::new(arg);
    if path.is_file() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--chat-template: reading {}", path.display()))?;
        Ok((text, path.display().to_string()))
    } else if arg.contains("{{") || arg.contains("{%") {
        Ok((arg.to_string(), "(inline template)".into()))
    } else {
        bail!("--chat-template: no file {arg} (and it is not a Jinja template either)")
    }
}

/// Memory still needed beside the KV pool on a GPU once the weights are loaded: activations of
/// one forward pass (a prefill chunk's attention scores are the largest), cuBLAS workspaces.
const GPU_ACTIVATION_RESERVE: u64 = 2 << 30;

/// Bytes for the KV pool: `kv_cache_memory` if given; on a GPU what `gpu_memory_utilization`
/// of its memory leaves after the weights (already loaded) and the activation reserve;
/// 512 MiB on the CPU.
fn kv_budget(e: &EngineSettings, device: &Device) -> anyhow::Result<u64> {
    if let Some(b) = e.kv_cache_memory {
        return Ok(b);
    }
    let Some((free, total)) = models::device::memory_info(device)? else {
        return Ok(512 << 20);
    };
    let allowed = (total as f64 * e.gpu_memory_utilization) as u64;
    let used = total.saturating_sub(free);
    let budget = allowed.saturating_sub(used + GPU_ACTIVATION_RESERVE);
    tracing::info!(
        total_gib = format!("{:.1}", total as f64 / (1u64 << 30) as f64),
        in_use_gib = format!("{:.1}", used as f64 / (1u64 << 30) as f64),
        kv_gib = format!("{:.1}", budget as f64 / (1u64 << 30) as f64),
        gpu_memory_utilization = e.gpu_memory_utilization,
        "sizing the KV cache from GPU memory"
    );
    if budget == 0 {
        bail!(
            "gpu_memory_utilization {} of {total} bytes leaves nothing for the KV cache ({used} bytes in use after loading)",
            e.gpu_memory_utilization
        );
    }
    Ok(budget)
}

/// How long `serve` waits, once the server has stopped, for each engine thread to end.
const ENGINE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How the server runs and stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    /// After the shutdown signal, how long the server goes on accepting new requests while
    /// `/ready` answers 503 (time for balancers and Kubernetes to take it out of rotation).
    pub drain_delay: Duration,
    /// After the drain delay, how long in-flight requests may run.
    pub shutdown_timeout: Duration,
    pub limits: server::ConnectionLimits,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(config::DEFAULT_SHUTDOWN_TIMEOUT_SECS),
            limits: server::ConnectionLimits::default(),
        }
    }
}

impl From<&Config> for ServeOptions {
    fn from(c: &Config) -> Self {
        Self {
            drain_delay: c.drain_delay,
            shutdown_timeout: c.shutdown_timeout,
            limits: c.connection_limits,
        }
    }
}

/// Serve the API of loaded models on `listener` until `shutdown` resolves (see
/// [`serve_loading`]).
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    opts: ServeOptions,
) -> anyhow::Result<()> {
    serve_from(
        Some(state),
        std::future::pending(),
        listener,
        shutdown,
        opts,
    )
    .await
}

/// Serve on `listener` from the start: while `load` runs, liveness answers and everything else
/// says the model is loading ([`api::loading_router`]); then the API. When `shutdown` resolves,
/// drain: `/ready` answers 503 at once, new requests are still served for
/// `opts.drain_delay`, then the listener closes, in-flight requests run for up to
/// `opts.shutdown_timeout`, those still running are ended (streams with an error event and
/// `[DONE]`, the others with a 503), and the engine threads are joined. A failed load ends the
/// server and is returned; a shutdown during the load stops at once.
pub async fn serve_loading(
    load: impl Future<Output = anyhow::Result<AppState>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    opts: ServeOptions,
) -> anyhow::Result<()> {
    serve_from(None, load, listener, shutdown, opts).await
}

/// [`serve`] when `loaded` is given (the API answers from the first connection: no loading
/// phase for an early request to race into), else [`serve_loading`] of `load`.
async fn serve_from(
    loaded: Option<AppState>,
    load: impl Future<Output = anyhow::Result<AppState>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    opts: ServeOptions,
) -> anyhow::Result<()> {
    let first = match &loaded {
        Some(state) => api::router(state.clone()),
        None => api::loading_router(),
    };
    let (routes, routed) = tokio::sync::watch::channel(first);
    let (stop_accepting, accepting) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(listener, routed, opts.limits, async move {
        let _ = accepting.await;
    }));
    let mut shutdown = std::pin::pin!(shutdown);
    let state = match loaded {
        Some(state) => state,
        None => {
            let loaded = tokio::select! {
                loaded = load => loaded,
                () = &mut shutdown => {
                    tracing::info!("shutting down before the models finished loading");
                    let _ = stop_accepting.send(());
                    return Ok(server.await??);
                }
            };
            match loaded {
                Ok(state) => {
                    let _ = routes.send_replace(api::router(state.clone()));
                    state
                }
                Err(e) => {
                    let _ = stop_accepting.send(());
                    let _ = server.await;
                    return Err(e);
                }
            }
        }
    };
    let engines = state
        .engines
        .lock()
        .map(|mut e| std::mem::take(&mut *e))
        .unwrap_or_default();
    let stop = state.stop.clone();
    let draining = state.draining.clone();
    drop(state);
    tracing::info!("ready: serving the API");

    shutdown.await;
    draining.store(true, std::sync::atomic::Ordering::Relaxed);
    if !opts.drain_delay.is_zero() {
        tracing::info!(
            drain_delay_seconds = opts.drain_delay.as_secs_f64(),
            "draining: /ready answers 503; still serving new requests for the drain delay"
        );
        tokio::time::sleep(opts.drain_delay).await;
    }
    let grace = opts.shutdown_timeout;
    tracing::info!(
        grace_seconds = grace.as_secs_f64(),
        "shutting down: no new connections; finishing in-flight requests"
    );
    let _ = stop_accepting.send(());
    let ending = tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        if !stop.is_closed() {
            tracing::warn!("shutdown grace over; ending the remaining requests");
        }
        stop.send_replace(true);
    });
    let served = server.await;
    ending.abort();
    // The router held every engine handle: with it gone (the connections ended, the last
    // copy replaced) each engine aborts what is left of its requests and stops.
    let _ = routes.send_replace(api::loading_router());
    drop(routes);
    let joined = tokio::task::spawn_blocking(move || {
        for e in engines {
            e.join(ENGINE_STOP_TIMEOUT);
        }
    })
    .await;
    if let Err(e) = joined {
        tracing::error!(error = %e, "joining the engine threads failed");
    }
    Ok(served??)
}

#[cfg(test)]
mod tests {
    use super::chat_template_source;

    #[test]
    fn chat_template_is_a_file_or_the_template_itself() {
        let dir = std::env::temp_dir().join(format!("inferd-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.jinja");
        std::fs::write(&file, "{{ messages[0]['content'] }}").unwrap();
        let (text, from) = chat_template_source(file.to_str().unwrap()).unwrap();
        assert_eq!(
            (text.as_str(), from),
            ("{{ messages[0]['content'] }}", file.display().to_string())
        );
        let inline = "{% for m in messages %}{{ m.content }}{% endfor %}";
        assert_eq!(chat_template_source(inline).unwrap().0, inline);
        let missing = dir.join("missing.jinja");
        let err = chat_template_source(missing.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("no file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
