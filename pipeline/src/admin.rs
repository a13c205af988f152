//! The admin endpoint: `/metrics` (OpenMetrics text), `/healthz` (the process is serving) and `/readyz`
//! (its edges are connected and its output is writable; not while starting or shutting down).
//!
//! hyper's HTTP/1 server: GET and HEAD, one request per connection, a bounded request head and read
//! time. Bound to loopback by default (`--metrics-addr`): metrics name hosts and ports.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// Longest request head accepted (hyper's smallest buffer; a GET line and a few headers).
const MAX_REQUEST: usize = 8 * 1024;
/// A client that has not sent its request head by then is dropped.
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
                        let service = hyper::service::service_fn(move |req: Request<_>| {
                            let metrics = Arc::clone(&metrics);
                            async move { Ok::<_, Infallible>(answer(&req, &metrics)) }
                        });
                        let served = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(READ_TIMEOUT)
                            .max_buf_size(MAX_REQUEST)
                            .keep_alive(false)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                        if let Err(e) = served {
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

fn answer<B>(req: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, body) = respond(req.method(), req.uri().path(), metrics);
    let content_type = if status == StatusCode::OK && req.uri().path() == "/metrics" {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Status and body for a request.
fn respond(method: &Method, path: &str, metrics: &Metrics) -> (StatusCode, String) {
    if method != Method::GET && method != Method::HEAD {
        return (StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match path {
        "/metrics" => (StatusCode::OK, metrics.render_prometheus()),
        "/healthz" => (StatusCode::OK, "ok\n".into()),
        "/readyz" => match metrics.health.check() {
            Ok(()) => (StatusCode::OK, "ready\n".into()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let m = Metrics::default();
        let get = Method::GET;
        assert_eq!(respond(&get, "/healthz", &m).0, 200);
        let (code, body) = respond(&get, "/readyz", &m);
        assert_eq!(
            (code.as_u16(), body.as_str()),
            (503, "not ready: starting\n")
        );
        m.health.set_ready();
        assert_eq!(respond(&get, "/readyz", &m).0, 200);
        m.health.set_not_ready("shutting down");
        assert_eq!(respond(&get, "/readyz", &m).1, "not ready: shutting down\n");
        let (code, body) = respond(&Method::HEAD, "/metrics", &m);
        assert_eq!(code, 200);
        assert!(body.contains("tcplake_capture_events_total 0"));
        assert_eq!(respond(&Method::POST, "/metrics", &m).0, 405);
        assert_eq!(respond(&get, "/", &m).0, 404);
    }
}
