//! The one error type of the store, with variants a caller can act on.

use crate::LeaseId;

/// What went wrong in a store operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The lease does not exist: it was never granted, expired, or was revoked.
    #[error("lease {0} not found: it expired, was revoked, or never existed")]
    LeaseNotFound(LeaseId),
    /// An argument the store itself checks (for example a ttl of zero).
    #[error("{field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// A durable store's data directory cannot be used: missing permission, in use by another
    /// process, or corrupt.
    #[error("cannot open the data directory {path}: {reason}")]
    Open {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The backend cannot be reached or is shutting down; retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
