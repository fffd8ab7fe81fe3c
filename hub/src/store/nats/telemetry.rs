//! Telemetry on JetStream: a stream per partition (`telemetry-{p}`, subject
//! `telemetry.{p}`, leaders spread over the NATS nodes; which streams, and the single
//! stream `telemetry` of clusters created before, in [`super::telemetry_streams`]),
//! with the configured replicas, file storage, and retention as stream limits (age,
//! and the partition's share of the bytes).
//!
//! Offsets: a message's offset is its stream sequence minus one. With a stream per
//! partition, a partition's offsets are consecutive (retention removes from the
//! front); in the shared stream of an older cluster they increase but are not
//! consecutive (the other partitions' messages take the sequences between). Either
//! way a reader continues from `nextOffset`, as Event Hubs readers do, and a
//! partition's first offset is its stream's first sequence minus one: what retention
//! removed lies before it.
//!
//! Publishing: each partition has one publisher task per hub process, fed by a
//! bounded queue (the backpressure that stops device connections reading). It keeps up
//! to [`WINDOW`] publishes in flight and releases their PUBACKs strictly in order, each
//! only after JetStream acknowledged it (stored on a quorum of replicas). When an ack
//! fails (a leader change: no responders, or no ack within the timeout) it goes back:
//! the failed message and every later one are published again, in order, with the
//! same `Nats-Msg-Id`, so copies that did land are dropped as duplicates and the order
//! of the partition is kept. A message still unacknowledged `cluster.retry_secs` after
//! its first failure fails, with everything behind it; the device gets no PUBACK and
//! sends again.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::NatsStore;
pub use super::telemetry_streams::subject;
use super::telemetry_streams::{self, Layout};
use crate::config::TelemetryConfig;
use crate::storage::StoreError;
use crate::telemetry::segment::Record;
use crate::telemetry::{Durable, IngestError};
use crate::telemetry::{TelemetryError, TelemetryLog};

/// Publishes per partition awaiting their ack at once.
const WINDOW: usize = 1024;
/// Header carrying the hub's receipt time (Unix nanoseconds).
const TIME_HEADER: &str = "Hub-Enqueued-Nanos";
/// Tries of one read before its error reaches the caller.
const READ_ATTEMPTS: u32 = 5;
/// Most bytes one read returns.
const MAX_READ_BYTES: usize = 4 * 1024 * 1024;
/// Pauses between tries of a publish that failed (first, longest).
const PUBLISH_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(50), Duration::from_millis(500));

/// A message waiting for its ack.
struct Pending {
    id: String,
    time: i64,
    payload: Bytes,
    /// When its first try failed.
    failing_since: Option<Instant>,
    done: oneshot::Sender<Result<(), IngestError>>,
}

type AckFuture = Pin<Box<dyn std::future::Future<Output = Result<(), PublishError>> + Send>>;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct PublishStats {
    acked: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
}

/// The telemetry partitions of a cluster, on JetStream streams.
pub struct JetStreamTelemetry {
    store: NatsStore,
    /// Each partition's stream, in partition order.
    streams: Vec<stream::Stream>,
    partitions: u32,
    queues: Mutex<Option<Vec<mpsc::Sender<Pending>>>>,
    publishers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    next_id: AtomicU64,
    stats: Arc<PublishStats>,
}

impl std::fmt::Debug for JetStreamTelemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamTelemetry")
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl JetStreamTelemetry {
    /// Creates (or updates the limits of) the partitions' streams and starts one
    /// publisher per partition. `max_pending` messages per partition may wait for an
    /// ack before appends wait.
    pub async fn open(
        store: &NatsStore,
        config: &TelemetryConfig,
        max_pending: usize,
    ) -> Result<Self, StoreError> {
        let (layout, streams) = telemetry_streams::open_streams(store, config).await?;
        tracing::info!(
            shared = layout == Layout::Shared,
            partitions = config.partitions,
            "telemetry streams open"
        );
        let stats = Arc::new(PublishStats::default());
        let mut queues = Vec::new();
        let mut publishers = Vec::new();
        for partition in 0..config.partitions {
            let (tx, rx) = mpsc::channel(max_pending.max(1));
            queues.push(tx);
            publishers.push(tokio::spawn(publish_loop(
                store.clone(),
                subject(partition),
                rx,
                Arc::clone(&stats),
            )));
        }
        Ok(Self {
            store: store.clone(),
            streams,
            partitions: config.partitions,
            queues: Mutex::new(Some(queues)),
            publishers: Mutex::new(publishers),
            next_id: AtomicU64::new(0),
            stats,
        })
    }

    fn check(&self, partition: u32) -> Result<(), TelemetryError> {
        if partition < self.partitions {
            Ok(())
        } else {
            Err(TelemetryError::NoSuchPartition(
                partition,
                self.partitions.saturating_sub(1),
            ))
        }
    }

    /// The stream of `partition` (checked by the caller).
    fn stream(&self, partition: u32) -> Result<&stream::Stream, TelemetryError> {
        self.streams
            .get(partition as usize)
            .ok_or(TelemetryError::NoSuchPartition(
                partition,
                self.partitions.saturating_sub(1),
            ))
    }

    /// The partition's stream's first sequence minus one: its first offset.
    async fn first_offset(&self, partition: u32) -> Result<u64, TelemetryError> {
        let stream = self.stream(partition)?;
        let info = self
            .store
            .retrying("read the telemetry stream's state", || stream.get_info())
            .await
            .map_err(|err| TelemetryError::Stream(err.to_string()))?;
        Ok(info.state.first_sequence.saturating_sub(1))
    }

    /// Reads what is there from `start_sequence` on (or waits up to `wait` for the
    /// first message) through an ephemeral consumer.
    async fn fetch(
        &self,
        partition: u32,
        start_sequence: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>, TelemetryError> {
        let stream_error = |err: &dyn std::fmt::Display| TelemetryError::Stream(err.to_string());
        let stream = self.stream(partition)?;
        let consumer: async_nats::jetstream::consumer::PullConsumer = self
            .store
            .retrying("create a telemetry reader", || {
                stream.create_consumer(pull::Config {
                    filter_subject: subject(partition),
                    deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
                    ack_policy: AckPolicy::None,
                    inactive_threshold: Duration::from_secs(30),
                    memory_storage: true,
                    num_replicas: 1,
                    ..Default::default()
                })
            })
            .await
            .map_err(|err| stream_error(&err))?;
        let mut records = Vec::new();
        let result = async {
            let batch = consumer
                .fetch()
                .max_messages(max)
                .max_bytes(MAX_READ_BYTES)
                .messages()
                .await
                .map_err(|err| stream_error(&err))?;
            collect(batch, &mut records).await?;
            if records.is_empty() && wait > Duration::ZERO {
                // Long-poll: wait for the first message only, then take what else
                // arrived with it.
                let first = consumer
                    .batch()
                    .max_messages(1)
                    .expires(wait)
                    .messages()
                    .await
                    .map_err(|err| stream_error(&err))?;
                collect(first, &mut records).await?;
                if !records.is_empty() && max > 1 {
                    let rest = consumer
                        .fetch()
                        .max_messages(max - 1)
                        .max_bytes(MAX_READ_BYTES)
                        .messages()
                        .await
                        .map_err(|err| stream_error(&err))?;
                    collect(rest, &mut records).await?;
                }
            }
            Ok::<_, TelemetryError>(())
        }
        .await;
        // The consumer would expire by itself; deleting it now frees it at once.
        let stream = stream.clone();
        let name = consumer.cached_info().name.clone();
        tokio::spawn(async move {
            let _ = stream.delete_consumer(&name).await;
        });
        result.map(|()| records)
    }
}

/// Appends the messages of `batch` to `records` as stored records.
async fn collect<S, E>(mut batch: S, records: &mut Vec<Record>) -> Result<(), TelemetryError>
where
    S: futures_util::Stream<Item = Result<async_nats::jetstream::Message, E>> + Unpin,
    E: std::fmt::Display,
{
    while let Some(message) = batch.next().await {
        let message = message.map_err(|err| TelemetryError::Stream(err.to_string()))?;
        let sequence = message
            .info()
            .map_err(|err| TelemetryError::Stream(format!("message without metadata: {err}")))?
            .stream_sequence;
        let time = message
            .headers
            .as_ref()
            .and_then(|h| h.get(TIME_HEADER))
            .and_then(|v| v.as_str().parse().ok())
            .unwrap_or(0);
        records.push(Record {
            offset: sequence.saturating_sub(1),
            time,
            payload: message.payload.clone(),
        });
    }
    Ok(())
}

impl JetStreamTelemetry {
    /// Queues one record for its partition's publisher; the future completes once
    /// the stream acknowledged it.
    async fn append(
        &self,
        partition: u32,
        time: i64,
        payload: Bytes,
    ) -> Result<Durable, IngestError> {
        let queue = {
            let queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
            match queues.as_ref().and_then(|q| q.get(partition as usize)) {
                Some(queue) => queue.clone(),
                None => return Err(IngestError::Closed),
            }
        };
        let (done, receipt) = oneshot::channel();
        let id = format!(
            "{}.{partition}.{}",
            self.store.node_id(),
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let pending = Pending {
            id,
            time,
            payload,
            failing_since: None,
            done,
        };
        // Waiting here while the partition's queue is full is the backpressure.
        queue.send(pending).await.map_err(|_| IngestError::Closed)?;
        Ok(Box::pin(async move {
            receipt.await.unwrap_or(Err(IngestError::Closed))
        }))
    }
}

#[async_trait]
impl TelemetryLog for JetStreamTelemetry {
    /// One record at a time: each is its own publish on the partition's queue.
    async fn append_all(
        &self,
        partition: u32,
        records: Vec<(i64, Bytes)>,
    ) -> Result<Durable, IngestError> {
        let mut durables = Vec::with_capacity(records.len());
        for (time, payload) in records {
            durables.push(self.append(partition, time, payload).await?);
        }
        Ok(Box::pin(async move {
            for durable in durables {
                durable.await?;
            }
            Ok(())
        }))
    }

    async fn bounds(&self, partition: u32) -> Result<(u64, u64), TelemetryError> {
        self.check(partition)?;
        let first = self.first_offset(partition).await?;
        let stream = self.stream(partition)?;
        let last = self
            .store
            .retrying("read a partition's last message", || async {
                match stream.direct_get_last_for_subject(subject(partition)).await {
                    Ok(message) => Ok(Some(message.sequence)),
                    Err(err) if err.kind() == DirectGetErrorKind::NotFound => Ok(None),
                    Err(err) => Err(err),
                }
            })
            .await
            .map_err(|err| TelemetryError::Stream(err.to_string()))?;
        // One past the last offset is the last message's sequence.
        Ok((first, last.map_or(first, |sequence| sequence.max(first))))
    }

    async fn read(
        &self,
        partition: u32,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>, TelemetryError> {
        self.check(partition)?;
        let first = self.first_offset(partition).await?;
        if from < first {
            return Err(TelemetryError::BeforeRetention {
                requested: from,
                first,
            });
        }
        // A pull request can meet "no responders" right after its consumer was
        // created (the consumer's interest has not reached this server yet) or while
        // a node is lost; a fresh consumer a moment later reads fine.
        let mut attempt = 1;
        loop {
            match self.fetch(partition, from + 1, max.max(1), wait).await {
                Err(TelemetryError::Stream(err)) if attempt < READ_ATTEMPTS => {
                    tracing::debug!(%err, attempt, "telemetry read failed; reading again");
                    tokio::time::sleep(PUBLISH_BACKOFF.0 * attempt).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    fn apply_retention(&self, _older_than: i64, _total_bytes: u64) -> usize {
        // The stream's own limits (max age, max bytes) remove old messages.
        0
    }

    fn render_metrics(&self) -> String {
        let stats = &self.stats;
        format!(
            "# TYPE hub_telemetry_jetstream_acked_total counter\nhub_telemetry_jetstream_acked_total {}\n\
             # TYPE hub_telemetry_jetstream_retries_total counter\nhub_telemetry_jetstream_retries_total {}\n\
             # TYPE hub_telemetry_jetstream_failed_total counter\nhub_telemetry_jetstream_failed_total {}\n",
            stats.acked.load(Ordering::Relaxed),
            stats.retried.load(Ordering::Relaxed),
            stats.failed.load(Ordering::Relaxed),
        )
    }

    fn close(&self) {
        // Dropping the queues ends each publisher once its last message is acked.
        drop(
            self.queues
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let publishers = std::mem::take(
            &mut *self
                .publishers
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let deadline = self.store.retry_window() + Duration::from_secs(1);
        runtime.block_on(async {
            let all = futures_util::future::join_all(publishers);
            if tokio::time::timeout(deadline, all).await.is_err() {
                tracing::warn!("telemetry publishers did not finish before shutdown");
            }
        });
    }
}

fn publish_message(pending: &Pending) -> PublishMessage {
    PublishMessage::build()
        .payload(pending.payload.clone())
        .message_id(&pending.id)
        .header(TIME_HEADER, pending.time.to_string().as_str())
}

/// One partition's publisher: publishes in order with up to [`WINDOW`] acks
/// outstanding, releases results in order, and goes back on a failure (see the
/// module docs).
async fn publish_loop(
    store: NatsStore,
    subject: String,
    mut queue: mpsc::Receiver<Pending>,
    stats: Arc<PublishStats>,
) {
    let jetstream = store.jetstream().clone();
    let mut reconnects = store.reconnects();
    reconnects.borrow_and_update();
    let mut in_flight: VecDeque<(Pending, AckFuture)> = VecDeque::new();
    // Messages to publish (again) before any new one.
    let mut again: VecDeque<Pending> = VecDeque::new();
    let mut open = true;
    let mut pause = PUBLISH_BACKOFF.0;
    loop {
        while in_flight.len() < WINDOW
            && let Some(pending) = again.pop_front()
        {
            in_flight.push_back(publish(&jetstream, &subject, pending).await);
        }
        if in_flight.is_empty() && again.is_empty() && !open {
            return;
        }
        let can_take = open && again.is_empty() && in_flight.len() < WINDOW;
        let front_ack = async {
            match in_flight.front_mut() {
                Some((_, ack)) => ack.await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            // Acks are awaited oldest first: results go out in submission order.
            result = front_ack => Event::Acked(result),
            next = queue.recv(), if can_take => Event::Queued(next),
            // The acks of what was sent on the lost connection will not come: go back
            // at once instead of waiting out the ack timeout.
            Ok(()) = reconnects.changed() => Event::Reconnected,
        };
        match event {
            Event::Reconnected => {
                if !in_flight.is_empty() {
                    let mut retry: VecDeque<Pending> =
                        in_flight.drain(..).map(|(p, _)| p).collect();
                    tracing::debug!(%subject, queued = retry.len(), "NATS reconnected; publishing the unacknowledged telemetry again");
                    stats
                        .retried
                        .fetch_add(retry.len() as u64, Ordering::Relaxed);
                    retry.append(&mut again);
                    again = retry;
                }
            }
            Event::Queued(Some(pending)) => {
                in_flight.push_back(publish(&jetstream, &subject, pending).await);
            }
            Event::Queued(None) => open = false,
            Event::Acked(result) => {
                let Some((pending, _)) = in_flight.pop_front() else {
                    continue;
                };
                match result {
                    Ok(()) => {
                        stats.acked.fetch_add(1, Ordering::Relaxed);
                        pause = PUBLISH_BACKOFF.0;
                        let _ = pending.done.send(Ok(()));
                    }
                    Err(err) if err.kind() == PublishErrorKind::MaxPayloadExceeded => {
                        // No retry can fix this one; the ones behind it are unaffected.
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        let _ = pending.done.send(Err(IngestError::Commit(err.to_string())));
                    }
                    Err(err) => {
                        let first_failure = pending.failing_since.unwrap_or_else(Instant::now);
                        // This message and every later one go again, in order.
                        let mut retry: VecDeque<Pending> = VecDeque::new();
                        retry.push_back(pending);
                        retry.extend(in_flight.drain(..).map(|(p, _)| p));
                        retry.append(&mut again);
                        if first_failure.elapsed() >= store.retry_window() {
                            tracing::warn!(%subject, error = %err, "JetStream did not acknowledge telemetry in time; failing the queued messages");
                            for pending in retry {
                                stats.failed.fetch_add(1, Ordering::Relaxed);
                                let _ = pending.done.send(Err(IngestError::Commit(format!(
                                    "JetStream did not acknowledge within {:?}: {err}",
                                    store.retry_window()
                                ))));
                            }
                            continue;
                        }
                        tracing::debug!(%subject, error = %err, queued = retry.len(), "telemetry publish failed; publishing again");
                        stats
                            .retried
                            .fetch_add(retry.len() as u64, Ordering::Relaxed);
                        for pending in &mut retry {
                            pending.failing_since.get_or_insert(first_failure);
                        }
                        again = retry;
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(PUBLISH_BACKOFF.1);
                    }
                }
            }
        }
    }
}

/// What woke a publisher.
enum Event {
    /// The oldest publish in flight was acknowledged, or failed.
    Acked(Result<(), PublishError>),
    /// A new message arrived (`None`: the queue closed).
    Queued(Option<Pending>),
    /// The client connected again after losing its server.
    Reconnected,
}

/// Sends one publish; a send that fails at once becomes an ack that fails, so the
/// loop handles both alike.
async fn publish(
    jetstream: &async_nats::jetstream::Context,
    subject: &str,
    pending: Pending,
) -> (Pending, AckFuture) {
    let sent: Result<PublishAckFuture, PublishError> = jetstream
        .send_publish(subject.to_string(), publish_message(&pending))
        .await;
    let ack: AckFuture = match sent {
        Ok(ack) => Box::pin(async move { ack.into_future().await.map(drop) }),
        Err(err) => Box::pin(async move { Err(err) }),
    };
    (pending, ack)
}
