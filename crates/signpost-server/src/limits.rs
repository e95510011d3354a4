//! Turns tonic's answer to an oversized request (`OUT_OF_RANGE`, which its decoder gives before
//! any handler runs) into `RESOURCE_EXHAUSTED` naming the limit, as every other limit answers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http::{self, HeaderValue};
use tower::{Layer, Service};

/// Wraps the whole server; `limit` is the request size the registry service is built with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestSizeLayer {
    pub(crate) limit: usize,
}

impl<S> Layer<S> for RequestSizeLayer {
    type Service = RequestSize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSize {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RequestSize<S> {
    inner: S,
    limit: usize,
}

const OUT_OF_RANGE: &str = "11";
const TOO_LARGE: &str = "decoded message length too large";

impl<S, B, R> Service<http::Request<B>> for RequestSize<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let limit = self.limit;
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            let headers = response.headers_mut();
            let too_large = headers
                .get("grpc-status")
                .is_some_and(|s| s == OUT_OF_RANGE)
                && headers
                    .get("grpc-message")
                    .and_then(|m| m.to_str().ok())
                    // grpc-message is percent-encoded.
                    .is_some_and(|m| m.replace("%20", " ").contains(TOO_LARGE));
            if too_large {
                headers.insert("grpc-status", HeaderValue::from_static("8"));
                if let Ok(message) = HeaderValue::try_from(format!(
                    "limit%20max_request_size%20({limit}%20bytes)%20exceeded"
                )) {
                    headers.insert("grpc-message", message);
                }
            }
            Ok(response)
        })
    }
}
