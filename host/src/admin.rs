//! The admin HTTP endpoint on the metrics address (`serve --metrics ADDR`):
//! `/metrics` for Prometheus, `/healthz` (the process answers) and
//! `/readyz` (every listener is bound with its plugin loaded, and the
//! server is not draining) for a load balancer or an orchestrator's probes.
//!
//! HTTP is hyper's (HTTP/1 only, one request per connection); this module
//! only routes and bounds. What the pages hold is others' business: the
//! rendering is [`crate::metrics`]'s, readiness is flipped by
//! [`crate::server`] through [`Readiness`].

use std::convert::Infallible;
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};

/// What `/readyz` says: whether a balancer should send traffic here.
///
/// Starts [`Starting`](ReadyState::Starting); the server makes it
/// [`Ready`](ReadyState::Ready) once every listener serves and
/// [`Draining`](ReadyState::Draining) as the first step of a shutdown. It
/// never goes back.
#[derive(Debug, Default)]
pub struct Readiness(AtomicU8);

/// The states of [`Readiness`], in the only order they are taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReadyState {
    /// Sockets bound and plugins loaded, but not serving yet.
    Starting = 0,
    /// Every listener serves.
    Ready = 1,
    /// Shutting down: still serving for the drain delay, or stopping.
    Draining = 2,
}

impl Readiness {
    /// A new, shareable readiness, [`ReadyState::Starting`].
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The current state.
    pub fn state(&self) -> ReadyState {
        match self.0.load(Ordering::Acquire) {
            0 => ReadyState::Starting,
            1 => ReadyState::Ready,
            _ => ReadyState::Draining,
        }
    }

    /// Moves to `state`, unless a later state has already been reached
    /// (a shutdown that comes while starting stays a shutdown).
    pub fn advance(&self, state: ReadyState) {
        self.0.fetch_max(state as u8, Ordering::AcqRel);
    }
}

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client may take to read the response. The body is some
/// kilobytes; a client that has not taken it in this long is not reading,
/// and would otherwise hold its task and socket forever.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers every connection to `listener`, each on a task of its own.
pub(crate) async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    readiness: Arc<Readiness>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, most likely: give the others a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(answer(stream, handle.clone(), readiness.clone()));
    }
}

/// Answers one request on `stream`, within [`HEAD_TIMEOUT`] for the head
/// and [`HEAD_TIMEOUT`] + [`RESPONSE_TIMEOUT`] in all.
async fn answer(stream: TcpStream, handle: PrometheusHandle, readiness: Arc<Readiness>) {
    // A second handle on the socket, to reset it if the connection is
    // given up (hyper owns the stream until then).
    let reset_handle = stream.as_fd().try_clone_to_owned().ok();
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, &handle, &readiness);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .keep_alive(false)
        // `Content-Type`, as the hand-written responder before it wrote:
        // scripts that grep the head keep working.
        .title_case_headers(true)
        .serve_connection(TokioIo::new(stream), service);
    let served = tokio::time::timeout(HEAD_TIMEOUT + RESPONSE_TIMEOUT, connection).await;
    if served.is_err()
        && let Some(fd) = reset_handle
    {
        // Reset rather than leave the unread rest in the kernel's buffers.
        let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
    }
}

/// The response to `request`.
fn respond(
    request: &Request<Incoming>,
    handle: &PrometheusHandle,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, crate::metrics::render(handle));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match readiness.state() {
            ReadyState::Ready => text(StatusCode::OK, "ready\n"),
            ReadyState::Starting => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            ReadyState::Draining => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n"),
    }
}

/// A plain-text response.
fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_only_moves_forward() {
        let readiness = Readiness::new();
        assert_eq!(readiness.state(), ReadyState::Starting);
        readiness.advance(ReadyState::Ready);
        assert_eq!(readiness.state(), ReadyState::Ready);
        readiness.advance(ReadyState::Draining);
        readiness.advance(ReadyState::Ready);
        assert_eq!(readiness.state(), ReadyState::Draining);
    }
}
