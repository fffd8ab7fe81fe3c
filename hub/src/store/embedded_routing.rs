//! The embedded backend's [`RoutingStore`]: the routing configuration's JSON in one
//! redb table of the hub's store.

use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, TableDefinition};

use super::embedded::EmbeddedStore;
use crate::routing::RoutingStore;
use crate::storage::StoreError;

/// The configuration under the key `config`.
const ROUTING: TableDefinition<&str, &[u8]> = TableDefinition::new("routing");
const KEY: &str = "config";

/// The routing configuration in the embedded redb store.
#[derive(Clone)]
pub struct EmbeddedRouting {
    db: Arc<Database>,
}

impl std::fmt::Debug for EmbeddedRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedRouting")
    }
}

impl EmbeddedRouting {
    /// The routing table of `store`.
    pub fn open(store: &EmbeddedStore) -> Self {
        Self {
            db: store.database(),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || op(&db))
            .await
            .map_err(|err| StoreError::Task(err.to_string()))?
    }
}

#[async_trait]
impl RoutingStore for EmbeddedRouting {
    async fn load(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read()?;
            let table = match txn.open_table(ROUTING) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(err) => return Err(err.into()),
            };
            Ok(table.get(KEY)?.map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn save(&self, json: Vec<u8>) -> Result<(), StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            txn.open_table(ROUTING)?.insert(KEY, json.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_configuration_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            let routing = EmbeddedRouting::open(&store);
            assert_eq!(routing.load().await.unwrap(), None);
            routing.save(b"{\"routes\":[]}".to_vec()).await.unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        let routing = EmbeddedRouting::open(&store);
        assert_eq!(
            routing.load().await.unwrap().as_deref(),
            Some(&b"{\"routes\":[]}"[..])
        );
    }
}
