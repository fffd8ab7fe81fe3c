//! Durable, partitioned telemetry streams (DESIGN sections 2–4).
//!
//! A message from the gateway is routed by [`partitioner`] to a partition, encoded
//! ([`message`]), and queued to that partition's group committer ([`appender`]),
//! which appends batches to the partition's segment files ([`segment`]) with one
//! `fdatasync` each and only then releases the PUBACKs. Readers read durable records
//! by offset, wait for new ones (long-poll, WebSocket), and keep consumer-group
//! checkpoints in a [`CheckpointStore`]. Retention deletes whole old segments by age
//! and total size.

pub mod appender;
pub mod message;
pub mod partitioner;
pub mod segment;

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::config::TelemetryConfig;
use crate::gateway::services::{Durable, IngestError, TelemetryIngest, TelemetryMessage};
use crate::store::StoreError;
use appender::{AppendError, BatchLimits, Partition};
use message::StoredMessage;
use partitioner::Partitioner;
use segment::{LogError, SegmentLog};

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
    partitions: Vec<Partition>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    checkpoints: Arc<dyn CheckpointStore>,
    retention: Duration,
    retention_bytes: u64,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Opens the partitions under `dir` (recovering torn tails) and starts their
    /// committers. The partition count is fixed by the first start.
    pub fn open(
        dir: &Path,
        config: &TelemetryConfig,
        checkpoints: Arc<dyn CheckpointStore>,
    ) -> Result<Self, TelemetryError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TelemetryError::Io { path, source }
        };
        crate::data_dir::create_private_dir_all(dir).map_err(io(dir))?;
        let count_file = dir.join("partitions");
        match std::fs::read_to_string(&count_file) {
            Ok(text) => {
                let stored: u32 = text.trim().parse().map_err(|_| TelemetryError::Io {
                    path: count_file.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "not a partition count",
                    ),
                })?;
                if stored != config.partitions {
                    return Err(TelemetryError::PartitionCountChanged {
                        stored,
                        configured: config.partitions,
                    });
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(crate::data_dir::PRIVATE_FILE_MODE)
                    .open(&count_file)
                    .and_then(|mut file| writeln!(file, "{}", config.partitions))
                    .map_err(io(&count_file))?;
            }
            Err(source) => {
                return Err(TelemetryError::Io {
                    path: count_file,
                    source,
                });
            }
        }
        let limits = BatchLimits {
            max_messages: config.max_batch_messages,
            max_bytes: config.max_batch_bytes,
            max_wait: Duration::from_micros(config.max_batch_wait_micros),
            queue_bytes: config.queue_bytes,
        };
        let mut partitions = Vec::new();
        let mut threads = Vec::new();
        for id in 0..config.partitions {
            let log = SegmentLog::open(&dir.join(format!("p{id}")), config.segment_bytes)?;
            let (partition, thread) =
                Partition::start(Box::new(log), limits, format!("telemetry-p{id}"))
                    .map_err(io(dir))?;
            partitions.push(partition);
            threads.push(thread);
        }
        Ok(Self {
            partitioner: Partitioner::new(config.partitions),
            partitions,
            threads: Mutex::new(threads),
            checkpoints,
            retention: Duration::from_secs(config.retention_secs),
            retention_bytes: config.retention_bytes,
        })
    }

    /// Number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.partitioner.count()
    }

    fn partition(&self, id: u32) -> Result<&Partition, TelemetryError> {
        self.partitions
            .get(id as usize)
            .ok_or(TelemetryError::NoSuchPartition(
                id,
                self.partition_count().saturating_sub(1),
            ))
    }

    /// Stored ranges of every partition.
    pub fn info(&self) -> Vec<PartitionInfo> {
        (0u32..)
            .zip(&self.partitions)
            .map(|(id, partition)| {
                let (first_offset, end_offset) = partition.bounds();
                PartitionInfo {
                    id,
                    first_offset,
                    end_offset,
                }
            })
            .collect()
    }

    /// The stored range of one partition.
    pub fn partition_info(&self, id: u32) -> Result<PartitionInfo, TelemetryError> {
        let (first_offset, end_offset) = self.partition(id)?.bounds();
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
        let part = self.partition(partition)?;
        let mut end = part.watch_end();
        if wait > Duration::ZERO && *end.borrow_and_update() <= from {
            // Timing out is a normal, empty answer.
            let _ = tokio::time::timeout(wait, end.wait_for(|&e| e > from)).await;
        }
        let records = part.read(from, max, 4 * 1024 * 1024)?;
        records
            .iter()
            .map(|r| message::decode(r.offset, r.time, &r.payload).map_err(TelemetryError::from))
            .collect()
    }

    /// Watches the durable end of `partition` (for streaming readers).
    pub fn watch_end(&self, partition: u32) -> Result<watch::Receiver<u64>, TelemetryError> {
        Ok(self.partition(partition)?.watch_end())
    }

    /// The checkpoint of `group` in `partition`.
    pub async fn checkpoint(
        &self,
        group: &str,
        partition: u32,
    ) -> Result<Option<u64>, TelemetryError> {
        self.partition(partition)?;
        Ok(self.checkpoints.checkpoint(group, partition).await?)
    }

    /// Sets the checkpoint of `group` in `partition` (the next offset it reads).
    pub async fn set_checkpoint(
        &self,
        group: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), TelemetryError> {
        self.partition(partition)?;
        Ok(self
            .checkpoints
            .set_checkpoint(group, partition, offset)
            .await?)
    }

    /// Deletes segments past the retention age or size; returns how many went.
    pub fn apply_retention(&self) -> usize {
        let now = OffsetDateTime::now_utc().unix_timestamp_nanos();
        let older_than = i64::try_from(now - self.retention.as_nanos() as i128).unwrap_or(i64::MIN);
        let per_partition = self.retention_bytes / u64::from(self.partition_count().max(1));
        let mut removed = 0;
        for (id, partition) in self.partitions.iter().enumerate() {
            match partition.apply_retention(older_than, per_partition) {
                Ok(n) => removed += n,
                Err(err) => tracing::warn!(partition = id, error = %err, "retention failed"),
            }
        }
        if removed > 0 {
            tracing::info!(
                segments = removed,
                "retention removed old telemetry segments"
            );
        }
        removed
    }

    /// Prometheus text: commit latency histogram, committed messages, queued bytes and
    /// end offset, per partition.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP hub_telemetry_commit_seconds durable commit latency per partition\n# TYPE hub_telemetry_commit_seconds histogram"
        );
        for (id, partition) in self.partitions.iter().enumerate() {
            let stats = partition.stats();
            for (bound, bucket) in appender::COMMIT_BUCKETS.iter().zip(&stats.buckets) {
                let _ = writeln!(
                    out,
                    "hub_telemetry_commit_seconds_bucket{{partition=\"{id}\",le=\"{bound}\"}} {}",
                    bucket.load(Relaxed)
                );
            }
            let count = stats.count.load(Relaxed);
            let _ = writeln!(
                out,
                "hub_telemetry_commit_seconds_bucket{{partition=\"{id}\",le=\"+Inf\"}} {count}"
            );
            let sum = stats.sum_micros.load(Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "hub_telemetry_commit_seconds_sum{{partition=\"{id}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "hub_telemetry_commit_seconds_count{{partition=\"{id}\"}} {count}"
            );
        }
        type Reading = fn(&Partition) -> u64;
        let gauges: [(&str, &str, Reading); 3] = [
            ("hub_telemetry_messages_committed_total", "counter", |p| {
                p.stats().messages.load(Relaxed)
            }),
            (
                "hub_telemetry_queue_bytes",
                "gauge",
                Partition::queued_bytes,
            ),
            ("hub_telemetry_end_offset", "gauge", |p| p.bounds().1),
        ];
        for (name, kind, value) in gauges {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (id, partition) in self.partitions.iter().enumerate() {
                let _ = writeln!(out, "{name}{{partition=\"{id}\"}} {}", value(partition));
            }
        }
        out
    }

    /// Refuses further appends and waits for the committers to commit what is
    /// queued. Blocks; call it off the async workers.
    pub fn close(&self) {
        for partition in &self.partitions {
            partition.close();
        }
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

#[async_trait]
impl TelemetryIngest for Telemetry {
    async fn submit(&self, message: TelemetryMessage) -> Result<Durable, IngestError> {
        let id = self.partitioner.partition(message.device_id.as_str());
        let partition = self
            .partition(id)
            .map_err(|err| IngestError::Commit(err.to_string()))?;
        let time = i64::try_from(message.enqueued_at.unix_timestamp_nanos()).unwrap_or(i64::MAX);
        let payload = message::encode(&message);
        if payload.len() > segment::MAX_PAYLOAD {
            // Refused before it is queued, so no PUBACK can follow; stored, it would
            // be a record that reads and recovery take for damage.
            return Err(IngestError::Commit(
                segment::LogError::TooLarge { len: payload.len() }.to_string(),
            ));
        }
        let receipt = partition
            .submit(time, payload)
            .await
            .map_err(|_| IngestError::Closed)?;
        Ok(Box::pin(async move {
            match receipt.await {
                Ok(Ok(_offset)) => Ok(()),
                Ok(Err(AppendError::Commit(err))) => Err(IngestError::Commit(err.to_string())),
                Ok(Err(AppendError::Closed)) | Err(_) => Err(IngestError::Closed),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::device::AuthMethod;
    use crate::gateway::topic::PropertyBag;
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
        };
        // The body alone fits the record limit; with the metadata it does not.
        let refused = telemetry
            .submit(message(vec![0u8; segment::MAX_PAYLOAD - 100]))
            .await;
        assert!(matches!(refused, Err(IngestError::Commit(_))));
        assert_eq!(
            telemetry.partition(0).unwrap().bounds(),
            (0, 0),
            "nothing stored"
        );

        let durable = telemetry.submit(message(b"fits".to_vec())).await.unwrap();
        durable.await.unwrap();
        assert_eq!(telemetry.partition(0).unwrap().bounds(), (0, 1));
        let _ = tokio::task::spawn_blocking(move || telemetry.close()).await;
    }
}
