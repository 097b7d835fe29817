//! Per-RPC metrics as a tower layer around every service: the method from the path,
//! the status code from the response (headers for a trailers-only error, else the
//! trailers at the end of the body), and the time from the request to that end. A
//! response the client abandons counts as CANCELLED.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;

use crate::metrics::{Registry, RpcStats};

/// More distinct paths than this (a scan of made-up methods) share one entry.
const MAX_PATHS: usize = 256;

#[derive(Clone)]
pub struct RpcMetricsLayer {
    pub registry: Arc<Registry>,
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            registry: self.registry.clone(),
            paths: Arc::default(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    registry: Arc<Registry>,
    paths: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl<S, B> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = {
            let p = req.uri().path();
            let mut paths = self.paths.lock().expect("paths lock");
            if paths.contains(p) || paths.len() < MAX_PATHS {
                paths.insert(p.to_string());
                p.to_string()
            } else {
                "/other/other".to_string()
            }
        };
        let stats = self.registry.rpc(&path);
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            if let Some(code) = status_of(res.headers()) {
                record(&stats, code, start);
                return Ok(res);
            }
            let (parts, body) = res.into_parts();
            let body = Observed {
                inner: body,
                stats,
                start,
                done: false,
            };
            Ok(http::Response::from_parts(parts, Body::new(body)))
        })
    }
}

fn status_of(h: &http::HeaderMap) -> Option<usize> {
    h.get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
}

fn record(stats: &RpcStats, code: usize, start: Instant) {
    stats.codes[code.min(16)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    stats.latency.observe_duration(start.elapsed());
}

/// A response body that records the call when its trailers pass (or when it is
/// dropped unfinished).
struct Observed {
    inner: Body,
    stats: Arc<RpcStats>,
    start: Instant,
    done: bool,
}

impl Observed {
    fn finish(&mut self, code: usize) {
        if !self.done {
            self.done = true;
            record(&self.stats, code, self.start);
        }
    }
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of) {
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(s))) => {
                let code = s.code() as usize;
                self.finish(code);
            }
            Poll::Ready(None) => self.finish(0),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.finish(1); // CANCELLED: the client went away first
    }
}
