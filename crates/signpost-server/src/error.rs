//! The one place where errors become `tonic::Status`. Handlers return [`Error`] and use `?`.

use tonic::Status;

/// What a request can fail with, before it is turned into a status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input; the message names the field.
    #[error("{field} {reason}")]
    Invalid { field: String, reason: String },
    /// A feature the request asks for that this server does not offer.
    #[error("{0}")]
    Unimplemented(String),
    /// No access token, or one the server does not know.
    #[error("{0}")]
    Unauthenticated(String),
    /// A known token without the grant the request needs; names the verb and namespace only.
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit was reached; names the limit and its value.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error(transparent)]
    Store(#[from] signpost_store::Error),
}

impl Error {
    pub(crate) fn limit(name: &str, value: impl std::fmt::Display, context: &str) -> Self {
        Error::ResourceExhausted(format!("limit {name} ({value}) reached{context}"))
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        use signpost_store::Error as Store;
        let message = error.to_string();
        match error {
            Error::Invalid { .. } | Error::Store(Store::Invalid { .. }) => {
                Status::invalid_argument(message)
            }
            Error::Unimplemented(_) => Status::unimplemented(message),
            Error::Unauthenticated(_) => Status::unauthenticated(message),
            Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::ResourceExhausted(_) => Status::resource_exhausted(message),
            Error::Store(Store::LeaseNotFound(_)) => Status::not_found(message),
            // Worded as every other limit: "limit NAME (VALUE) reached in SCOPE".
            Error::Store(Store::Limit { name, limit, scope }) => {
                Status::resource_exhausted(Error::limit(name, limit, &scope).to_string())
            }
            Error::Store(Store::Conflict(_)) => Status::failed_precondition(message),
            Error::Store(Store::Unavailable(_) | Store::Open { .. }) => {
                Status::unavailable(message)
            }
        }
    }
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;
