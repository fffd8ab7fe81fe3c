//! The ground's storage vocabulary: the one error type every capability trait returns
//! when its backend fails, the health check `/readyz` asks a backend for, and the
//! cluster view `GET /cluster` asks a clustered backend for. It
//! lives here, not in `store/` (the folder of the backends), so that a capability
//! names storage failures without importing a backend.

use std::path::PathBuf;

use async_trait::async_trait;

/// Whether a backend answers; `/readyz` asks it.
#[async_trait]
pub trait StoreHealth: Send + Sync + 'static {
    /// Completes a trivial read, or says why it cannot.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// What a clustered backend reports about its cluster (`GET /cluster`, `hub cluster
/// status`): nodes, streams, leaders and replicas, as JSON.
#[async_trait]
pub trait ClusterView: Send + Sync + 'static {
    /// The cluster as this hub node sees it, or why it cannot be read.
    async fn status(&self) -> Result<serde_json::Value, StoreError>;
}

/// Failures of a storage backend, shared by every capability trait.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened (corrupt, locked, unreadable, newer schema).
    #[error("cannot open store {path}: {reason}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// redb reported an error during an operation.
    #[error("store error: {0}")]
    Redb(#[from] redb::Error),
    /// A stored record could not be decoded.
    #[error("corrupt record {key:?} in table {table}: {reason}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// The record's key.
        key: String,
        /// Why it does not decode.
        reason: String,
    },
    /// The blocking task running the operation failed.
    #[error("store task failed: {0}")]
    Task(String),
    /// Any other backend failure.
    #[error("store backend: {0}")]
    Backend(String),
}

macro_rules! redb_error_into_store_error {
    ($($ty:ty),*) => {$(
        impl From<$ty> for StoreError {
            fn from(err: $ty) -> Self {
                StoreError::Redb(err.into())
            }
        }
    )*};
}
redb_error_into_store_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
