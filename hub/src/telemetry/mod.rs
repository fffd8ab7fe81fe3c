//! Durable, partitioned telemetry streams (DESIGN sections 2–4).
//!
//! A message from the gateway is routed by [`partitioner`] to a partition, encoded
//! ([`message`]), and appended to a [`TelemetryLog`]; its PUBACK goes out only once
//! the log says it is durable. Two logs exist: [`segments`] (embedded: per partition
//! a group committer ([`appender`]) appending batches to segment files ([`segment`])
//! with one `fdatasync` each) and the JetStream stream of cluster mode
//! (`store::nats`). Readers read durable records by offset, wait for new ones
//! (long-poll, WebSocket), and keep consumer-group checkpoints in a
//! [`CheckpointStore`]. Retention removes old records by age and total size.

pub mod appender;
pub mod ingest;
pub mod message;
pub mod partitioner;
pub mod segment;
pub mod segment_index;
pub mod segments;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use time::OffsetDateTime;

use crate::config::TelemetryConfig;
use crate::storage::StoreError;
pub use ingest::{Durable, IngestError, TelemetryIngest, TelemetryMessage};
use message::StoredMessage;
use partitioner::Partitioner;
use segment::{LogError, Record};

/// The consumer group used when a reader names none.
pub const DEFAULT_GROUP: &str = "$Default";

/// Consumer-group checkpoints: the next offset a group reads in a partition.
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// The checkpoint of `group` in `partition`, if set.
    async fn checkpoint(&self, group: &str, partition: u32) -> Result<Option<u64>, StoreError>;
    /// Stores the checkpoint of `group` in `partition`.
    async fn set_checkpoint(
        &self,
        group: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), StoreError>;
}

/// Failures of the telemetry streams.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The data dir was created with another partition count.
    #[error(
        "telemetry.partitions is {configured} but this data dir was created with {stored}; the partition count of a data dir cannot change"
    )]
    PartitionCountChanged {
        /// What the data dir holds.
        stored: u32,
        /// What the configuration asks for.
        configured: u32,
    },
    /// Reading or writing the partition count file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A partition log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// No such partition.
    #[error("partition {0} does not exist (partitions are 0 to {1})")]
    NoSuchPartition(u32, u32),
    /// A stored record does not decode.
    #[error(transparent)]
    Decode(#[from] message::DecodeError),
    /// The checkpoint store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The requested offset was removed by retention.
    #[error("offset {requested} is before the first available offset {first}")]
    BeforeRetention {
        /// What was asked for.
        requested: u64,
        /// The first offset still stored.
        first: u64,
    },
    /// The cluster's stream failed or did not answer.
    #[error("telemetry stream: {0}")]
    Stream(String),
}

/// Where a hub's telemetry partitions live: segment files (embedded) or a JetStream
/// stream (cluster mode). Offsets increase along a partition; a reader continues from
/// the offset after the last record it got.
#[async_trait]
pub trait TelemetryLog: Send + Sync + 'static {
    /// Appends `records` (encoded messages with their receipt time, Unix
    /// nanoseconds) in order behind everything appended to `partition` before; the
    /// future completes once all of them are durable. Waits while the log is behind
    /// (backpressure).
    async fn append_all(
        &self,
        partition: u32,
        records: Vec<(i64, Bytes)>,
    ) -> Result<Durable, IngestError>;
    /// The first stored offset and one past the last durable one.
    async fn bounds(&self, partition: u32) -> Result<(u64, u64), TelemetryError>;
    /// Up to `max` records of `partition` from offset `from` on; when there are none
    /// yet, waits up to `wait` for the first.
    async fn read(
        &self,
        partition: u32,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>, TelemetryError>;
    /// Removes records older than `older_than` (Unix nanoseconds) or beyond
    /// `total_bytes`; returns how many units (segments) went. Blocks.
    fn apply_retention(&self, older_than: i64, total_bytes: u64) -> usize;
    /// Prometheus text about the log.
    fn render_metrics(&self) -> String;
    /// Refuses further appends and waits for what is queued. Blocks.
    fn close(&self);
}

/// A partition's stored range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Partition id.
    pub id: u32,
    /// First stored offset.
    pub first_offset: u64,
    /// One past the last durable offset.
    pub end_offset: u64,
}

/// The telemetry streams of one hub.
pub struct Telemetry {
    partitioner: Partitioner,
    log: Arc<dyn TelemetryLog>,
    checkpoints: Arc<dyn CheckpointStore>,
    retention: Duration,
    retention_bytes: u64,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("partitions", &self.partitioner.count())
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Opens the embedded partitions under `dir` (recovering torn tails) and starts
    /// their committers. The partition count is fixed by the first start.
    pub fn open(
        dir: &std::path::Path,
        config: &TelemetryConfig,
        checkpoints: Arc<dyn CheckpointStore>,
    ) -> Result<Self, TelemetryError> {
        let log = segments::SegmentPartitions::open(dir, config)?;
        Ok(Self::new(Arc::new(log), config, checkpoints))
    }

    /// Telemetry over `log`, which holds `config.partitions` partitions.
    pub fn new(
        log: Arc<dyn TelemetryLog>,
        config: &TelemetryConfig,
        checkpoints: Arc<dyn CheckpointStore>,
    ) -> Self {
        Self {
            partitioner: Partitioner::new(config.partitions),
            log,
            checkpoints,
            retention: Duration::from_secs(config.retention_secs),
            retention_bytes: config.retention_bytes,
        }
    }

    /// Number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.partitioner.count()
    }

    fn check(&self, id: u32) -> Result<(), TelemetryError> {
        if id < self.partition_count() {
            Ok(())
        } else {
            Err(TelemetryError::NoSuchPartition(
                id,
                self.partition_count().saturating_sub(1),
            ))
        }
    }

    /// Stored ranges of every partition.
    pub async fn info(&self) -> Result<Vec<PartitionInfo>, TelemetryError> {
        let mut out = Vec::new();
        for id in 0..self.partition_count() {
            out.push(self.partition_info(id).await?);
        }
        Ok(out)
    }

    /// The stored range of one partition.
    pub async fn partition_info(&self, id: u32) -> Result<PartitionInfo, TelemetryError> {
        self.check(id)?;
        let (first_offset, end_offset) = self.log.bounds(id).await?;
        Ok(PartitionInfo {
            id,
            first_offset,
            end_offset,
        })
    }

    /// Up to `max` messages of `partition` from `from`; when there are none yet,
    /// waits up to `wait` for the first to become durable.
    pub async fn read(
        &self,
        partition: u32,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<StoredMessage>, TelemetryError> {
        self.check(partition)?;
        let records = self.log.read(partition, from, max, wait).await?;
        records
            .iter()
            .map(|r| message::decode(r.offset, r.time, &r.payload).map_err(TelemetryError::from))
            .collect()
    }

    /// The checkpoint of `group` in `partition`.
    pub async fn checkpoint(
        &self,
        group: &str,
        partition: u32,
    ) -> Result<Option<u64>, TelemetryError> {
        self.check(partition)?;
        Ok(self.checkpoints.checkpoint(group, partition).await?)
    }

    /// Sets the checkpoint of `group` in `partition` (the next offset it reads).
    pub async fn set_checkpoint(
        &self,
        group: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), TelemetryError> {
        self.check(partition)?;
        Ok(self
            .checkpoints
            .set_checkpoint(group, partition, offset)
            .await?)
    }

    /// Removes records past the retention age or size; returns how many units went.
    /// Blocks; call it off the async workers.
    pub fn apply_retention(&self) -> usize {
        let now = OffsetDateTime::now_utc().unix_timestamp_nanos();
        let older_than = i64::try_from(now - self.retention.as_nanos() as i128).unwrap_or(i64::MIN);
        let removed = self.log.apply_retention(older_than, self.retention_bytes);
        if removed > 0 {
            tracing::info!(
                segments = removed,
                "retention removed old telemetry segments"
            );
        }
        removed
    }

    /// Prometheus text about the partitions.
    pub fn render_metrics(&self) -> String {
        self.log.render_metrics()
    }

    /// Refuses further appends and waits for what is queued to become durable.
    /// Blocks; call it off the async workers.
    pub fn close(&self) {
        self.log.close();
    }
}

#[async_trait]
impl TelemetryIngest for Telemetry {
    async fn submit(&self, messages: Vec<TelemetryMessage>) -> Result<Durable, IngestError> {
        let Some(first) = messages.first() else {
            return Ok(Box::pin(std::future::ready(Ok(()))));
        };
        // One device's messages: one partition.
        let id = self.partitioner.partition(first.device_id.as_str());
        let mut records = Vec::with_capacity(messages.len());
        for message in &messages {
            let time =
                i64::try_from(message.enqueued_at.unix_timestamp_nanos()).unwrap_or(i64::MAX);
            let payload = message::encode(message);
            if payload.len() > segment::MAX_PAYLOAD {
                // Refused before anything is queued, so no PUBACK can follow; stored,
                // it would be a record that reads and recovery take for damage.
                return Err(IngestError::Commit(
                    segment::LogError::TooLarge { len: payload.len() }.to_string(),
                ));
            }
            records.push((time, payload));
        }
        self.log.append_all(id, records).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::device::AuthMethod;
    use crate::properties::PropertyBag;
    use crate::registry::DeviceId;
    use crate::store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn a_message_over_the_record_limit_is_refused_before_it_is_queued() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
        let config = TelemetryConfig {
            partitions: 1,
            ..TelemetryConfig::default()
        };
        let telemetry =
            Telemetry::open(&dir.path().join("telemetry"), &config, Arc::new(store)).unwrap();
        let message = |body: Vec<u8>| TelemetryMessage {
            device_id: DeviceId::parse("d1").unwrap(),
            auth_method: AuthMethod::Sas,
            properties: PropertyBag(vec![("k".into(), "\u{1}".repeat(100))]),
            body: body.into(),
            enqueued_at: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
            model_id: None,
        };
        // The body alone fits the record limit; with the metadata it does not.
        let refused = telemetry
            .submit(vec![message(vec![0u8; segment::MAX_PAYLOAD - 100])])
            .await;
        assert!(matches!(refused, Err(IngestError::Commit(_))));
        assert_eq!(
            telemetry.partition_info(0).await.unwrap().end_offset,
            0,
            "nothing stored"
        );

        let durable = telemetry
            .submit(vec![message(b"fits".to_vec())])
            .await
            .unwrap();
        durable.await.unwrap();
        assert_eq!(telemetry.partition_info(0).await.unwrap().end_offset, 1);
        let _ = tokio::task::spawn_blocking(move || telemetry.close()).await;
    }
}
