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
//! - What hyper cannot parse (a malformed request line, more header fields or bytes than it
//!   buffers) it answers itself with an empty body; [`ShapedErrors`] gives those answers
//!   OpenAI's error body too, and a connection closed while its request head is unfinished
//!   (the header deadline) gets a 408 in that shape; idle ones close silently.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

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

/// Serve `routes` on `listener` until `shutdown` resolves, then stop accepting (the listener
/// closes, so a balancer's next connection is refused and goes elsewhere) and wait for the
/// open connections to finish their requests. Each request is routed by the router `routes`
/// holds when it arrives, so a keep-alive connection opened while the models loaded gets the
/// full API once they have.
pub async fn run(
    listener: TcpListener,
    routes: watch::Receiver<Router>,
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
        let routes = routes.clone();
        let service = TowerToHyperService::new(tower::service_fn(move |req| {
            let router = routes.borrow().clone();
            router.oneshot(req)
        }));
        let io = TokioIo::new(ShapedErrors::new(stream, limits.header_read_timeout));
        let conn = graceful.watch(builder.serve_connection(io, service));
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

/// A connection whose writes pass through unchanged, except hyper's own answers to requests it
/// could not parse: a response head with a 4xx status and `content-length: 0` (the router's
/// errors always carry a body) gets OpenAI's error body. Not vectored, so hyper writes each
/// response head as one buffer. Dropped with request bytes read and nothing answered (hyper
/// gave up at the header deadline), it answers 408.
struct ShapedErrors {
    inner: TcpStream,
    /// A rewritten answer not yet fully written.
    pending: Vec<u8>,
    sent: usize,
    /// Bytes arrived since the last answer was written.
    unanswered: bool,
    header_read_timeout: Duration,
}

impl ShapedErrors {
    fn new(inner: TcpStream, header_read_timeout: Duration) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            sent: 0,
            unanswered: false,
            header_read_timeout,
        }
    }
}

impl Drop for ShapedErrors {
    fn drop(&mut self) {
        if !self.unanswered || !self.pending.is_empty() {
            return;
        }
        let error = ApiError::HeaderTimeout(self.header_read_timeout.as_secs());
        let body = serde_json::to_string(&error.response()).unwrap_or_default();
        let response = format!(
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        // Best effort and never blocking: a fresh socket's buffer takes it whole.
        let _ = self.inner.try_write(response.as_bytes());
    }
}

/// `head` with an OpenAI error body, if it is hyper's body-less answer to an unparsable
/// request.
fn shape_hyper_error(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let status = text.strip_prefix("HTTP/1.1 4")?.get(..2)?;
    if !text.ends_with("\r\n\r\n") || !text.contains("\r\ncontent-length: 0\r\n") {
        return None;
    }
    let error = match status {
        "31" => {
            ApiError::HeadersTooLarge("more header fields or bytes than the server reads".into())
        }
        _ => ApiError::BadHttp("the request line or headers could not be parsed".into()),
    };
    let body = serde_json::to_string(&error.response()).ok()?;
    let head = text.replace(
        "\r\ncontent-length: 0\r\n",
        &format!(
            "\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        ),
    );
    Some(format!("{head}{body}").into_bytes())
}

impl ShapedErrors {
    /// Write out what is pending.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ShapedErrors {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.unanswered = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ShapedErrors {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        self.unanswered = false;
        if let Some(shaped) = shape_hyper_error(buf) {
            self.pending = shaped;
            // Taken whole: the rest is written by later polls (and by flush).
            let _ = self.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::shape_hyper_error;

    #[test]
    fn hypers_bodyless_errors_get_an_openai_body_and_nothing_else_changes() {
        let shaped = shape_hyper_error(
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
        )
        .unwrap();
        let text = String::from_utf8(shaped).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        assert!(head.contains("content-type: application/json"), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let shaped = shape_hyper_error(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n",
        )
        .unwrap();
        assert!(String::from_utf8(shaped)
            .unwrap()
            .contains("request_header_fields_too_large"));
        // The router's own answers, bodies and successes pass through.
        for other in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 12\r\n\r\n",
            b"data: {\"a\": 1}\n\n",
        ] {
            assert_eq!(shape_hyper_error(other), None);
        }
    }
}
