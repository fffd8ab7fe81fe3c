//! What `hub cluster status` shows: the live hub nodes and their device counts, the NATS nodes the hub's streams and buckets live
//! on, and for each stream (telemetry, and each KV bucket's stream) its leader, its
//! replicas (current or not, how far behind, offline) and its size.

use async_nats::jetstream::stream;
use futures_util::StreamExt;
use serde::Serialize;

use super::NatsStore;
use crate::storage::{ClusterView, StoreError};

/// One replica of a stream.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    /// The NATS server's name.
    pub node: String,
    /// Whether it leads the stream.
    pub leader: bool,
    /// Whether it is up to date with the leader.
    pub current: bool,
    /// Whether the group considers it offline.
    pub offline: bool,
    /// Operations it is behind the leader.
    pub lag: u64,
    /// Milliseconds since the leader last heard from it.
    pub active_ms: u128,
}

/// One stream (a KV bucket is a stream named `KV_<bucket>`).
#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    /// The stream's name.
    pub name: String,
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// Configured replicas.
    pub replicas: usize,
    /// The leader's name, if one is elected.
    pub leader: Option<String>,
    /// Every replica, the leader first.
    pub peers: Vec<ReplicaStatus>,
}

/// The cluster as this hub sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// `"cluster"`.
    pub mode: &'static str,
    /// This hub process's id.
    pub hub_node: String,
    /// The live hub nodes (heartbeats in `hub-nodes`) and their device counts.
    pub hub_nodes: Vec<super::nodes::NodeInfo>,
    /// The NATS server this hub is connected to.
    pub connected_to: String,
    /// Every NATS node that holds a replica of some stream, sorted.
    pub nats_nodes: Vec<String>,
    /// The hub's streams and buckets.
    pub streams: Vec<StreamStatus>,
}

/// Reads the state of every stream of the hub's account.
pub async fn cluster_status(store: &NatsStore) -> Result<ClusterStatus, StoreError> {
    let mut infos: Vec<stream::Info> = Vec::new();
    let mut listing = store.jetstream().streams();
    while let Some(info) = listing.next().await {
        infos.push(info.map_err(|err| StoreError::Backend(format!("listing streams: {err}")))?);
    }
    infos.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    let mut nodes = std::collections::BTreeSet::new();
    let streams = infos
        .into_iter()
        .map(|info| {
            let cluster = info.cluster.clone();
            let leader = cluster.as_ref().and_then(|c| c.leader.clone());
            let mut peers = Vec::new();
            if let Some(name) = &leader {
                peers.push(ReplicaStatus {
                    node: name.clone(),
                    leader: true,
                    current: true,
                    offline: false,
                    lag: 0,
                    active_ms: 0,
                });
            }
            for replica in cluster.map(|c| c.replicas).unwrap_or_default() {
                peers.push(ReplicaStatus {
                    node: replica.name,
                    leader: false,
                    current: replica.current,
                    offline: replica.offline,
                    lag: replica.lag.unwrap_or(0),
                    active_ms: replica.active.as_millis(),
                });
            }
            nodes.extend(peers.iter().map(|p| p.node.clone()));
            StreamStatus {
                name: info.config.name,
                messages: info.state.messages,
                bytes: info.state.bytes,
                replicas: info.config.num_replicas,
                leader,
                peers,
            }
        })
        .collect();
    let hub_nodes = super::nodes::list_nodes(store).await?;
    let server = store.client().server_info();
    Ok(ClusterStatus {
        mode: "cluster",
        hub_node: store.node_id().to_string(),
        hub_nodes,
        connected_to: format!("{} ({})", server.server_name, server.version),
        nats_nodes: nodes.into_iter().collect(),
        streams,
    })
}

#[async_trait::async_trait]
impl ClusterView for NatsStore {
    async fn status(&self) -> Result<serde_json::Value, StoreError> {
        let status = cluster_status(self).await?;
        serde_json::to_value(status).map_err(|err| StoreError::Backend(err.to_string()))
    }
}
