//! Cloud-to-device queues and their feedback on JetStream (cluster mode).
//!
//! - Queues: the stream `c2d`, one subject per device (`c2d.{encoded id}`), file
//!   storage, the configured replicas. The stream refuses the message that would
//!   make a subject hold more than the queue depth (`max_msgs_per_subject` with
//!   `discard_new_per_subject`), so a full queue answers 403004 instead of losing its
//!   oldest message. A message's `seq` is its stream sequence (it only grows, so a
//!   delivery id never names two messages); a count is the subject's message count
//!   from the stream's state; delivery reads the subject from a sequence on; a removal
//!   deletes the message by sequence.
//! - Delivery counts: the KV bucket `hub-c2d-deliveries`, key `{device}.{seq}`,
//!   incremented with compare-and-set.
//! - Expiry: when a message is queued, a one-shot schedule (`Nats-Schedule: @at …`,
//!   JetStream's message scheduler) goes into the stream `c2d-expiry`; at the expiry
//!   JetStream itself writes `c2d-expiry.due.{device}.{seq}`, and every hub's sweep
//!   pulls those from one shared durable consumer, removes the message with Expired
//!   feedback where asked, and acks. Nothing is scanned, and the schedule survives
//!   hub restarts. (Per-message TTL would delete the message silently: no feedback.)
//! - Feedback: the work-queue stream `c2d-feedback`. A removal publishes the record
//!   before deleting the message, with the message's sequence as `Nats-Msg-Id`, so a
//!   crash in between repeats the record at worst and two racing removals (a PUBACK
//!   and the sweep) write one. Batches are locked by the durable pull consumer
//!   `c2d-feedback-receiver` (ack wait = the lock time: a batch not acknowledged in
//!   time is delivered again); the lock token names a KV entry in
//!   `hub-c2d-feedback-locks` holding the batch's ack subjects, so any hub node, also
//!   after a restart, can acknowledge it; acking removes the records.

use std::future::IntoFuture;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{
    self, DeleteMessageError, DeleteMessageErrorKind, DiscardPolicy, LastRawMessageErrorKind,
    RetentionPolicy, StorageType,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::time::Instant;

use super::{NatsStore, keys};
use crate::commands::c2d::{
    C2dMessage, CommandStore, EnqueueError, FeedbackLock, FeedbackRecord, FeedbackStatus, Removed,
};
use crate::registry::DeviceId;
use crate::storage::StoreError;

/// The queues' stream.
pub const STREAM: &str = "c2d";
/// The stream of expiry schedules and the due markers they produce.
pub const EXPIRY_STREAM: &str = "c2d-expiry";
/// The feedback stream.
pub const FEEDBACK_STREAM: &str = "c2d-feedback";
/// Delivery counts.
pub const DELIVERIES_BUCKET: &str = "hub-c2d-deliveries";
/// Feedback lock tokens.
pub const LOCKS_BUCKET: &str = "hub-c2d-feedback-locks";
/// The shared durable consumer of due markers.
const SWEEPER: &str = "c2d-expiry-sweeper";
/// The shared durable consumer that locks feedback batches.
const RECEIVER: &str = "c2d-feedback-receiver";
/// How long a due marker stays with one sweep before another hub may take it.
const SWEEP_ACK_WAIT: Duration = Duration::from_secs(30);
/// JetStream drops a publish whose `Nats-Msg-Id` it saw within this window.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Feedback written through other hub nodes is not signalled here: an empty
/// `lock_feedback` says to look again after this.
const FEEDBACK_POLL: Duration = Duration::from_millis(250);
/// Delivery counts outlive any message (the longest TTL is 2 days); a count left
/// behind by a removal racing a delivery goes with the bucket's age limit.
const DELIVERIES_MAX_AGE: Duration = Duration::from_secs(3 * 24 * 3600);
/// Unacknowledged feedback records a receiver may hold locked at once.
const MAX_LOCKED_FEEDBACK: i64 = 10_000;
/// Compare-and-set tries of one delivery count before it fails.
const COUNT_TRIES: u32 = 10;
/// Tries of one feedback ack, and how long each waits for JetStream's answer.
const ACK_TRIES: u32 = 3;
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// The server's answer to a message over the per-subject limit with discard-new.
const QUEUE_FULL: &str = "maximum messages per subject exceeded";

/// The subject of `device`'s queue. A message's body on it is the message as JSON;
/// its `seq` is the stream's and its `delivery_count` the bucket's.
fn queue_subject(device: &DeviceId) -> String {
    format!("{STREAM}.{}", keys::encode(device.as_str()))
}

fn delivery_key(device: &DeviceId, seq: u64) -> String {
    format!("{}.{seq}", keys::encode(device.as_str()))
}

/// A feedback lock as stored under its token.
#[derive(Debug, Serialize, Deserialize)]
struct StoredLock {
    /// The lock's end, Unix milliseconds.
    until_ms: u128,
    /// The ack subjects of the batch's messages.
    acks: Vec<String>,
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn backend(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{what}: {err}"))
}

/// Whether a delete failed because the message is not there (any more).
fn is_gone(err: &DeleteMessageError) -> bool {
    matches!(err.kind(), DeleteMessageErrorKind::JetStream(e)
        if e.error_code() == ErrorCode::STREAM_MESSAGE_DELETE_FAILED)
}

fn is_queue_full(err: &PublishError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = source {
        if err.to_string().contains(QUEUE_FULL) {
            return true;
        }
        source = err.source();
    }
    false
}

/// C2D queues, delivery counts, expiry schedules and feedback on JetStream.
pub struct NatsCommands {
    store: NatsStore,
    queues: stream::Stream,
    expiry: stream::Stream,
    feedback: stream::Stream,
    sweeper: PullConsumer,
    receiver: PullConsumer,
    deliveries: kv::Store,
    locks: kv::Store,
    depth: usize,
}

impl std::fmt::Debug for NatsCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsCommands")
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

impl NatsCommands {
    /// Creates (or updates) the streams, buckets and consumers: queues hold at most
    /// `depth` messages per device; feedback batches stay locked for `lock`.
    pub async fn open(store: &NatsStore, depth: usize, lock: Duration) -> Result<Self, StoreError> {
        let replicas = store.replicas();
        let queues = store
            .stream(stream::Config {
                name: STREAM.to_string(),
                subjects: vec![format!("{STREAM}.*")],
                num_replicas: replicas,
                storage: StorageType::File,
                max_messages_per_subject: i64::try_from(depth).unwrap_or(i64::MAX),
                discard: DiscardPolicy::New,
                discard_new_per_subject: true,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await?;
        let expiry = store
            .stream(stream::Config {
                name: EXPIRY_STREAM.to_string(),
                subjects: vec![format!("{EXPIRY_STREAM}.>")],
                num_replicas: replicas,
                storage: StorageType::File,
                // One schedule per message subject: sending it again replaces it.
                max_messages_per_subject: 1,
                allow_message_schedules: true,
                ..Default::default()
            })
            .await?;
        let feedback = store
            .stream(stream::Config {
                name: FEEDBACK_STREAM.to_string(),
                subjects: vec![FEEDBACK_STREAM.to_string()],
                num_replicas: replicas,
                storage: StorageType::File,
                // Acknowledged records go.
                retention: RetentionPolicy::WorkQueue,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await?;
        let sweeper = durable(
            store,
            &expiry,
            pull::Config {
                durable_name: Some(SWEEPER.to_string()),
                filter_subject: format!("{EXPIRY_STREAM}.due.>"),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait: SWEEP_ACK_WAIT,
                max_deliver: -1,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        let receiver = durable(
            store,
            &feedback,
            pull::Config {
                durable_name: Some(RECEIVER.to_string()),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait: lock,
                max_deliver: -1,
                max_ack_pending: MAX_LOCKED_FEEDBACK,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        let deliveries = bucket(store, DELIVERIES_BUCKET, DELIVERIES_MAX_AGE).await?;
        // A token outlives its lock a little, so a late acknowledgement is told the
        // lock expired (its records were offered again) rather than "unknown".
        let locks = bucket(store, LOCKS_BUCKET, lock * 2 + Duration::from_secs(60)).await?;
        Ok(Self {
            store: store.clone(),
            queues,
            expiry,
            feedback,
            sweeper,
            receiver,
            deliveries,
            locks,
            depth,
        })
    }

    fn decode(&self, device: &DeviceId, raw: &StreamMessage) -> Result<C2dMessage, StoreError> {
        let mut message: C2dMessage =
            serde_json::from_slice(&raw.payload).map_err(|err| StoreError::Corrupt {
                table: STREAM,
                key: format!("{device}/{}", raw.sequence),
                reason: err.to_string(),
            })?;
        message.seq = raw.sequence;
        Ok(message)
    }

    /// The first message of `stream` on `subject` at sequence `from` or later, if any;
    /// `what` names the read in logs and errors.
    async fn next_on_subject(
        &self,
        stream: &stream::Stream,
        subject: &str,
        from: u64,
        what: &str,
    ) -> Result<Option<StreamMessage>, StoreError> {
        self.store
            .retrying(what, || async {
                let found = stream
                    .raw_message_builder()
                    .sequence(from)
                    .next_by_subject(subject.to_string())
                    .send()
                    .await;
                match found {
                    Ok(raw) => Ok(Some(raw)),
                    Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                    Err(err) => Err(err),
                }
            })
            .await
    }

    /// Message `seq` of `device`, if it is still queued.
    async fn message(&self, device: &DeviceId, seq: u64) -> Result<Option<C2dMessage>, StoreError> {
        let found = self
            .store
            .retrying("read a C2D message", || async {
                match self.queues.get_raw_message(seq).await {
                    Ok(raw) => Ok(Some(raw)),
                    Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                    Err(err) => Err(err),
                }
            })
            .await?;
        match found {
            // A sequence of another device's queue is not this device's message.
            Some(raw) if raw.subject.as_str() == queue_subject(device) => {
                self.decode(device, &raw).map(Some)
            }
            _ => Ok(None),
        }
    }

    async fn delivery_count(&self, device: &DeviceId, seq: u64) -> Result<u32, StoreError> {
        let key = delivery_key(device, seq);
        let value = self
            .store
            .retrying("read a C2D delivery count", || {
                self.deliveries.get(key.as_str())
            })
            .await?;
        Ok(value
            .and_then(|bytes| std::str::from_utf8(&bytes).ok()?.parse().ok())
            .unwrap_or(0))
    }

    /// Deletes message `seq`; `false` when it was already gone.
    async fn delete(&self, seq: u64) -> Result<bool, StoreError> {
        self.store
            .retrying("delete a C2D message", || async {
                match self.queues.delete_message(seq).await {
                    Ok(deleted) => Ok(deleted),
                    // "no message found": another removal won.
                    Err(err) if is_gone(&err) => Ok(false),
                    Err(err) => Err(err),
                }
            })
            .await
    }

    async fn publish_feedback(&self, seq: u64, record: &FeedbackRecord) -> Result<(), StoreError> {
        let payload = Bytes::from(serde_json::to_vec(record).map_err(|e| backend("feedback", e))?);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("c2d-{seq}").as_str());
        let js = self.store.jetstream();
        self.store
            .retrying("write C2D feedback", || async {
                js.publish_with_headers(FEEDBACK_STREAM, headers.clone(), payload.clone())
                    .await?
                    .await
            })
            .await
            .map(drop)
    }

    /// Removes one message with feedback of `status` where asked.
    async fn finish(
        &self,
        device: &DeviceId,
        seq: u64,
        status: FeedbackStatus,
    ) -> Result<Removed, StoreError> {
        let Some(message) = self.message(device, seq).await? else {
            return Ok(Removed::default());
        };
        // The record first: a crash before the delete repeats it at worst, and the
        // message id makes a racing removal's copy a duplicate JetStream drops.
        let record = message.feedback(device, status, status.description());
        if let Some(record) = &record {
            self.publish_feedback(seq, record).await?;
        }
        if !self.delete(seq).await? {
            return Ok(Removed::default());
        }
        let key = delivery_key(device, seq);
        if let Err(err) = self
            .store
            .retrying("drop a C2D delivery count", || {
                self.deliveries.purge(key.as_str())
            })
            .await
        {
            // The bucket's age limit removes it later.
            tracing::debug!(%device, seq, error = %err, "delivery count left behind");
        }
        Ok(Removed {
            messages: 1,
            feedback: usize::from(record.is_some()),
        })
    }

    /// Schedules the due marker of message `seq` at its expiry.
    async fn schedule_expiry(
        &self,
        device: &DeviceId,
        seq: u64,
        expiry: OffsetDateTime,
    ) -> Result<(), StoreError> {
        // Whole seconds, rounded up: the marker never comes before the expiry.
        let at = expiry
            .replace_nanosecond(0)
            .map_err(|e| backend("expiry", e))?
            + time::Duration::seconds(i64::from(expiry.nanosecond() > 0));
        let at = at
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| backend("expiry", e))?;
        let token = keys::encode(device.as_str());
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Schedule", format!("@at {at}").as_str());
        headers.insert(
            "Nats-Schedule-Target",
            format!("{EXPIRY_STREAM}.due.{token}.{seq}").as_str(),
        );
        let subject = format!("{EXPIRY_STREAM}.at.{token}.{seq}");
        let js = self.store.jetstream();
        self.store
            .retrying("schedule a C2D expiry", || async {
                js.publish_with_headers(subject.clone(), headers.clone(), Bytes::new())
                    .await?
                    .await
            })
            .await
            .map(drop)
    }
}

/// The durable consumer `config` describes, created or brought up to date.
async fn durable(
    store: &NatsStore,
    stream: &stream::Stream,
    config: pull::Config,
) -> Result<PullConsumer, StoreError> {
    let name = config.durable_name.clone().unwrap_or_default();
    store
        .retrying(&format!("create consumer {name}"), || async {
            match stream.create_consumer(config.clone()).await {
                Ok(consumer) => Ok(consumer),
                // It exists with other settings (another lock time): update it.
                Err(_) => stream.update_consumer(config.clone()).await,
            }
        })
        .await
}

async fn bucket(store: &NatsStore, name: &str, max_age: Duration) -> Result<kv::Store, StoreError> {
    let config = kv::Config {
        bucket: name.to_string(),
        history: 1,
        max_age,
        num_replicas: store.replicas(),
        storage: StorageType::File,
        ..Default::default()
    };
    store
        .retrying(&format!("create bucket {name}"), || {
            store.jetstream().create_or_update_key_value(config.clone())
        })
        .await
}

/// Device and sequence of a due marker's subject `c2d-expiry.due.{device}.{seq}`.
fn parse_due(subject: &str) -> Option<(DeviceId, u64)> {
    let rest = subject.strip_prefix(&format!("{EXPIRY_STREAM}.due."))?;
    let (token, seq) = rest.rsplit_once('.')?;
    let device = DeviceId::parse(&keys::decode(token)?).ok()?;
    Some((device, seq.parse().ok()?))
}

#[async_trait]
impl CommandStore for NatsCommands {
    async fn enqueue(
        &self,
        device: &DeviceId,
        mut message: C2dMessage,
        max: usize,
    ) -> Result<C2dMessage, EnqueueError> {
        // The stream enforces the depth it was opened with; the service passes the
        // same number.
        debug_assert_eq!(max, self.depth, "queue depth differs from the stream's");
        let payload = Bytes::from(
            serde_json::to_vec(&message).map_err(|e| backend("encode a C2D message", e))?,
        );
        // One id for every try: a retry of a publish that did land is a duplicate and
        // answers with the first copy's sequence.
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", crate::commands::random_hex(16).as_str());
        let subject = queue_subject(device);
        let js = self.store.jetstream();
        let seq = self
            .store
            .retrying("queue a C2D message", || async {
                let ack = js
                    .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                    .await?;
                match ack.await {
                    Ok(ack) => Ok(Some(ack.sequence)),
                    Err(err) if is_queue_full(&err) => Ok(None),
                    Err(err) => Err(err),
                }
            })
            .await?
            .ok_or(EnqueueError::QueueFull(max))?;
        if let Err(err) = self.schedule_expiry(device, seq, message.expiry).await {
            // A message that could never expire must not stay: take it back.
            if let Err(undo) = self.delete(seq).await {
                tracing::warn!(%device, seq, error = %undo, "cannot take back a C2D message without an expiry");
            }
            return Err(err.into());
        }
        message.seq = seq;
        message.delivery_count = 0;
        Ok(message)
    }

    async fn count(&self, device: &DeviceId) -> Result<usize, StoreError> {
        let subject = queue_subject(device);
        self.store
            .retrying("count a C2D queue", || async {
                let mut info = self.queues.info_with_subjects(subject.as_str()).await?;
                let mut count = 0;
                while let Some((found, n)) = info.try_next().await? {
                    if found == subject {
                        count = n;
                    }
                }
                Ok::<_, stream::InfoError>(count)
            })
            .await
    }

    async fn counts(&self, devices: &[DeviceId]) -> Result<Vec<usize>, StoreError> {
        // One stream-state request per device, 16 at a time.
        let mut out = Vec::with_capacity(devices.len());
        for chunk in devices.chunks(16) {
            out.extend(
                futures_util::future::try_join_all(chunk.iter().map(|d| self.count(d))).await?,
            );
        }
        Ok(out)
    }

    async fn pending(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<C2dMessage>, StoreError> {
        let subject = queue_subject(device);
        let mut out = Vec::new();
        let mut from = after.saturating_add(1);
        while out.len() < limit {
            let next = self
                .next_on_subject(&self.queues, &subject, from, "read a C2D queue")
                .await?;
            let Some(raw) = next else { break };
            let mut message = self.decode(device, &raw)?;
            message.delivery_count = self.delivery_count(device, raw.sequence).await?;
            from = raw.sequence.saturating_add(1);
            out.push(message);
        }
        Ok(out)
    }

    async fn record_delivery(&self, device: &DeviceId, seq: u64) -> Result<bool, StoreError> {
        if self.message(device, seq).await?.is_none() {
            return Ok(false);
        }
        let key = delivery_key(device, seq);
        // Compare-and-set: two hubs counting at once both count.
        for _ in 0..COUNT_TRIES {
            let entry = self
                .store
                .retrying("read a C2D delivery count", || {
                    self.deliveries.entry(key.as_str())
                })
                .await?;
            let written = match entry.filter(|e| e.operation == kv::Operation::Put) {
                Some(entry) => {
                    let count: u32 = std::str::from_utf8(&entry.value)
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(0);
                    let value = Bytes::from(count.saturating_add(1).to_string());
                    self.deliveries
                        .update(key.as_str(), value, entry.revision)
                        .await
                        .map_err(|e| e.to_string())
                }
                None => self
                    .deliveries
                    .create(key.as_str(), Bytes::from_static(b"1"))
                    .await
                    .map_err(|e| e.to_string()),
            };
            match written {
                Ok(_) => return Ok(true),
                // Lost a race (or a leader change): read again and retry; a lasting
                // failure shows up in the read's retries.
                Err(err) => tracing::debug!(%device, seq, error = %err, "delivery count retry"),
            }
        }
        Err(StoreError::Backend(format!(
            "cannot count a delivery of C2D message {seq} of {device} in {COUNT_TRIES} tries"
        )))
    }

    async fn complete(
        &self,
        device: &DeviceId,
        seqs: &[u64],
        status: FeedbackStatus,
    ) -> Result<Removed, StoreError> {
        let mut removed = Removed::default();
        for seq in seqs {
            removed += self.finish(device, *seq, status).await?;
        }
        Ok(removed)
    }

    async fn purge(
        &self,
        device: &DeviceId,
        status: FeedbackStatus,
    ) -> Result<Removed, StoreError> {
        // Each message's ack mode decides its feedback: read them (a purge is rare and
        // a queue holds at most the depth).
        let seqs: Vec<u64> = self
            .pending(device, 0, usize::MAX)
            .await?
            .iter()
            .map(|m| m.seq)
            .collect();
        self.complete(device, &seqs, status).await
    }

    async fn drop_queue(&self, device: &DeviceId) -> Result<(), StoreError> {
        // Its expiry schedules fire later and find nothing; its delivery counts age out.
        let subject = queue_subject(device);
        self.store
            .retrying("drop a C2D queue", || {
                self.queues.purge().filter(subject.as_str()).into_future()
            })
            .await
            .map(drop)
    }

    async fn expire(&self, _now: OffsetDateTime, limit: usize) -> Result<Removed, StoreError> {
        // JetStream's scheduler decides what is due (at the message's expiry, by the
        // server's clock): take what it produced, without waiting for more.
        let due = self
            .store
            .fetch_now(&self.sweeper, limit, "read due C2D expiries")
            .await?;
        let mut removed = Removed::default();
        let mut markers = Vec::new();
        for marker in due {
            let info = marker.info().map(|i| i.stream_sequence).ok();
            match parse_due(marker.subject.as_str()) {
                Some((device, seq)) => {
                    removed += self.finish(&device, seq, FeedbackStatus::Expired).await?;
                }
                None => {
                    tracing::warn!(subject = %marker.subject, "unreadable C2D due marker dropped")
                }
            }
            // Handled (an error above leaves it unacknowledged: it comes back).
            marker
                .double_ack()
                .await
                .map_err(|e| backend("ack a C2D due marker", e))?;
            markers.extend(info);
        }
        for seq in markers {
            // Limits retention: the marker is done with.
            let _ = self.expiry.delete_message(seq).await;
        }
        Ok(removed)
    }

    async fn feedback(&self) -> Result<Vec<(u64, FeedbackRecord)>, StoreError> {
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let next = self
                .next_on_subject(&self.feedback, FEEDBACK_STREAM, from, "read C2D feedback")
                .await?;
            let Some(raw) = next else { return Ok(out) };
            let record =
                serde_json::from_slice(&raw.payload).map_err(|err| StoreError::Corrupt {
                    table: FEEDBACK_STREAM,
                    key: raw.sequence.to_string(),
                    reason: err.to_string(),
                })?;
            out.push((raw.sequence, record));
            from = raw.sequence.saturating_add(1);
        }
    }

    async fn remove_feedback(&self, keys: &[u64]) -> Result<(), StoreError> {
        for seq in keys {
            self.store
                .retrying("remove C2D feedback", || async {
                    match self.feedback.delete_message(*seq).await {
                        Ok(_) => Ok(()),
                        Err(err) if is_gone(&err) => Ok(()),
                        Err(err) => Err(err),
                    }
                })
                .await?;
        }
        Ok(())
    }

    async fn lock_feedback(&self, max: usize, lock: Duration) -> Result<FeedbackLock, StoreError> {
        let empty = || FeedbackLock::Empty {
            retry: Some(Instant::now() + FEEDBACK_POLL),
        };
        let until_ms = unix_ms() + lock.as_millis();
        let batch = self
            .store
            .fetch_now(&self.receiver, max, "lock C2D feedback")
            .await?;
        let mut records = Vec::new();
        let mut acks = Vec::new();
        for message in batch {
            let Some(reply) = message.reply.clone() else {
                continue;
            };
            match serde_json::from_slice::<FeedbackRecord>(&message.payload) {
                Ok(record) => {
                    records.push(record);
                    acks.push(reply.to_string());
                }
                Err(err) => {
                    // Never deliverable: take it out of the way.
                    tracing::warn!(error = %err, "unreadable C2D feedback record dropped");
                    let _ = message.double_ack().await;
                }
            }
        }
        if records.is_empty() {
            return Ok(empty());
        }
        let token = crate::commands::random_hex(16);
        let stored = Bytes::from(
            serde_json::to_vec(&StoredLock { until_ms, acks }).map_err(|e| backend("lock", e))?,
        );
        // If this fails the records stay unacknowledged and come back after the lock.
        self.store
            .retrying("record a C2D feedback lock", || {
                self.locks.create(token.as_str(), stored.clone())
            })
            .await?;
        Ok(FeedbackLock::Locked { token, records })
    }

    async fn acknowledge_feedback(&self, token: &str) -> Result<bool, StoreError> {
        let Some(lock) = self.claim_lock(token).await? else {
            return Ok(false);
        };
        self.settle(token, &lock, b"+ACK").await?;
        Ok(true)
    }

    async fn abandon_feedback(&self, token: &str) -> Result<bool, StoreError> {
        let Some(lock) = self.claim_lock(token).await? else {
            return Ok(false);
        };
        // A NAK redelivers at once (an ack would delete).
        self.settle(token, &lock, b"-NAK").await?;
        Ok(true)
    }
}

impl NatsCommands {
    /// The live lock under `token`, taken for this call alone: it is read, then
    /// deleted on the condition that it is still the revision read. A read may come
    /// from a replica that has not seen an earlier claim yet (KV direct gets), so the
    /// conditional delete — decided by the stream's leader — is what makes a second
    /// acknowledgement of the same token find nothing.
    async fn claim_lock(&self, token: &str) -> Result<Option<StoredLock>, StoreError> {
        // Lock tokens are hex; anything else names no lock (and no KV key).
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let entry = self
            .store
            .retrying("read a C2D feedback lock", || self.locks.entry(token))
            .await?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(None);
        };
        let lock: StoredLock =
            serde_json::from_slice(&entry.value).map_err(|e| StoreError::Corrupt {
                table: LOCKS_BUCKET,
                key: token.to_string(),
                reason: e.to_string(),
            })?;
        if lock.until_ms <= unix_ms() {
            return Ok(None);
        }
        match self
            .locks
            .delete_expect_revision(token, Some(entry.revision))
            .await
        {
            Ok(()) => Ok(Some(lock)),
            Err(err) if err.kind() == kv::DeleteErrorKind::WrongLastRevision => Ok(None),
            Err(err) => Err(StoreError::Backend(format!(
                "claim C2D feedback lock {token}: {err}"
            ))),
        }
    }

    /// Answers every record of a lock with `reply` (`+ACK` deletes, `-NAK`
    /// redelivers) and drops the lock.
    async fn settle(
        &self,
        token: &str,
        lock: &StoredLock,
        reply: &'static [u8],
    ) -> Result<(), StoreError> {
        let client = self.store.client();
        for ack in &lock.acks {
            // A request, not a publish: JetStream answers once the ack is applied. A
            // few tries, not the whole retry window: an ack that does not land only
            // offers its record again after the lock (feedback is at least once).
            for attempt in 1..=ACK_TRIES {
                let answer = tokio::time::timeout(
                    ACK_TIMEOUT,
                    client.request(ack.clone(), Bytes::from_static(reply)),
                )
                .await;
                match answer {
                    Ok(Ok(_)) => break,
                    Ok(Err(err)) => {
                        tracing::debug!(attempt, error = %err, "C2D feedback ack failed")
                    }
                    Err(_) => tracing::debug!(attempt, "C2D feedback ack unanswered"),
                }
            }
        }
        self.store
            .retrying("drop a C2D feedback lock", || self.locks.purge(token))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_markers_name_their_device_and_message() {
        let device = DeviceId::parse("a.b:c").unwrap();
        let subject = format!("{EXPIRY_STREAM}.due.{}.42", keys::encode(device.as_str()));
        assert_eq!(parse_due(&subject), Some((device, 42)));
        assert_eq!(parse_due("c2d-expiry.due.x"), None);
        assert_eq!(parse_due("c2d-expiry.at.x.1"), None);
    }
}
