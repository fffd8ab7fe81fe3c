//! The cluster-mode backend: the hub's state in NATS JetStream (DESIGN section 4).
//! Telemetry is a replicated stream per partition ([`telemetry`], [`telemetry_streams`]);
//! consumer-group checkpoints are a replicated KV bucket ([`checkpoints`]); device
//! identities ([`registry`]), device twins ([`twins`]) and persistent MQTT sessions
//! ([`sessions`]) are KV buckets with compare-and-set on the revision where writers
//! may race; C2D queues are a stream with a subject per device, their feedback a
//! work-queue stream ([`c2d`]). Several hub nodes share one cluster: [`nodes`] keeps
//! their heartbeats and device presence and routes methods and C2D notices to the node
//! holding a device; [`secrets`] shares the owner key and the development CA. Every
//! stream and bucket has the configured replica count (3 by default), so losing one
//! NATS node loses nothing JetStream acknowledged.
//!
//! [`NatsStore`] holds the connection and creates the streams and buckets; JetStream
//! requests that fail while a leader is being elected are retried up to
//! `cluster.retry_secs` ([`NatsStore::retrying`]).

pub mod c2d;
pub mod checkpoints;
pub mod keys;
pub mod nodes;
pub mod provisioning;
pub mod registry;
pub mod secrets;
pub mod sessions;
pub mod status;
pub mod telemetry;
pub mod telemetry_streams;
pub mod twins;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_trait::async_trait;

use crate::config::ClusterConfig;
use crate::storage::{StoreError, StoreHealth};

/// How long one JetStream request (or a KV write's ack) may wait for its answer
/// before [`NatsStore::retrying`] tries again. Short, because an answer that does not
/// come within it is almost always lost (its NATS node died, or the stream has no
/// leader yet), and every caller already treats a failed try as "may have been
/// stored" (twin and registry writes carry write ids for that). At 5 s, killing the
/// NATS node a hub was connected to stalled its twin writes 3–5 s, and a leader
/// election longer than 5 s doubled the stall to 10 s.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long opening a TCP connection to a NATS server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a telemetry publish waits for JetStream's ack before it is sent again
/// (with the same message id, so a late first copy is dropped as a duplicate).
const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// The first and the longest pause between two tries of a failed request.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

/// A connection to the NATS cluster holding the hub's state.
#[derive(Clone)]
pub struct NatsStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    replicas: usize,
    retry: Duration,
    /// Unique per process: telemetry message ids start with it.
    node_id: String,
    /// Counts the client's reconnections: whatever was in flight on the old connection
    /// will not be acknowledged there.
    reconnects: tokio::sync::watch::Receiver<u64>,
}

impl std::fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStore")
            .field("node_id", &self.inner.node_id)
            .field("replicas", &self.inner.replicas)
            .finish_non_exhaustive()
    }
}

impl NatsStore {
    /// Connects to the servers of `config.nats` (any one that answers; the client
    /// learns the others and reconnects to them when its server goes away).
    pub async fn connect(config: &ClusterConfig) -> Result<Self, StoreError> {
        let urls = config.nats.join(",");
        let servers = config
            .nats
            .iter()
            .map(|url| url.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| StoreError::Open {
                path: urls.clone().into(),
                reason: format!("invalid NATS server address: {err}"),
            })?;
        let (reconnected, reconnects) = tokio::sync::watch::channel(0u64);
        let reconnected = Arc::new(reconnected);
        let client = async_nats::ConnectOptions::new()
            .name("hub")
            .connection_timeout(CONNECT_TIMEOUT)
            // Unlimited reconnects: the hub outlives any one NATS node.
            .max_reconnects(None)
            .event_callback(move |event| {
                let reconnected = reconnected.clone();
                async move {
                    tracing::info!(%event, "NATS connection event");
                    if matches!(event, async_nats::Event::Connected) {
                        reconnected.send_modify(|n| *n += 1);
                    }
                }
            })
            .connect(servers)
            .await
            .map_err(|err| StoreError::Open {
                path: urls.clone().into(),
                reason: format!("cannot connect to NATS: {err}"),
            })?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .ack_timeout(ACK_TIMEOUT)
            .max_ack_inflight(1 << 16)
            .backpressure_on_inflight(true)
            .build(client.clone());
        // An inbox ends in a fresh NUID: unique enough to tell hub processes apart.
        let node_id = client
            .new_inbox()
            .rsplit('.')
            .next()
            .unwrap_or("hub")
            .to_string();
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                jetstream,
                replicas: config.replicas,
                retry: Duration::from_secs(config.retry_secs),
                node_id,
                reconnects,
            }),
        })
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.jetstream
    }

    /// The core NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Replicas of every stream and bucket.
    pub fn replicas(&self) -> usize {
        self.inner.replicas
    }

    /// How long writes retry through a leader change.
    pub fn retry_window(&self) -> Duration {
        self.inner.retry
    }

    /// Ticks each time the client has connected again after losing its server.
    pub fn reconnects(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.reconnects.clone()
    }

    /// This process's id among the hub nodes.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// Runs `op` until it succeeds or `cluster.retry_secs` have passed since the first
    /// failure, pausing with exponential backoff between tries; `what` names the
    /// operation in logs and in the final error. See [`retry`].
    pub async fn retrying<T, E, F, Fut>(&self, what: &str, op: F) -> Result<T, StoreError>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        retry(what, self.inner.retry, self.reconnects(), op).await
    }

    /// Up to `max` messages `consumer` has now, without waiting for more. A message
    /// that fails to arrive ends the batch (what was not taken is offered again);
    /// `what` names the read in logs and errors.
    pub async fn fetch_now(
        &self,
        consumer: &jetstream::consumer::PullConsumer,
        max: usize,
        what: &str,
    ) -> Result<Vec<jetstream::Message>, StoreError> {
        use futures_util::StreamExt;
        let mut batch = self
            .retrying(what, || consumer.fetch().max_messages(max).messages())
            .await?;
        let mut messages = Vec::new();
        while let Some(next) = batch.next().await {
            match next {
                Ok(message) => messages.push(message),
                Err(err) => {
                    tracing::debug!(error = %err, what, "batch ended early");
                    break;
                }
            }
        }
        Ok(messages)
    }

    /// The stream `config` describes, created if missing and updated if its limits
    /// changed.
    pub async fn stream(&self, config: stream::Config) -> Result<stream::Stream, StoreError> {
        let name = config.name.clone();
        self.retrying(&format!("create stream {name}"), || {
            self.inner.jetstream.create_or_update_stream(config.clone())
        })
        .await?;
        self.retrying(&format!("open stream {name}"), || {
            self.inner.jetstream.get_stream(name.as_str())
        })
        .await
    }

    /// The KV bucket `name` (keeping `history` revisions per key), created if
    /// missing, with the configured replicas and file storage.
    pub async fn bucket(&self, name: &str, history: i64) -> Result<kv::Store, StoreError> {
        self.bucket_with_ttl(name, history, Duration::ZERO).await
    }

    /// Like [`NatsStore::bucket`], with entries expiring `ttl` after their last write
    /// (zero: never).
    pub async fn bucket_with_ttl(
        &self,
        name: &str,
        history: i64,
        ttl: Duration,
    ) -> Result<kv::Store, StoreError> {
        let config = kv::Config {
            bucket: name.to_string(),
            history,
            max_age: ttl,
            num_replicas: self.inner.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        self.retrying(&format!("create bucket {name}"), || {
            self.inner
                .jetstream
                .create_or_update_key_value(config.clone())
        })
        .await
    }
}

/// The bucket of cluster-wide facts fixed at the first start (the partition count).
pub const META_BUCKET: &str = "hub-meta";

impl NatsStore {
    /// Records `partitions` as the cluster's telemetry partition count on the first
    /// start; later starts must configure the same count (a message's partition is
    /// its device's hash modulo the count, so changing it would split a device's
    /// order across partitions).
    pub async fn claim_partition_count(&self, partitions: u32) -> Result<(), StoreError> {
        const KEY: &str = "telemetry-partitions";
        let meta = self.bucket(META_BUCKET, 1).await?;
        let value = bytes::Bytes::from(partitions.to_string());
        let created = self
            .retrying("record the partition count", || async {
                match meta.create(KEY, value.clone()).await {
                    Ok(_) => Ok(true),
                    Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                    Err(err) => Err(err),
                }
            })
            .await?;
        if created {
            return Ok(());
        }
        let stored = self
            .retrying("read the partition count", || meta.get(KEY))
            .await?
            .and_then(|bytes| std::str::from_utf8(&bytes).ok()?.parse::<u32>().ok());
        match stored {
            Some(stored) if stored == partitions => Ok(()),
            stored => Err(StoreError::Open {
                path: META_BUCKET.into(),
                reason: format!(
                    "telemetry.partitions is {partitions} but this cluster was created with {}; the partition count of a cluster cannot change",
                    stored.map_or_else(|| "an unreadable value".to_string(), |s| s.to_string())
                ),
            }),
        }
    }
}

#[async_trait]
impl StoreHealth for NatsStore {
    async fn ping(&self) -> Result<(), StoreError> {
        // An account-info request needs a JetStream meta leader: the cluster can
        // serve requests.
        tokio::time::timeout(REQUEST_TIMEOUT, self.inner.jetstream.query_account())
            .await
            .map_err(|_| StoreError::Backend("JetStream did not answer in time".into()))?
            .map(drop)
            .map_err(|err| StoreError::Backend(format!("JetStream: {err}")))
    }
}

/// Runs `op` until it succeeds or `window` has passed, pausing with exponential
/// backoff between failures (an attempt whose answer did not come within
/// [`REQUEST_TIMEOUT`] is a failure). An attempt in flight when the NATS client
/// reconnects (`reconnects` changes) is given up and made again at once: the answer to
/// a request sent on the connection that was replaced never comes. Every caller treats
/// any try after the first as "the earlier one may have been stored" (twin and
/// registry writes recognise their own write), so giving a try up is as safe as its
/// timing out, only sooner.
async fn retry<T, E, F, Fut>(
    what: &str,
    window: Duration,
    mut reconnects: tokio::sync::watch::Receiver<u64>,
    mut op: F,
) -> Result<T, StoreError>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + window;
    let mut pause = BACKOFF.0;
    reconnects.borrow_and_update();
    loop {
        let attempt = tokio::select! {
            result = op() => Some(result),
            Ok(()) = reconnects.changed() => None,
        };
        let Some(result) = attempt else {
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Backend(format!(
                    "{what}: the NATS connection was replaced while waiting for the answer"
                )));
            }
            tracing::debug!(
                what,
                "NATS connection replaced mid-request; trying again at once"
            );
            continue;
        };
        match result {
            Ok(value) => return Ok(value),
            Err(err) if tokio::time::Instant::now() + pause < deadline => {
                tracing::debug!(%err, what, "JetStream request failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(BACKOFF.1);
            }
            Err(err) => {
                return Err(StoreError::Backend(format!("{what}: {err}")));
            }
        }
    }
}

#[cfg(test)]
mod retry_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_request_lost_with_its_connection_is_made_again_at_once() {
        let (reconnected, reconnects) = tokio::sync::watch::channel(0u64);
        let attempts = AtomicUsize::new(0);
        let started = tokio::time::Instant::now();
        let op = || {
            let first = attempts.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    // Sent on the connection that dies: no answer before the timeout.
                    tokio::time::sleep(REQUEST_TIMEOUT).await;
                    return Err("timed out");
                }
                Ok(7)
            }
        };
        let call = retry("twin write", Duration::from_secs(30), reconnects, op);
        let reconnect = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = reconnected.send(1);
            std::future::pending::<()>().await
        };
        let answer = tokio::select! {
            answer = call => answer,
            () = reconnect => unreachable!("the reconnect task never ends"),
        };
        assert_eq!(answer.unwrap(), 7);
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_with_backoff_until_the_window_closes() {
        let (_reconnected, reconnects) = tokio::sync::watch::channel(0u64);
        let attempts = AtomicUsize::new(0);
        let op = || {
            attempts.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>("no responders") }
        };
        let err = retry("twin write", Duration::from_secs(2), reconnects, op)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("twin write: no responders"),
            "{err}"
        );
        // 50, 100, 200, 400 ms, then 1 s pauses: a handful of tries in 2 s.
        let tries = attempts.load(Ordering::SeqCst);
        assert!((4..=8).contains(&tries), "{tries} tries");
    }
}
