//! Cloud-to-device messages with feedback, and direct methods (DESIGN sections 2–3).
//!
//! C2D: a durable queue per device ([`c2d::CommandStore`]); a message is delivered at
//! QoS 1 to the device's connection once it subscribes to
//! `devices/{id}/messages/devicebound/#` (and again after every reconnect until
//! completed, up to the maximum delivery count); the device's PUBACK completes it.
//! Expired, over-delivered and purged messages leave the queue too, and each outcome
//! produces a feedback record when the message's `ack` mode asks for one. Feedback is
//! read in locked batches and acknowledged by lock token.
//!
//! Methods: a call waits (up to its connect timeout) for the device to be connected
//! and subscribed to `$iothub/methods/POST/#`, publishes the request with a fresh
//! `$rid`, and waits (up to its response timeout) for the device's answer on
//! `$iothub/methods/res/{status}/?$rid=…`.
//!
//! Cluster mode adds a [`Routing`]: a call or a C2D message for a device connected to
//! another hub node travels there (the node answers from its local connection), and
//! this node's connections are announced to the other nodes.

pub mod c2d;
pub mod device_events;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use bytes::Bytes;
use time::OffsetDateTime;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::delivery::{Delivery, DeliveryId, DeviceLinks, Subscription};
use crate::registry::{DeviceId, Registry, RegistryError};
use crate::storage::StoreError;
use c2d::{
    AckMode, C2dMessage, CommandStore, EnqueueError, FeedbackLock, FeedbackRecord, FeedbackStatus,
    MAX_C2D_MESSAGE_BYTES, Removed,
};
pub use device_events::{ConnectionEvents, DeliveryAcks, MethodResponses};

/// Limits of cloud-to-device messages and methods.
#[derive(Debug, Clone, Copy)]
pub struct CommandLimits {
    /// Messages queued per device.
    pub queue: usize,
    /// Deliveries without completion before a message is dropped.
    pub max_deliveries: u32,
    /// TTL when the sender gives none.
    pub default_ttl: Duration,
    /// Longest TTL accepted.
    pub max_ttl: Duration,
    /// Largest message, measured as [`C2dMessage::size`] does (body and properties).
    pub max_message_bytes: usize,
    /// Largest method payload.
    pub max_method_bytes: usize,
    /// How long a feedback batch stays locked before it is offered again.
    pub feedback_lock: Duration,
}

impl Default for CommandLimits {
    fn default() -> Self {
        Self {
            queue: 50,
            max_deliveries: 10,
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(2 * 24 * 3600),
            max_message_bytes: MAX_C2D_MESSAGE_BYTES,
            max_method_bytes: 128 * 1024,
            feedback_lock: Duration::from_secs(60),
        }
    }
}

/// Failures of C2D and method operations.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No such device.
    #[error("device {0} not found")]
    NotFound(DeviceId),
    /// An invalid request.
    #[error("{0}")]
    Invalid(String),
    /// The message (body and properties) exceeds the size limit; nothing was queued.
    #[error("the message is {size} bytes (body, ids and properties); the limit is {limit}")]
    TooLarge {
        /// The message's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The device's queue is full.
    #[error("{0}")]
    QueueFull(String),
    /// The device is not online (or not subscribed to methods) within the connect timeout.
    #[error("device {0} is not online")]
    Offline(DeviceId),
    /// The device did not answer in time.
    #[error("device {0} did not answer within {1} s")]
    Timeout(DeviceId, u64),
    /// The lock token is unknown or expired.
    #[error("unknown or expired feedback lock token")]
    UnknownLock,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The registry failed.
    #[error(transparent)]
    Registry(RegistryError),
}

/// Most expired messages removed in one store transaction.
pub const EXPIRY_BATCH: usize = 1_000;

/// A C2D send request.
#[derive(Debug, Clone, Default)]
pub struct SendRequest {
    /// The body.
    pub body: Bytes,
    /// `$.mid`; generated when absent.
    pub message_id: Option<String>,
    /// `$.cid`.
    pub correlation_id: Option<String>,
    /// `$.ct`.
    pub content_type: Option<String>,
    /// `$.ce`.
    pub content_encoding: Option<String>,
    /// Application properties.
    pub properties: Vec<(String, String)>,
    /// TTL; the default when absent.
    pub ttl: Option<Duration>,
    /// Feedback wanted.
    pub ack: AckMode,
}

/// A batch of feedback records under a lock token.
#[derive(Debug, Clone)]
pub struct FeedbackBatch {
    /// Acknowledges the batch.
    pub lock_token: String,
    /// The records.
    pub records: Vec<FeedbackRecord>,
}

/// Why a method call routed to another hub node got no answer from the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteCallError {
    /// The node does not (or no longer) hold a connection subscribed to methods.
    #[error("the device is not connected to that node")]
    Offline,
    /// The device did not answer within the response timeout.
    #[error("the device did not answer in time")]
    Timeout,
    /// The node could not be asked (NATS failed).
    #[error("{0}")]
    Failed(String),
}

/// How calls and C2D messages reach devices connected to other hub nodes (cluster
/// mode). The service tells it about this node's connections; it answers which other
/// node holds a device and carries requests there.
#[async_trait]
pub trait Routing: Send + Sync + 'static {
    /// A connection of `device` on this node reported for the first time.
    fn connected(&self, device: &DeviceId, connection: u64);
    /// That connection ended.
    fn disconnected(&self, device: &DeviceId, connection: u64);
    /// The live node, other than this one, holding `device`'s connection.
    async fn owner(&self, device: &DeviceId) -> Option<String>;
    /// Calls method `name` on `device` through `node`.
    async fn invoke(
        &self,
        node: &str,
        device: &DeviceId,
        name: &str,
        payload: Bytes,
        response_timeout: Duration,
    ) -> Result<(i32, Bytes), RemoteCallError>;
    /// Tells `node` that `device` has new C2D messages.
    async fn notify_c2d(&self, node: &str, device: &DeviceId);
}

/// How often a call waiting for its device looks for it on the other nodes (their
/// connections are seen through the presence bucket, without a local wake-up).
const PRESENCE_POLL: Duration = Duration::from_millis(200);

type MethodKey = (DeviceId, String);

struct Inner {
    store: Arc<dyn CommandStore>,
    registry: Registry,
    links: Arc<dyn DeviceLinks>,
    limits: CommandLimits,
    /// Subscriptions of each device's live connection, by connection id.
    online: Mutex<HashMap<DeviceId, (u64, BTreeSet<Subscription>)>>,
    online_changed: Notify,
    /// Per device: its current connection and the highest sequence number sent on
    /// it. Messages are sent in sequence order and sequence numbers only grow, so one
    /// number says what the connection has had, and delivery reads only what follows.
    sent: Mutex<HashMap<DeviceId, (u64, u64)>>,
    methods: Mutex<HashMap<MethodKey, oneshot::Sender<(i32, Bytes)>>>,
    next_rid: AtomicU64,
    feedback_added: Notify,
    /// Cluster mode: the way to the other hub nodes.
    routing: OnceLock<Arc<dyn Routing>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The commands service.
#[derive(Clone)]
pub struct Commands {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands").finish_non_exhaustive()
    }
}

/// `bytes` random bytes in hex (message ids, lock tokens).
pub(crate) fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

impl Commands {
    /// A commands service; call [`Commands::run_expiry`] in a task.
    pub fn new(
        store: Arc<dyn CommandStore>,
        registry: Registry,
        links: Arc<dyn DeviceLinks>,
        limits: CommandLimits,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                registry,
                links,
                limits,
                online: Mutex::default(),
                online_changed: Notify::new(),
                sent: Mutex::default(),
                methods: Mutex::default(),
                next_rid: AtomicU64::new(1),
                feedback_added: Notify::new(),
                routing: OnceLock::new(),
            }),
        }
    }

    /// Cluster mode: routes calls and C2D notices to the other hub nodes (set once,
    /// before devices connect).
    pub fn set_routing(&self, routing: Arc<dyn Routing>) {
        if self.inner.routing.set(routing).is_err() {
            tracing::warn!("routing was already set; keeping the first");
        }
    }

    fn routing(&self) -> Option<&Arc<dyn Routing>> {
        self.inner.routing.get()
    }

    /// The device's `generationId`, or NotFound.
    async fn check_device(&self, id: &DeviceId) -> Result<String, CommandError> {
        match self.inner.registry.get(id).await {
            Ok(device) => Ok(device.generation_id),
            Err(RegistryError::NotFound(_)) => Err(CommandError::NotFound(id.clone())),
            Err(err) => Err(CommandError::Registry(err)),
        }
    }

    /// Queues a message for `device`; returns its message id.
    pub async fn send(
        &self,
        device: &DeviceId,
        request: SendRequest,
    ) -> Result<String, CommandError> {
        let generation_id = self.check_device(device).await?;
        let limits = self.inner.limits;
        let ttl = request.ttl.unwrap_or(limits.default_ttl);
        if ttl.is_zero() || ttl > limits.max_ttl {
            return Err(CommandError::Invalid(format!(
                "ttlSeconds must be from 1 to {}",
                limits.max_ttl.as_secs()
            )));
        }
        let now = OffsetDateTime::now_utc();
        let message = C2dMessage {
            seq: 0,
            message_id: request.message_id.unwrap_or_else(|| random_hex(16)),
            correlation_id: request.correlation_id,
            content_type: request.content_type,
            content_encoding: request.content_encoding,
            properties: request.properties,
            body: request.body,
            enqueued: now,
            expiry: now + ttl,
            ack: request.ack,
            delivery_count: 0,
            generation_id,
        };
        // Measured on the message as it would be queued (with a generated id), before
        // anything is stored: a refused message leaves no trace.
        let size = message.size();
        if size > limits.max_message_bytes {
            return Err(CommandError::TooLarge {
                size,
                limit: limits.max_message_bytes,
            });
        }
        // A message no device connection could carry (its properties travel in a
        // topic of bounded length) is refused now rather than stored.
        self.inner
            .links
            .admits(device, &message.delivery(device))
            .map_err(CommandError::Invalid)?;
        let queued = self
            .inner
            .store
            .enqueue(device, message, limits.queue)
            .await
            .map_err(|err| match err {
                EnqueueError::QueueFull(_) => CommandError::QueueFull(err.to_string()),
                EnqueueError::Store(err) => CommandError::Store(err),
            })?;
        self.deliver_pending(device).await;
        self.notify_owner(device).await;
        Ok(queued.message_id)
    }

    /// Number of messages queued for `device` (a count of keys; no message is read).
    pub async fn queue_length(&self, device: &DeviceId) -> Result<usize, CommandError> {
        Ok(self
            .queue_lengths(std::slice::from_ref(device))
            .await?
            .first()
            .copied()
            .unwrap_or(0))
    }

    /// Queue lengths of `devices`, in order, in one store call (a page of
    /// `GET /devices` asks for up to 1,000).
    pub async fn queue_lengths(&self, devices: &[DeviceId]) -> Result<Vec<usize>, CommandError> {
        Ok(self.inner.store.counts(devices).await?)
    }

    /// Cluster mode: when the device is connected to another node, tells that node to
    /// deliver (it would otherwise wait for the device's next subscribe).
    async fn notify_owner(&self, device: &DeviceId) {
        let Some(routing) = self.routing() else {
            return;
        };
        if self
            .subscribed_connection(device, Subscription::CloudToDevice)
            .is_some()
        {
            return;
        }
        if let Some(node) = routing.owner(device).await {
            routing.notify_c2d(&node, device).await;
        }
    }

    /// Sends the queued messages the device's current connection has not had, if it
    /// is subscribed to cloud-to-device messages (on this node).
    pub async fn deliver_pending(&self, device: &DeviceId) {
        let Some(connection) = self.subscribed_connection(device, Subscription::CloudToDevice)
        else {
            return;
        };
        let after = match lock(&self.inner.sent).get(device) {
            Some((sent_on, last)) if *sent_on == connection => *last,
            _ => 0,
        };
        let limit = self.inner.limits.queue;
        let pending = match self.inner.store.pending(device, after, limit).await {
            Ok(pending) => pending,
            Err(err) => {
                tracing::warn!(%device, error = %err, "cannot read the C2D queue");
                return;
            }
        };
        // Messages sent to an earlier device under this id (deleted and created again,
        // with a send racing the delete) are not this device's.
        let generation = match self.inner.registry.get(device).await {
            Ok(current) => current.generation_id,
            Err(_) => return,
        };
        let now = OffsetDateTime::now_utc();
        for message in pending {
            if message.expiry <= now {
                continue; // The expiry sweep reports it.
            }
            if !message.generation_id.is_empty() && message.generation_id != generation {
                self.finish(device, vec![message.seq], FeedbackStatus::Purged)
                    .await;
                continue;
            }
            {
                // Claim the message for this connection: concurrent calls (a send and
                // a subscribe) read overlapping messages, and each is sent once.
                let mut sent = lock(&self.inner.sent);
                let entry = sent.entry(device.clone()).or_insert((connection, 0));
                if entry.0 != connection {
                    *entry = (connection, 0);
                }
                if message.seq <= entry.1 {
                    continue;
                }
                entry.1 = message.seq;
            }
            if message.delivery_count >= self.inner.limits.max_deliveries {
                self.finish(
                    device,
                    vec![message.seq],
                    FeedbackStatus::DeliveryCountExceeded,
                )
                .await;
                continue;
            }
            match self.inner.store.record_delivery(device, message.seq).await {
                Ok(true) => {}
                // Completed or expired since it was read: nothing to send.
                Ok(false) => continue,
                Err(err) => tracing::warn!(%device, error = %err, "cannot count a C2D delivery"),
            }
            if self
                .inner
                .links
                .send(device, message.delivery(device))
                .is_err()
            {
                // Gone or too slow: the next connection gets it again.
                return;
            }
        }
    }

    fn subscribed_connection(&self, device: &DeviceId, subscription: Subscription) -> Option<u64> {
        lock(&self.inner.online)
            .get(device)
            .filter(|(_, subs)| subs.contains(&subscription))
            .map(|(connection, _)| *connection)
    }

    /// Removes messages with feedback of `status` where asked.
    async fn finish(&self, device: &DeviceId, seqs: Vec<u64>, status: FeedbackStatus) {
        match self.inner.store.complete(device, &seqs, status).await {
            Ok(removed) => self.feedback_written(removed),
            Err(err) => tracing::warn!(%device, error = %err, "cannot complete C2D messages"),
        }
    }

    fn feedback_written(&self, removed: Removed) {
        if removed.feedback > 0 {
            self.inner.feedback_added.notify_waiters();
        }
    }

    /// Deletes every queued message of `device` (Purged feedback where asked);
    /// returns how many.
    pub async fn purge(&self, device: &DeviceId) -> Result<usize, CommandError> {
        self.check_device(device).await?;
        let removed = self
            .inner
            .store
            .purge(device, FeedbackStatus::Purged)
            .await?;
        self.feedback_written(removed);
        Ok(removed.messages)
    }

    /// Drops the queue of a deleted device (no feedback: there is no device to have
    /// completed or missed anything). A failure is logged: the device is gone either way.
    pub async fn forget(&self, device: &DeviceId) {
        if let Err(err) = self.inner.store.drop_queue(device).await {
            tracing::warn!(%device, error = %err, "cannot drop the C2D queue of a deleted device");
        }
    }

    /// Removes expired messages (Expired feedback where asked). Reads only messages
    /// that are due, in batches of [`EXPIRY_BATCH`] (one transaction each, so a
    /// backlog does not hold the store's writer for long).
    pub async fn expire(&self) {
        let now = OffsetDateTime::now_utc();
        let mut total = Removed::default();
        loop {
            match self.inner.store.expire(now, EXPIRY_BATCH).await {
                Ok(removed) => {
                    total += removed;
                    if removed.messages < EXPIRY_BATCH {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot sweep C2D queues");
                    break;
                }
            }
        }
        self.feedback_written(total);
    }

    /// Sweeps expired messages every `interval`, forever.
    pub async fn run_expiry(self, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        loop {
            ticks.tick().await;
            self.expire().await;
        }
    }

    /// The next batch of unlocked feedback, waiting up to `wait` for one.
    pub async fn receive_feedback(
        &self,
        wait: Duration,
    ) -> Result<Option<FeedbackBatch>, CommandError> {
        let deadline = Instant::now() + wait;
        loop {
            let added = self.inner.feedback_added.notified();
            let lock = self.inner.limits.feedback_lock;
            let retry = match self.inner.store.lock_feedback(100, lock).await? {
                FeedbackLock::Locked { token, records } => {
                    return Ok(Some(FeedbackBatch {
                        lock_token: token,
                        records,
                    }));
                }
                FeedbackLock::Empty { retry } => retry,
            };
            if Instant::now() >= deadline {
                return Ok(None);
            }
            // Woken by new feedback, an expiring lock (or the store's next look), or
            // the deadline; then look again.
            let until = retry.map_or(deadline, |r| r.min(deadline));
            let _ = tokio::time::timeout_at(until, added).await;
        }
    }

    /// Acknowledges (deletes) the feedback batch of `token`.
    pub async fn acknowledge_feedback(&self, token: &str) -> Result<(), CommandError> {
        if self.inner.store.acknowledge_feedback(token).await? {
            Ok(())
        } else {
            Err(CommandError::UnknownLock)
        }
    }

    /// Abandons the feedback batch of `token`: its records are offered again at once.
    pub async fn abandon_feedback(&self, token: &str) -> Result<(), CommandError> {
        if self.inner.store.abandon_feedback(token).await? {
            self.inner.feedback_added.notify_waiters();
            Ok(())
        } else {
            Err(CommandError::UnknownLock)
        }
    }

    /// Invokes direct method `name` on `device`, wherever it is connected.
    pub async fn invoke(
        &self,
        device: &DeviceId,
        name: &str,
        payload: Bytes,
        response_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<(i32, Bytes), CommandError> {
        self.invoke_with(
            device,
            name,
            payload,
            response_timeout,
            connect_timeout,
            true,
        )
        .await
    }

    /// Invokes method `name` on `device`'s connection to this node only, without
    /// waiting for one (another node asked: it keeps looking itself).
    pub async fn invoke_local(
        &self,
        device: &DeviceId,
        name: &str,
        payload: Bytes,
        response_timeout: Duration,
    ) -> Result<(i32, Bytes), CommandError> {
        self.invoke_with(
            device,
            name,
            payload,
            response_timeout,
            Duration::ZERO,
            false,
        )
        .await
    }

    async fn invoke_with(
        &self,
        device: &DeviceId,
        name: &str,
        payload: Bytes,
        response_timeout: Duration,
        connect_timeout: Duration,
        route: bool,
    ) -> Result<(i32, Bytes), CommandError> {
        self.check_device(device).await?;
        if payload.len() > self.inner.limits.max_method_bytes {
            return Err(CommandError::Invalid(format!(
                "the method payload is {} bytes; the limit is {}",
                payload.len(),
                self.inner.limits.max_method_bytes
            )));
        }
        let routing = self.routing().filter(|_| route);
        // Request ids count up and are never reused while the hub runs.
        let rid = format!("{:x}", self.inner.next_rid.fetch_add(1, Ordering::Relaxed));
        let (answer, answered) = oneshot::channel();
        let key = (device.clone(), rid.clone());
        lock(&self.inner.methods).insert(key.clone(), answer);
        // Wait (up to the connect timeout) for the device to be connected and
        // subscribed to methods, here or (cluster mode) on another node. A connection
        // that ended between that check and the delivery is waited out the same way:
        // the device may be reconnecting, possibly to another node.
        let online_by = Instant::now() + connect_timeout;
        loop {
            let changed = self.inner.online_changed.notified();
            if self
                .subscribed_connection(device, Subscription::Methods)
                .is_some()
            {
                let request = Delivery::MethodRequest {
                    method: name.to_string(),
                    rid: rid.clone(),
                    payload: payload.clone(),
                };
                if self.inner.links.send(device, request).is_ok() {
                    break;
                }
            } else if let Some(routing) = routing
                && let Some(node) = routing.owner(device).await
            {
                match routing
                    .invoke(&node, device, name, payload.clone(), response_timeout)
                    .await
                {
                    Ok(answer) => {
                        lock(&self.inner.methods).remove(&key);
                        return Ok(answer);
                    }
                    Err(RemoteCallError::Timeout) => {
                        lock(&self.inner.methods).remove(&key);
                        return Err(CommandError::Timeout(
                            device.clone(),
                            response_timeout.as_secs(),
                        ));
                    }
                    // Gone from that node (or the node is gone): keep looking until
                    // the connect timeout, as for a local reconnect.
                    Err(RemoteCallError::Offline) => {}
                    Err(RemoteCallError::Failed(reason)) => {
                        tracing::warn!(%device, node, %reason, "cannot route a method call");
                    }
                }
            }
            let wake = match routing {
                Some(_) => online_by.min(Instant::now() + PRESENCE_POLL),
                None => online_by,
            };
            let woken = tokio::time::timeout_at(wake, changed).await;
            if woken.is_err() && Instant::now() >= online_by {
                lock(&self.inner.methods).remove(&key);
                return Err(CommandError::Offline(device.clone()));
            }
        }
        let result = tokio::time::timeout(response_timeout, answered).await;
        lock(&self.inner.methods).remove(&key);
        match result {
            Ok(Ok(answer)) => Ok(answer),
            _ => Err(CommandError::Timeout(
                device.clone(),
                response_timeout.as_secs(),
            )),
        }
    }
}

impl MethodResponses for Commands {
    fn respond(&self, device: &DeviceId, rid: &str, status: i32, payload: Bytes) {
        // Keyed by the answering connection's own device: another device cannot
        // answer this device's call.
        match lock(&self.inner.methods).remove(&(device.clone(), rid.to_string())) {
            Some(waiter) => {
                let _ = waiter.send((status, payload));
            }
            None => tracing::warn!(%device, ?rid, "method response for no pending call dropped"),
        }
    }
}

impl DeliveryAcks for Commands {
    fn delivered(&self, device: &DeviceId, id: DeliveryId) {
        let commands = self.clone();
        let device = device.clone();
        // Found by key and removed in one transaction; a PUBACK for a message that is
        // already gone (expired, or a duplicate PUBACK) removes nothing.
        tokio::spawn(async move {
            commands
                .finish(&device, vec![id], FeedbackStatus::Success)
                .await
        });
    }
}

impl ConnectionEvents for Commands {
    fn subscriptions(
        &self,
        device: &DeviceId,
        connection: u64,
        subscriptions: &BTreeSet<Subscription>,
    ) {
        let previous =
            lock(&self.inner.online).insert(device.clone(), (connection, subscriptions.clone()));
        self.inner.online_changed.notify_waiters();
        if previous.is_none_or(|(c, _)| c != connection)
            && let Some(routing) = self.routing()
        {
            routing.connected(device, connection);
        }
        if subscriptions.contains(&Subscription::CloudToDevice) {
            let commands = self.clone();
            let device = device.clone();
            tokio::spawn(async move { commands.deliver_pending(&device).await });
        }
    }

    fn disconnected(&self, device: &DeviceId, connection: u64) {
        // Only this connection's entries: a newer connection of the device may already
        // have reported its own.
        let ended = {
            let mut online = lock(&self.inner.online);
            let ended = online.get(device).is_some_and(|(c, _)| *c == connection);
            if ended {
                online.remove(device);
            }
            ended
        };
        if ended && let Some(routing) = self.routing() {
            routing.disconnected(device, connection);
        }
        let mut sent = lock(&self.inner.sent);
        if sent.get(device).is_some_and(|(c, _)| *c == connection) {
            sent.remove(device);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::device::{Credential, Proof};
    use crate::gateway::connections::{Connections, Registration};
    use crate::registry::{DeviceSpec, Presence};
    use crate::store::embedded::EmbeddedStore;

    async fn commands(dir: &tempfile::TempDir) -> (Commands, Connections, DeviceId) {
        let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
        let registry = Registry::new(Arc::new(store.clone()), Presence::default());
        let id = DeviceId::parse("d1").unwrap();
        registry
            .create(id.clone(), DeviceSpec::default())
            .await
            .unwrap();
        let connections = Connections::default();
        let commands = Commands::new(
            Arc::new(store),
            registry,
            Arc::new(connections.clone()),
            CommandLimits::default(),
        );
        (commands, connections, id)
    }

    fn register(connections: &Connections, id: &DeviceId) -> Registration {
        let credential = Credential {
            generation_id: String::new(),
            proof: Proof::DeviceCa,
        };
        connections.register(id, credential)
    }

    fn methods() -> BTreeSet<Subscription> {
        BTreeSet::from([Subscription::Methods])
    }

    #[tokio::test]
    async fn a_connections_entries_go_when_it_ends_and_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (commands, _connections, id) = commands(&dir).await;
        commands.subscriptions(
            &id,
            1,
            &BTreeSet::from([Subscription::Methods, Subscription::CloudToDevice]),
        );
        // A queued message marks what connection 1 was sent.
        commands.send(&id, SendRequest::default()).await.unwrap();
        assert_eq!(lock(&commands.inner.sent).len(), 1);
        commands.disconnected(&id, 1);
        assert!(lock(&commands.inner.online).is_empty());
        assert!(lock(&commands.inner.sent).is_empty());

        // A late `disconnected` of a replaced connection leaves the newer one's state.
        commands.subscriptions(&id, 3, &methods());
        commands.disconnected(&id, 2);
        assert_eq!(
            commands.subscribed_connection(&id, Subscription::Methods),
            Some(3)
        );
        commands.disconnected(&id, 3);
        assert!(lock(&commands.inner.online).is_empty());
    }

    #[tokio::test]
    async fn a_device_created_again_never_gets_the_earlier_devices_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (commands, connections, id) = commands(&dir).await;
        let earlier = commands.inner.registry.get(&id).await.unwrap();
        commands.send(&id, SendRequest::default()).await.unwrap();
        let queued = commands.inner.store.pending(&id, 0, 10).await.unwrap();
        let late = queued.into_iter().next().expect("queued");
        assert_eq!(late.generation_id, earlier.generation_id);

        // The device is deleted and created again; a send that raced the delete lands
        // in the new device's queue afterwards.
        commands.inner.registry.delete(&id, None).await.unwrap();
        commands
            .inner
            .registry
            .create(id.clone(), DeviceSpec::default())
            .await
            .unwrap();
        commands.inner.store.enqueue(&id, late, 50).await.unwrap();
        assert_eq!(commands.queue_length(&id).await.unwrap(), 1);

        let connection = register(&connections, &id);
        commands.subscriptions(
            &id,
            connection.connection,
            &BTreeSet::from([Subscription::CloudToDevice]),
        );
        commands.deliver_pending(&id).await;
        let (delivered, _) = connection.mailbox.drain();
        assert!(
            delivered.is_empty(),
            "the earlier device's message was delivered"
        );
        assert_eq!(
            commands.queue_length(&id).await.unwrap(),
            0,
            "and it is dropped"
        );

        // A message sent to the new device is delivered.
        commands.send(&id, SendRequest::default()).await.unwrap();
        commands.deliver_pending(&id).await;
        let (delivered, _) = connection.mailbox.drain();
        assert_eq!(delivered.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_waits_for_a_device_whose_connection_just_ended() {
        let dir = tempfile::tempdir().unwrap();
        let (commands, connections, id) = commands(&dir).await;
        let old = register(&connections, &id);
        commands.subscriptions(&id, old.connection, &methods());
        // The connection is gone from the table; its `disconnected` has not run yet.
        connections.unregister(&id, old.connection);

        let call = {
            let (commands, id) = (commands.clone(), id.clone());
            tokio::spawn(async move {
                commands
                    .invoke(
                        &id,
                        "reboot",
                        Bytes::new(),
                        Duration::from_secs(30),
                        Duration::from_secs(5),
                    )
                    .await
            })
        };
        tokio::task::yield_now().await;
        assert!(!call.is_finished(), "answered before the connect timeout");
        commands.disconnected(&id, old.connection);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!call.is_finished(), "answered before the connect timeout");

        // The device reconnects within the connect timeout and answers.
        let new = register(&connections, &id);
        commands.subscriptions(&id, new.connection, &methods());
        tokio::task::yield_now().await;
        let (queued, _) = new.mailbox.drain();
        let request = queued.first().expect("the call reached the new connection");
        let rid = request
            .topic
            .rsplit_once("$rid=")
            .map(|(_, rid)| rid.to_string())
            .unwrap();
        commands.respond(&id, &rid, 200, Bytes::from_static(b"{}"));
        let (status, _) = call.await.unwrap().unwrap();
        assert_eq!(status, 200);
    }
}
