//! Several hub nodes on one NATS cluster: node identity and liveness, device presence,
//! and routing of direct methods and C2D notices to the node holding a device's
//! connection, and session takeover across nodes.
//!
//! - `hub-nodes` (KV, entries expire [`NODE_TTL`] after their last write): each node
//!   writes its [`NodeInfo`] (addresses, start time, device count) every
//!   [`HEARTBEAT`]; a node that stops writing (killed) drops out within the TTL.
//! - `hub-presence` (KV, entries expire [`PRESENCE_TTL`] after their last write): key
//!   = the encoded device id, value = the node and connection holding it. Written when
//!   a connection first reports, deleted (compare-and-set on the node's own revision)
//!   when it ends, refreshed (compare-and-set) every [`PRESENCE_REFRESH`]. An entry
//!   naming a node absent from `hub-nodes` is ignored, so a dead node's devices are
//!   not routed to it after [`NODE_TTL`], and its entries vanish after
//!   [`PRESENCE_TTL`].
//! - Takeover: every node watches `hub-presence`; a write by another node for a device
//!   connected here, later (higher revision) than this node's own write, closes the
//!   local connection as `Replaced`, as a second connection on one node does.
//! - `hub.node.{node}.method` (core request/reply): the owning node calls the method on
//!   its local connection and answers with the device's response;
//!   `hub.node.{node}.c2d` (core publish): the owning node delivers the device's
//!   queued C2D messages at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::jetstream::kv;
use async_nats::{HeaderMap, RequestErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::task::JoinHandle;

use super::{NatsStore, keys};
use crate::commands::{CommandError, Commands, RemoteCallError, Routing};
use crate::delivery::DeviceLinks;
use crate::registry::DeviceId;
use crate::storage::StoreError;

/// The bucket of live hub nodes.
pub const NODES_BUCKET: &str = "hub-nodes";
/// The bucket of device presence.
pub const PRESENCE_BUCKET: &str = "hub-presence";
/// How often a node writes its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a node's heartbeat lives: three missed beats and the node counts as gone.
pub const NODE_TTL: Duration = Duration::from_secs(6);
/// How long a presence entry lives without a refresh.
pub const PRESENCE_TTL: Duration = Duration::from_secs(60);
/// How often a node refreshes its devices' presence entries.
pub const PRESENCE_REFRESH: Duration = Duration::from_secs(20);
/// Added to a routed call's response timeout for the trip to the other node and back.
const ROUTE_MARGIN: Duration = Duration::from_secs(2);
/// The pause before the presence watch is opened again after it failed.
const WATCH_RETRY: Duration = Duration::from_millis(500);

const H_DEVICE: &str = "Hub-Device";
const H_METHOD: &str = "Hub-Method";
const H_TIMEOUT_MS: &str = "Hub-Timeout-Ms";
const H_OUTCOME: &str = "Hub-Outcome";
const H_STATUS: &str = "Hub-Status";

/// A hub node's heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's id.
    pub node: String,
    /// Its HTTP address.
    pub http: String,
    /// Its plain MQTT address.
    pub mqtt: String,
    /// When it started (RFC 3339).
    pub started: String,
    /// Devices connected to it.
    pub devices: usize,
}

/// A presence entry: who holds a device's connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Holder {
    node: String,
    connection: u64,
}

/// This node's record of one local connection's presence entry.
#[derive(Debug, Clone, Copy)]
struct Local {
    connection: u64,
    /// The revision of this node's write, once it is acknowledged.
    revision: Option<u64>,
    /// A revision written by another node while this node's write was in flight.
    superseded_by: Option<u64>,
}

struct Inner {
    store: NatsStore,
    presence: kv::Store,
    nodes: kv::Store,
    links: Arc<dyn DeviceLinks>,
    local: Mutex<HashMap<DeviceId, Local>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The cluster routing of one hub node.
#[derive(Clone)]
pub struct NodeRouter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRouter")
            .field("node", &self.inner.store.node_id())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn method_subject(node: &str) -> String {
    format!("hub.node.{}.method", keys::encode(node))
}

fn c2d_subject(node: &str) -> String {
    format!("hub.node.{}.c2d", keys::encode(node))
}

impl NodeRouter {
    /// Opens (creating) the buckets; nothing runs until [`NodeRouter::start`].
    pub async fn open(store: &NatsStore, links: Arc<dyn DeviceLinks>) -> Result<Self, StoreError> {
        Ok(Self {
            inner: Arc::new(Inner {
                store: store.clone(),
                presence: store
                    .bucket_with_ttl(PRESENCE_BUCKET, 1, PRESENCE_TTL)
                    .await?,
                nodes: store.bucket_with_ttl(NODES_BUCKET, 1, NODE_TTL).await?,
                links,
                local: Mutex::default(),
                tasks: Mutex::default(),
            }),
        })
    }

    fn node(&self) -> &str {
        self.inner.store.node_id()
    }

    /// Writes the first heartbeat, then serves routed calls and C2D notices for
    /// `commands`, follows the presence bucket for takeovers, and keeps the heartbeat
    /// and this node's presence entries fresh.
    pub async fn start(
        &self,
        commands: Commands,
        http: SocketAddr,
        mqtt: SocketAddr,
    ) -> Result<(), StoreError> {
        let started = OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let info = NodeInfo {
            node: self.node().to_string(),
            http: http.to_string(),
            mqtt: mqtt.to_string(),
            started,
            devices: 0,
        };
        self.beat(&info).await?;
        let client = self.inner.store.client().clone();
        let subscribe = |subject: String| {
            let client = client.clone();
            async move {
                client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|err| StoreError::Backend(format!("subscribe {subject}: {err}")))
            }
        };
        let methods = subscribe(method_subject(self.node())).await?;
        let notices = subscribe(c2d_subject(self.node())).await?;
        let tasks = vec![
            tokio::spawn(serve_methods(client.clone(), methods, commands.clone())),
            tokio::spawn(serve_notices(notices, commands)),
            tokio::spawn(self.clone().follow_presence()),
            tokio::spawn(self.clone().keep_alive(info)),
        ];
        lock(&self.inner.tasks).extend(tasks);
        tracing::info!(node = self.node(), "hub node joined the cluster");
        Ok(())
    }

    /// Stops the tasks and removes this node's heartbeat and presence entries (a
    /// graceful stop; a killed node's entries expire instead).
    pub async fn stop(&self) {
        for task in lock(&self.inner.tasks).drain(..) {
            task.abort();
        }
        let local: Vec<(DeviceId, Local)> = lock(&self.inner.local).drain().collect();
        for (device, entry) in local {
            if let Some(revision) = entry.revision {
                let key = keys::encode(device.as_str());
                let _ = self
                    .inner
                    .presence
                    .delete_expect_revision(key, Some(revision))
                    .await;
            }
        }
        let _ = self.inner.nodes.delete(keys::encode(self.node())).await;
    }

    async fn beat(&self, info: &NodeInfo) -> Result<(), StoreError> {
        let value = Bytes::from(
            serde_json::to_vec(info)
                .map_err(|err| StoreError::Backend(format!("encode heartbeat: {err}")))?,
        );
        let key = keys::encode(self.node());
        self.inner
            .store
            .retrying("write heartbeat", || {
                self.inner.nodes.put(key.as_str(), value.clone())
            })
            .await
            .map(drop)
    }

    /// Heartbeats every [`HEARTBEAT`]; refreshes presence every [`PRESENCE_REFRESH`].
    async fn keep_alive(self, mut info: NodeInfo) {
        let mut beats = tokio::time::interval(HEARTBEAT);
        beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(PRESENCE_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        refresh.tick().await;
        loop {
            tokio::select! {
                _ = beats.tick() => {
                    info.devices = self.inner.links.connected_devices();
                    if let Err(err) = self.beat(&info).await {
                        tracing::warn!(error = %err, "cannot write the node heartbeat");
                    }
                }
                _ = refresh.tick() => self.refresh_presence().await,
            }
        }
    }

    /// Rewrites each local device's entry (compare-and-set on this node's revision,
    /// so a takeover's write is never overwritten).
    async fn refresh_presence(&self) {
        let local: Vec<(DeviceId, Local)> = lock(&self.inner.local)
            .iter()
            .map(|(d, l)| (d.clone(), *l))
            .collect();
        for (device, entry) in local {
            let Some(revision) = entry.revision else {
                continue;
            };
            let key = keys::encode(device.as_str());
            let value = self.holder_value(entry.connection);
            match self.inner.presence.update(&key, value, revision).await {
                Ok(new) => self.record_revision(&device, entry.connection, new),
                Err(err) => {
                    // Another node wrote it (the watch closes the connection), or it
                    // expired during a long stall: write it again if nobody holds it.
                    tracing::debug!(%device, error = %err, "presence refresh refused");
                    match self.inner.presence.entry(key.as_str()).await {
                        Ok(Some(found)) if found.operation == kv::Operation::Put => {}
                        Ok(_) => self.announce(device, entry.connection).await,
                        Err(err) => {
                            tracing::warn!(%device, error = %err, "cannot read presence")
                        }
                    }
                }
            }
        }
    }

    fn holder_value(&self, connection: u64) -> Bytes {
        let holder = Holder {
            node: self.node().to_string(),
            connection,
        };
        // A struct of a string and a number always serialises.
        Bytes::from(serde_json::to_vec(&holder).unwrap_or_default())
    }

    fn record_revision(&self, device: &DeviceId, connection: u64, revision: u64) {
        if let Some(entry) = lock(&self.inner.local).get_mut(device)
            && entry.connection == connection
        {
            entry.revision = Some(revision);
        }
    }

    /// Writes the presence entry of `device`'s local `connection`.
    async fn announce(&self, device: DeviceId, connection: u64) {
        let key = keys::encode(device.as_str());
        let value = self.holder_value(connection);
        let written = self
            .inner
            .store
            .retrying("write presence", || {
                self.inner.presence.put(key.as_str(), value.clone())
            })
            .await;
        let revision = match written {
            Ok(revision) => revision,
            Err(err) => {
                tracing::warn!(%device, error = %err, "cannot write presence");
                return;
            }
        };
        let outcome = {
            let mut local = lock(&self.inner.local);
            match local.get_mut(&device) {
                Some(entry) if entry.connection == connection => {
                    entry.revision = Some(revision);
                    Some(entry.superseded_by.is_some_and(|other| other > revision))
                }
                _ => None,
            }
        };
        match outcome {
            // Another node took the device over while this write was in flight.
            Some(true) => {
                self.inner.links.replaced_elsewhere(&device, connection);
            }
            Some(false) => {}
            // The connection ended while its entry was being written.
            None => {
                let _ = self
                    .inner
                    .presence
                    .delete_expect_revision(key, Some(revision))
                    .await;
            }
        }
    }

    /// Follows `hub-presence`, closing local connections taken over by other nodes.
    async fn follow_presence(self) {
        loop {
            match self.inner.presence.watch_all().await {
                Ok(mut watch) => {
                    while let Some(entry) = watch.next().await {
                        match entry {
                            Ok(entry) => self.presence_changed(&entry),
                            Err(err) => {
                                tracing::warn!(error = %err, "presence watch failed; reopening");
                                break;
                            }
                        }
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot watch presence"),
            }
            // A pause between reopenings, not a synchronisation.
            tokio::time::sleep(WATCH_RETRY).await;
        }
    }

    fn presence_changed(&self, entry: &kv::Entry) {
        if entry.operation != kv::Operation::Put {
            return;
        }
        let Ok(holder) = serde_json::from_slice::<Holder>(&entry.value) else {
            return;
        };
        if holder.node == self.node() {
            return;
        }
        let Some(device) = keys::decode(&entry.key).and_then(|id| DeviceId::parse(&id).ok()) else {
            return;
        };
        let close = {
            let mut local = lock(&self.inner.local);
            match local.get_mut(&device) {
                Some(mine) => match mine.revision {
                    Some(revision) if revision < entry.revision => Some(mine.connection),
                    Some(_) => None,
                    None => {
                        mine.superseded_by = Some(entry.revision);
                        None
                    }
                },
                None => None,
            }
        };
        if let Some(connection) = close {
            tracing::info!(%device, node = holder.node, "device connected to another node; closing here");
            self.inner.links.replaced_elsewhere(&device, connection);
        }
    }

    async fn live(&self, node: &str) -> bool {
        matches!(
            self.inner.nodes.entry(keys::encode(node)).await,
            Ok(Some(entry)) if entry.operation == kv::Operation::Put
        )
    }
}

#[async_trait]
impl Routing for NodeRouter {
    fn connected(&self, device: &DeviceId, connection: u64) {
        lock(&self.inner.local).insert(
            device.clone(),
            Local {
                connection,
                revision: None,
                superseded_by: None,
            },
        );
        let router = self.clone();
        let device = device.clone();
        tokio::spawn(async move { router.announce(device, connection).await });
    }

    fn disconnected(&self, device: &DeviceId, connection: u64) {
        let revision = {
            let mut local = lock(&self.inner.local);
            match local.get(device) {
                Some(entry) if entry.connection == connection => {
                    let revision = entry.revision;
                    local.remove(device);
                    revision
                }
                _ => return,
            }
        };
        // Without a revision the write is in flight: `announce` deletes it.
        if let Some(revision) = revision {
            let presence = self.inner.presence.clone();
            let key = keys::encode(device.as_str());
            tokio::spawn(async move {
                // Refused when another node wrote since: its entry stays.
                let _ = presence.delete_expect_revision(key, Some(revision)).await;
            });
        }
    }

    async fn owner(&self, device: &DeviceId) -> Option<String> {
        let entry = match self
            .inner
            .presence
            .entry(keys::encode(device.as_str()))
            .await
        {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => entry,
            Ok(_) => return None,
            Err(err) => {
                tracing::warn!(%device, error = %err, "cannot read presence");
                return None;
            }
        };
        let holder: Holder = serde_json::from_slice(&entry.value).ok()?;
        if holder.node == self.node() || !self.live(&holder.node).await {
            return None;
        }
        Some(holder.node)
    }

    async fn invoke(
        &self,
        node: &str,
        device: &DeviceId,
        name: &str,
        payload: Bytes,
        response_timeout: Duration,
    ) -> Result<(i32, Bytes), RemoteCallError> {
        let mut headers = HeaderMap::new();
        headers.insert(H_DEVICE, device.as_str());
        headers.insert(H_METHOD, name);
        headers.insert(
            H_TIMEOUT_MS,
            response_timeout.as_millis().to_string().as_str(),
        );
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(payload)
            .timeout(Some(response_timeout + ROUTE_MARGIN));
        let reply = match self
            .inner
            .store
            .client()
            .send_request(method_subject(node), request)
            .await
        {
            Ok(reply) => reply,
            // The node is gone (killed, its heartbeat not yet expired).
            Err(err) if err.kind() == RequestErrorKind::NoResponders => {
                return Err(RemoteCallError::Offline);
            }
            Err(err) if err.kind() == RequestErrorKind::TimedOut => {
                return Err(RemoteCallError::Timeout);
            }
            Err(err) => return Err(RemoteCallError::Failed(err.to_string())),
        };
        let header = |name: &str| {
            reply
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        match header(H_OUTCOME).as_deref() {
            Some("ok") => {
                let status = header(H_STATUS)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| RemoteCallError::Failed("answer without a status".into()))?;
                Ok((status, reply.payload))
            }
            Some("offline") => Err(RemoteCallError::Offline),
            Some("timeout") => Err(RemoteCallError::Timeout),
            other => Err(RemoteCallError::Failed(format!(
                "node {node} answered {other:?}: {}",
                String::from_utf8_lossy(&reply.payload)
            ))),
        }
    }

    async fn notify_c2d(&self, node: &str, device: &DeviceId) {
        let payload = Bytes::copy_from_slice(device.as_str().as_bytes());
        if let Err(err) = self
            .inner
            .store
            .client()
            .publish(c2d_subject(node), payload)
            .await
        {
            // The device gets the message on its next subscribe anyway.
            tracing::warn!(%device, node, error = %err, "cannot notify the owning node");
        }
    }
}

/// Answers routed method calls from this node's local connections.
async fn serve_methods(
    client: async_nats::Client,
    mut requests: async_nats::Subscriber,
    commands: Commands,
) {
    while let Some(request) = requests.next().await {
        let (client, commands) = (client.clone(), commands.clone());
        tokio::spawn(async move {
            let Some(reply) = request.reply.clone() else {
                return;
            };
            let header = |name: &str| {
                request
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
            };
            let mut headers = HeaderMap::new();
            let mut body = Bytes::new();
            let parsed = (
                header(H_DEVICE).and_then(|d| DeviceId::parse(&d).ok()),
                header(H_METHOD),
                header(H_TIMEOUT_MS).and_then(|t| t.parse::<u64>().ok()),
            );
            match parsed {
                (Some(device), Some(name), Some(timeout_ms)) => {
                    let result = commands
                        .invoke_local(
                            &device,
                            &name,
                            request.payload.clone(),
                            Duration::from_millis(timeout_ms),
                        )
                        .await;
                    match result {
                        Ok((status, payload)) => {
                            headers.insert(H_OUTCOME, "ok");
                            headers.insert(H_STATUS, status.to_string().as_str());
                            body = payload;
                        }
                        Err(CommandError::Offline(_)) => headers.insert(H_OUTCOME, "offline"),
                        Err(CommandError::Timeout(..)) => headers.insert(H_OUTCOME, "timeout"),
                        Err(err) => {
                            headers.insert(H_OUTCOME, "error");
                            body = Bytes::from(err.to_string());
                        }
                    }
                }
                _ => {
                    headers.insert(H_OUTCOME, "error");
                    body = Bytes::from_static(b"malformed routed call");
                }
            }
            if let Err(err) = client.publish_with_headers(reply, headers, body).await {
                tracing::warn!(error = %err, "cannot answer a routed method call");
            }
        });
    }
}

/// Delivers queued C2D messages when another node queued one for a local device.
async fn serve_notices(mut notices: async_nats::Subscriber, commands: Commands) {
    while let Some(notice) = notices.next().await {
        let Some(device) = std::str::from_utf8(&notice.payload)
            .ok()
            .and_then(|id| DeviceId::parse(id).ok())
        else {
            continue;
        };
        let commands = commands.clone();
        tokio::spawn(async move { commands.deliver_pending(&device).await });
    }
}

/// The live hub nodes, by id.
pub async fn list_nodes(store: &NatsStore) -> Result<Vec<NodeInfo>, StoreError> {
    let bucket = match store.jetstream().get_key_value(NODES_BUCKET).await {
        Ok(bucket) => bucket,
        Err(_) => return Ok(Vec::new()),
    };
    let mut names = bucket
        .keys()
        .await
        .map_err(|err| StoreError::Backend(format!("list hub nodes: {err}")))?;
    let mut nodes = Vec::new();
    while let Some(key) = names.next().await {
        let key = key.map_err(|err| StoreError::Backend(format!("list hub nodes: {err}")))?;
        if let Ok(Some(value)) = bucket.get(&key).await
            && let Ok(info) = serde_json::from_slice::<NodeInfo>(&value)
        {
            nodes.push(info);
        }
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_carry_the_encoded_node_id() {
        assert_eq!(method_subject("abc"), "hub.node.abc.method");
        assert_eq!(c2d_subject("a.b"), "hub.node.a=2Eb.c2d");
    }

    #[test]
    fn a_holder_round_trips() {
        let holder = Holder {
            node: "n1".into(),
            connection: 7,
        };
        let json = serde_json::to_vec(&holder).unwrap();
        assert_eq!(serde_json::from_slice::<Holder>(&json).unwrap(), holder);
    }
}
