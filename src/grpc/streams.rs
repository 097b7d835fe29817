//! A bound on the streaming RPCs open at once (`--max-streams`). Each one holds a permit
//! from the moment its request arrives until its response body ends or is dropped (the
//! client went away), so an idle stream counts as long as it is open. Beyond the bound a
//! new stream is answered RESOURCE_EXHAUSTED at once, naming the setting; unary calls are
//! not counted. Which methods stream is read from the API's own descriptor set, so a new
//! streaming RPC is bounded without a list to keep.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;

use crate::metrics::Registry;

/// `/likeness.v1.Items/UpsertStream` and the like: every method that streams requests,
/// responses or both.
fn streaming_paths() -> HashSet<String> {
    let set = prost_types::FileDescriptorSet::decode(super::DESCRIPTOR_SET)
        .expect("the descriptor set built into the binary decodes");
    let mut paths = HashSet::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                if method.client_streaming() || method.server_streaming() {
                    paths.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    paths
}

#[derive(Clone)]
pub struct StreamLimitLayer {
    permits: Arc<Semaphore>,
    max: usize,
    paths: Arc<HashSet<String>>,
    registry: Arc<Registry>,
}

impl StreamLimitLayer {
    pub fn new(max: usize, registry: Arc<Registry>) -> Self {
        registry.streams.set_limit(max);
        StreamLimitLayer {
            permits: Arc::new(Semaphore::new(max)),
            max,
            paths: Arc::new(streaming_paths()),
            registry,
        }
    }
}

impl<S> tower::Layer<S> for StreamLimitLayer {
    type Service = StreamLimit<S>;
    fn layer(&self, inner: S) -> StreamLimit<S> {
        StreamLimit {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct StreamLimit<S> {
    inner: S,
    layer: StreamLimitLayer,
}

impl<S, B> tower::Service<http::Request<B>> for StreamLimit<S>
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
        if !self.layer.paths.contains(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let Ok(permit) = self.layer.permits.clone().try_acquire_owned() else {
            self.layer.registry.streams.refused();
            let status = Status::resource_exhausted(format!(
                "streams: {} are open, the most this daemon serves at once (--max-streams); retry when one closes",
                self.layer.max
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let open = Open::new(permit, self.layer.registry.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            let (parts, body) = res.into_parts();
            let body = Holding {
                inner: body,
                _open: open,
            };
            Ok(http::Response::from_parts(parts, Body::new(body)))
        })
    }
}

/// One open stream: its permit and its place in the gauge, both given back on drop.
struct Open {
    _permit: OwnedSemaphorePermit,
    registry: Arc<Registry>,
}

impl Open {
    fn new(permit: OwnedSemaphorePermit, registry: Arc<Registry>) -> Open {
        registry.streams.opened();
        Open {
            _permit: permit,
            registry,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.registry.streams.closed();
    }
}

/// A response body that keeps its stream counted until it ends or is dropped.
struct Holding {
    inner: Body,
    _open: Open,
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_streaming_methods_are_read_from_the_api() {
        let paths = streaming_paths();
        for p in [
            "/likeness.v1.Items/UpsertStream",
            "/likeness.v1.Embedder/EmbedStream",
            "/likeness.v1.Miner/MineTriplets",
            "/likeness.v1.Miner/Session",
            "/likeness.v1.Miner/MineBatches",
        ] {
            assert!(paths.contains(p), "{p} missing from {paths:?}");
        }
        assert!(!paths.contains("/likeness.v1.Items/Search"));
    }
}
