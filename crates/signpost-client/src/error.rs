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
    /// The registry wants an access token ([`ClientBuilder::token`](crate::ClientBuilder::token)),
    /// or does not know the one sent.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// The token does not grant this; the message names the verb and namespace.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The registry answered with another error status.
    #[error("registry error: {} ({:?})", .0.message(), .0.code())]
    Status(#[from] tonic::Status),
    /// The registration or channel was stopped.
    #[error("stopped")]
    Stopped,
}

impl Error {
    /// Errors worth retrying: the registry is unreachable, overloaded, or restarting.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable { .. } => true,
            Error::Status(status) => matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
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
