//! The admin endpoint: `/metrics` (Prometheus text), `/healthz` (the process is serving) and `/readyz`
//! (its edges are connected and its output is writable; not while starting or shutting down).
//!
//! A deliberately small HTTP/1.1 responder on tokio: GET only, one request per connection, bounded
//! request size and read time. Scrapers and probes need no more, and it keeps a web framework out of
//! the dependency tree. Bound to loopback by default (`--metrics-addr`): metrics name hosts and ports.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;

/// Longest request head accepted (a GET line and a few headers).
const MAX_REQUEST: usize = 8 * 1024;
/// A client that has not sent its request by then is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The admin endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "metrics address {addr} is in use (another tcplake, or another exporter?): choose another \
         with --metrics-addr, or `--metrics-addr off`"
    )]
    InUse { addr: SocketAddr },
    #[error("cannot listen on metrics address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the endpoint's socket (separately from serving, so a busy port is reported before work starts).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr).await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            AdminError::InUse { addr }
        } else {
            AdminError::Bind { addr, source }
        }
    })
}

/// Serves until the runtime stops.
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let metrics = Arc::clone(&metrics);
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &metrics).await {
                            tracing::debug!(error = %e, "admin request failed");
                        }
                    });
                }
                // Out of file descriptors and the like: back off rather than spin.
                Err(e) => {
                    tracing::warn!(error = %e, "admin endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            buf.extend_from_slice(&chunk[..n]);
            if n == 0 || buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() >= MAX_REQUEST {
                return Ok::<_, std::io::Error>(());
            }
        }
    })
    .await;
    let (status, body) = match head {
        Err(_) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(())) => respond(&buf, metrics),
    };
    let (code, content_type) = match status {
        200 => ("200 OK", "text/plain; version=0.0.4; charset=utf-8"),
        404 => ("404 Not Found", "text/plain; charset=utf-8"),
        405 => ("405 Method Not Allowed", "text/plain; charset=utf-8"),
        _ => ("503 Service Unavailable", "text/plain; charset=utf-8"),
    };
    let response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Status and body for a request head.
fn respond(head: &[u8], metrics: &Metrics) -> (u16, String) {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return (405, "only GET\n".into());
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => (200, metrics.render_prometheus()),
        "/healthz" => (200, "ok\n".into()),
        "/readyz" => match metrics.health.check() {
            Ok(()) => (200, "ready\n".into()),
            Err(why) => (503, format!("not ready: {why}\n")),
        },
        _ => (404, "try /metrics, /healthz or /readyz\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let m = Metrics::default();
        assert_eq!(respond(b"GET /healthz HTTP/1.1\r\n\r\n", &m).0, 200);
        let (code, body) = respond(b"GET /readyz HTTP/1.1\r\n\r\n", &m);
        assert_eq!((code, body.as_str()), (503, "not ready: starting\n"));
        m.health.set_ready();
        assert_eq!(respond(b"GET /readyz HTTP/1.1\r\n\r\n", &m).0, 200);
        m.health.set_not_ready("shutting down");
        assert_eq!(
            respond(b"GET /readyz HTTP/1.1\r\n\r\n", &m).1,
            "not ready: shutting down\n"
        );
        let (code, body) = respond(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", &m);
        assert_eq!(code, 200);
        assert!(body.contains("tcplake_capture_events_total 0"));
        assert_eq!(respond(b"POST /metrics HTTP/1.1\r\n\r\n", &m).0, 405);
        assert_eq!(respond(b"GET / HTTP/1.1\r\n\r\n", &m).0, 404);
        assert_eq!(respond(b"\xff\xfe", &m).0, 405);
    }
}
