//! The HTTP server under the router: accepts connections up to a cap, gives each a
//! header-read deadline, and shuts down gracefully. (axum's `serve` sets neither timeouts nor a
//! cap: slowloris connections and idle keep-alive connections stayed open forever, and enough
//! of them exhaust file descriptors.)
//!
//! - A connection must deliver a request's complete headers within `header_read_timeout` of
//!   being ready for one: a new connection, a slow sender (one byte every few seconds) and an
//!   idle keep-alive connection waiting for its next request are all closed when it passes
//!   (hyper's HTTP/1 header timer, which runs exactly while a request head is awaited). A
//!   response being written — a long stream included — is never cut by it.
//! - At most `max_connections` are open at once; one over the cap is answered with a 503 in
//!   OpenAI's shape and closed, so a balancer sees a clean refusal rather than a hang.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::api::ApiError;

/// Header fields hyper parses before refusing a request itself (with a body-less 431); the
/// API's own, lower limit answers in OpenAI's shape (`api::middleware::header_limits`).
pub const MAX_HEADERS: usize = 256;

/// Connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// Serve `router` on `listener` until `shutdown` resolves, then stop accepting and wait for
/// the open connections to finish their requests.
pub async fn run(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    // HTTP/1.1 only: hyper-util's HTTP/1-or-2 detection waits for the first bytes before
    // hyper's header timer starts, which left silent connections open forever. (OpenAI
    // clients speak HTTP/1.1; HTTP/2 belongs behind a TLS-terminating balancer.)
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(MAX_HEADERS);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "connection refused: at the connection cap");
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Answer a connection over the cap with a 503 in OpenAI's shape, then close it.
async fn refuse(mut stream: TcpStream, cap: usize) {
    let body =
        serde_json::to_string(&ApiError::TooManyConnections(cap).response()).unwrap_or_default();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        // Read the request head first: a client that gets an answer before it has sent its
        // request takes it for a protocol error, not a 503.
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while head.len() < 16 << 10 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
