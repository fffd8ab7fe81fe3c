//! Storage backends behind the capability traits. [`embedded`] keeps everything in
//! one redb file in the data directory; the NATS JetStream backend (cluster mode)
//! joins it later. Capabilities see traits (e.g. [`crate::registry::RegistryStore`]),
//! never a backend's tables.

pub mod embedded;
pub mod embedded_twins;
pub mod nats;

use std::path::PathBuf;

use async_trait::async_trait;

/// Whether a backend answers; `/readyz` asks it.
#[async_trait]
pub trait StoreHealth: Send + Sync + 'static {
    /// Completes a trivial read, or says why it cannot.
    async fn ping(&self) -> Result<(), StoreError>;
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
