//! The one error type of the store, with variants a caller can act on.

/// What went wrong in a store operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The lease does not exist: it was never granted, expired, or was revoked.
    #[error("lease {0} not found: it expired, was revoked, or never existed")]
    LeaseNotFound(u64),
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
    /// A write's [`Condition`](crate::Condition) did not hold: nothing was changed.
    #[error("{0}")]
    Conflict(String),
    /// A write would go past a [`Quota`](crate::Quota): nothing was changed. `scope` says where
    /// (" in default/pay"), ready to follow the limit's name and value.
    #[error("limit reached: {name} ({limit}){scope}")]
    Limit {
        name: &'static str,
        limit: u64,
        scope: String,
    },
    /// The backend cannot be reached or is shutting down; retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
