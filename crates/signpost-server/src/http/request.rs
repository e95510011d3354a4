//! What every HTTP API handler shares: the request as handlers read it (query, token,
//! namespace, a bounded body) and the answers as Consul gives them (plain-text errors with its
//! status codes, JSON with the `X-Consul-*` headers its clients read). A leaf: it knows no
//! handler.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};

use crate::Registry;
use crate::auth::Principal;
use crate::error::Error;

/// How long a request's body may take to arrive, whole.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// A request as the handlers read it.
pub(crate) struct Call {
    pub(crate) method: Method,
    pub(crate) path: String,
    /// Each query parameter's values, in order (`tag` repeats).
    pub(crate) query: HashMap<String, Vec<String>>,
    pub(crate) headers: hyper::HeaderMap,
    pub(crate) peer: SocketAddr,
    pub(crate) body: Incoming,
}

impl Call {
    pub(crate) fn new(request: Request<Incoming>, peer: SocketAddr) -> Call {
        let (parts, body) = request.into_parts();
        Call {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(parse_query).unwrap_or_default(),
            headers: parts.headers,
            peer,
            body,
        }
    }

    /// The first value of a query parameter.
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.query
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    pub(crate) fn params(&self, name: &str) -> &[String] {
        self.query.get(name).map_or(&[], Vec::as_slice)
    }

    /// A flag parameter: present, and not set to false (`?passing`, `?passing=1`, `?passing=true`).
    pub(crate) fn flag(&self, name: &str) -> bool {
        self.param(name)
            .is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "false" | "0" | "no"))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    }

    /// The caller's token, however a Consul client sends it: `X-Consul-Token`, `?token=`, or
    /// `Authorization: Bearer`.
    pub(crate) fn principal(&self, registry: &Registry) -> Result<Option<Principal>, Failure> {
        let bearer = self
            .header("x-consul-token")
            .or_else(|| self.param("token").filter(|t| !t.is_empty()))
            .map(|t| format!("Bearer {t}"));
        let header = bearer.as_deref().or_else(|| self.header("authorization"));
        registry.authenticate_header(header).map_err(Failure::from)
    }

    /// The Signpost namespace: Consul's `ns` parameter or `X-Consul-Namespace` header.
    pub(crate) fn namespace(&self) -> Result<String, Failure> {
        let ns = self
            .param("ns")
            .or_else(|| self.header("x-consul-namespace"))
            .unwrap_or_default();
        crate::validate::namespace("ns", ns.to_owned()).map_err(Failure::from)
    }

    /// The body as JSON, at most `limit` bytes.
    pub(crate) async fn json(self, limit: usize) -> Result<serde_json::Value, Failure> {
        let too_large = || {
            Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body too large: at most {limit} bytes"),
            )
        };
        // Refused before a byte of it is read, when the client says its size up front.
        if self
            .header("content-length")
            .and_then(|l| l.parse::<u64>().ok())
            .is_some_and(|l| l > limit as u64)
        {
            return Err(too_large());
        }
        let read = Limited::new(self.body, limit).collect();
        // A client that announces a body and stalls does not hold the connection for ever.
        let bytes = tokio::time::timeout(BODY_TIMEOUT, read)
            .await
            .map_err(|_| {
                Failure::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
                )
            })?
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    too_large()
                } else {
                    Failure::bad_request(format!("Cannot read the request body: {e}"))
                }
            })?
            .to_bytes();
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| Failure::bad_request(format!("Request decode failed: {e}")))
    }
}

/// `a=1&b=x%20y&tag=1&tag=2`, decoded.
fn parse_query(query: &str) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.entry(decode(k)).or_default().push(decode(v));
    }
    out
}

/// Percent-decoding of a URL part; `+` is a space in a query. Bad escapes stay as they are.
pub(crate) fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |at: usize| {
            bytes
                .get(at)
                .and_then(|c| char::from(*c).to_digit(16))
                .and_then(|d| u8::try_from(d).ok())
        };
        match b {
            b'%' => match (hex(i + 1), hex(i + 2)) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b),
            },
            b'+' => out.push(b' '),
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An answer that is not a success: a status and a line of plain text, as Consul answers.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        use signpost_store::Error as Store;
        let message = error.to_string();
        let status = match &error {
            Error::Invalid { .. } | Error::Store(Store::Invalid { .. }) => StatusCode::BAD_REQUEST,
            Error::Unimplemented(_) => StatusCode::BAD_REQUEST,
            // Consul answers every ACL refusal with 403, and its clients expect that.
            Error::Unauthenticated(_) | Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Error::ResourceExhausted(_) | Error::Store(Store::Limit { .. }) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Error::Store(Store::LeaseNotFound(_)) => StatusCode::NOT_FOUND,
            Error::Store(Store::Conflict(_)) => StatusCode::CONFLICT,
            Error::Store(Store::Unavailable(_) | Store::Open { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let message = match error {
            Error::Store(Store::Limit { name, limit, scope }) => {
                Error::limit(name, limit, &scope).to_string()
            }
            _ => message,
        };
        Failure::new(status, message)
    }
}

/// A JSON answer with its Consul index (`None` for answers that have none).
pub(crate) fn json(value: &impl serde::Serialize, index: Option<u64>) -> Response<Full<Bytes>> {
    let body = match serde_json::to_vec(value) {
        Ok(body) => body,
        Err(e) => {
            return failure(Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot write the answer: {e}"),
            ));
        }
    };
    let mut response = Response::builder()
        .header(hyper::header::CONTENT_TYPE, "application/json")
        // Every answer is read from the registry's own state: there is always a leader and
        // nothing to be behind.
        .header("x-consul-knownleader", "true")
        .header("x-consul-lastcontact", "0");
    if let Some(index) = index {
        response = response.header("x-consul-index", index.max(1).to_string());
    }
    response
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// A success with nothing to say, as Consul answers a write.
pub(crate) fn empty() -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::new()))
}

pub(crate) fn failure(failure: Failure) -> Response<Full<Bytes>> {
    let mut text = failure.message;
    text.push('\n');
    Response::builder()
        .status(failure.status)
        .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded_and_repeat() {
        let q = parse_query("tag=a&tag=b%20c&filter=Service.ID+%3D%3D+%22x%22&passing");
        assert_eq!(q["tag"], ["a", "b c"]);
        assert_eq!(q["filter"], ["Service.ID == \"x\""]);
        assert_eq!(q["passing"], [""]);
        assert_eq!(decode("100%"), "100%");
    }
}
