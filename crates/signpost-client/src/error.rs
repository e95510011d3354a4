//! The client's error type.

/// What a client call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A registry address is not a valid URI.
    #[error("invalid registry address {address:?}: {reason}")]
    InvalidAddress { address: String, reason: String },
    /// The caller's input was refused (by this crate or the registry); retrying will not help.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No registry could be reached; retrying later may succeed.
    #[error("cannot reach registry at {address}: {reason}")]
    Unavailable { address: String, reason: String },
    /// The registry answered, but could not reach the store behind it (an etcd cluster without
    /// quorum, a durable store that stopped); retrying later may succeed, possibly through
    /// another registry.
    #[error("the registry at {address} answered, but its store is unavailable: {reason}")]
    StoreUnavailable { address: String, reason: String },
    /// The registry wants an access token ([`ClientBuilder::token`](crate::ClientBuilder::token)),
    /// or does not know the one sent.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// The token does not grant this; the message names the verb and namespace.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A registry limit was reached (instances in a namespace, watch streams, request size); the
    /// message names the limit. Retrying the same thing will not help until something is freed
    /// or the limit raised.
    #[error("limit reached: {0}")]
    ResourceExhausted(String),
    /// The registry answered with another error status.
    #[error("registry error: {} ({:?})", .0.message(), .0.code())]
    Status(#[from] tonic::Status),
    /// The registry answered, but a balanced channel has no instance that can take calls: none
    /// registered, or none reachable; the message says which.
    #[error("{0}")]
    NoInstance(String),
    /// The registration or channel was stopped.
    #[error("stopped")]
    Stopped,
}

impl Error {
    /// Errors worth retrying: the registry is unreachable, slow, or restarting. A refusal (bad
    /// input, a missing or insufficient token, a limit reached, a precondition, a conflict) is
    /// not: the same call would be refused again.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::StoreUnavailable { .. } | Error::NoInstance(_) => {
                true
            }
            Error::Status(status) => matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Aborted
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::Cancelled
            ),
            _ => false,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn refusals_are_not_transient_and_outages_are() {
        let status = |code| Error::Status(tonic::Status::new(code, "x"));
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::Internal,
            Code::Unknown,
            Code::Cancelled,
        ] {
            assert!(status(code).is_transient(), "{code:?}");
        }
        for code in [
            Code::ResourceExhausted,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::NotFound,
            Code::AlreadyExists,
        ] {
            assert!(!status(code).is_transient(), "{code:?}");
        }
        assert!(!Error::ResourceExhausted("instances per namespace".into()).is_transient());
        assert!(!Error::PermissionDenied("register".into()).is_transient());
        assert!(!Error::Unauthenticated("no token".into()).is_transient());
        assert!(!Error::InvalidArgument("instance.port".into()).is_transient());
        assert!(
            Error::Unavailable {
                address: "http://127.0.0.1:1".into(),
                reason: "connection refused".into()
            }
            .is_transient()
        );
        assert!(
            Error::StoreUnavailable {
                address: "http://127.0.0.1:7070".into(),
                reason: "etcd unreachable: no member could take the request".into()
            }
            .is_transient()
        );
    }
}
