//! The embedded telemetry log: one directory of segment files per partition,
//! committed by `telemetry.committers` group committers ([`super::appender`]) that
//! share the partitions between them. The partition count is fixed by the first
//! start of a data directory.

use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::appender::{self, AppendError, BatchLimits, Partition};
use super::ingest::{Durable, IngestError};
use super::segment::{LogError, Record, SegmentLog};
use super::{TelemetryError, TelemetryLog};
use crate::config::TelemetryConfig;

/// Most bytes one read returns.
const MAX_READ_BYTES: usize = 4 * 1024 * 1024;

/// The partitions of an embedded hub, in segment files under one directory.
pub struct SegmentPartitions {
    partitions: Vec<Partition>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for SegmentPartitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentPartitions")
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl SegmentPartitions {
    /// Opens the partitions under `dir` (recovering torn tails) and starts their
    /// committers. The partition count is fixed by the first start.
    pub fn open(dir: &Path, config: &TelemetryConfig) -> Result<Self, TelemetryError> {
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
        // Partition p goes to committer p mod committers.
        let committers = config.committers.clamp(1, config.partitions);
        let mut groups: Vec<Vec<Box<dyn appender::PartitionStore>>> =
            (0..committers).map(|_| Vec::new()).collect();
        for (id, log) in open_partitions(dir, config.partitions, config.segment_bytes)?
            .into_iter()
            .enumerate()
        {
            groups[id % committers as usize].push(Box::new(log));
        }
        let mut slots: Vec<Option<Partition>> = (0..config.partitions).map(|_| None).collect();
        let mut threads = Vec::new();
        for (committer, stores) in groups.into_iter().enumerate() {
            let (group, thread) =
                Partition::start_group(stores, limits, format!("telemetry-c{committer}"))
                    .map_err(io(dir))?;
            for (nth, partition) in group.into_iter().enumerate() {
                slots[committer + nth * committers as usize] = Some(partition);
            }
            threads.push(thread);
        }
        let partitions = slots.into_iter().flatten().collect();
        Ok(Self {
            partitions,
            threads: Mutex::new(threads),
        })
    }

    fn partition(&self, id: u32) -> Result<&Partition, TelemetryError> {
        self.partitions
            .get(id as usize)
            .ok_or(TelemetryError::NoSuchPartition(
                id,
                (self.partitions.len() as u32).saturating_sub(1),
            ))
    }
}

/// Opens partitions `p0` … `p{count-1}` of `dir`, in order. Sealed segments open
/// from their persisted indexes; a segment that has to be walked (no usable index,
/// or the last one after a crash) is read whole, so the partitions recover side by
/// side, as many at once as there are cores (each holds one segment in memory while
/// it is scanned).
fn open_partitions(
    dir: &Path,
    count: u32,
    segment_bytes: u64,
) -> Result<Vec<SegmentLog>, TelemetryError> {
    let at_once = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, count.max(1) as usize);
    let ids: Vec<u32> = (0..count).collect();
    let mut logs = Vec::with_capacity(count as usize);
    for wave in ids.chunks(at_once) {
        let opened: Vec<Result<SegmentLog, LogError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = wave
                .iter()
                .map(|id| {
                    let path = dir.join(format!("p{id}"));
                    scope.spawn(move || SegmentLog::open(&path, segment_bytes))
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| {
                    handle
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        for log in opened {
            logs.push(log?);
        }
    }
    Ok(logs)
}

#[async_trait]
impl TelemetryLog for SegmentPartitions {
    async fn append_all(
        &self,
        partition: u32,
        records: Vec<(i64, Bytes)>,
    ) -> Result<Durable, IngestError> {
        let partition = self
            .partition(partition)
            .map_err(|err| IngestError::Commit(err.to_string()))?;
        let receipt = partition
            .submit_all(records)
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

    async fn bounds(&self, partition: u32) -> Result<(u64, u64), TelemetryError> {
        Ok(self.partition(partition)?.bounds())
    }

    async fn read(
        &self,
        partition: u32,
        from: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>, TelemetryError> {
        let part = self.partition(partition)?;
        let mut end = part.watch_end();
        if wait > Duration::ZERO && *end.borrow_and_update() <= from {
            // Timing out is a normal, empty answer.
            let _ = tokio::time::timeout(wait, end.wait_for(|&e| e > from)).await;
        }
        part.read(from, max, MAX_READ_BYTES)
            .map_err(|err| match err {
                LogError::BeforeRetention { requested, first } => {
                    TelemetryError::BeforeRetention { requested, first }
                }
                other => TelemetryError::Log(other),
            })
    }

    fn apply_retention(&self, older_than: i64, total_bytes: u64) -> usize {
        let per_partition = total_bytes / (self.partitions.len() as u64).max(1);
        let mut removed = 0;
        for (id, partition) in self.partitions.iter().enumerate() {
            match partition.apply_retention(older_than, per_partition) {
                Ok(n) => removed += n,
                Err(err) => tracing::warn!(partition = id, error = %err, "retention failed"),
            }
        }
        removed
    }

    fn render_metrics(&self) -> String {
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

    fn close(&self) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_recovered_side_by_side_come_back_in_order_with_their_records() {
        let dir = tempfile::tempdir().unwrap();
        // Partition i holds i + 1 records, each naming its partition, over several
        // segments; a fifth partition was never written.
        for id in 0..4u8 {
            let mut log = SegmentLog::open(&dir.path().join(format!("p{id}")), 4096).unwrap();
            for _ in 0..=id {
                log.append(&[(0, Bytes::from(vec![id; 3000]))]).unwrap();
            }
        }
        let logs = open_partitions(dir.path(), 5, 4096).unwrap();
        assert_eq!(logs.len(), 5);
        for (id, log) in logs.iter().enumerate() {
            let expected = if id < 4 { id as u64 + 1 } else { 0 };
            assert_eq!(log.end_offset(), expected, "partition {id}");
            for record in log.read(0, 100, usize::MAX).unwrap() {
                assert!(record.payload.iter().all(|&b| usize::from(b) == id));
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitions_shared_by_committers_each_get_their_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let config = TelemetryConfig {
            partitions: 4,
            committers: 3,
            ..TelemetryConfig::default()
        };
        let log = SegmentPartitions::open(dir.path(), &config).unwrap();
        let mut durables = Vec::new();
        for round in 0..3u8 {
            for partition in 0..4u8 {
                let records = vec![(0, Bytes::from(vec![partition, round]))];
                durables.push(log.append_all(u32::from(partition), records).await.unwrap());
            }
        }
        for durable in durables {
            durable.await.unwrap();
        }
        for partition in 0..4u8 {
            let records = log
                .read(u32::from(partition), 0, 100, Duration::ZERO)
                .await
                .unwrap();
            let got: Vec<Vec<u8>> = records.iter().map(|r| r.payload.to_vec()).collect();
            assert_eq!(
                got,
                (0..3u8)
                    .map(|round| vec![partition, round])
                    .collect::<Vec<_>>(),
                "partition {partition}"
            );
        }
        tokio::task::spawn_blocking(move || log.close())
            .await
            .unwrap();
        // The data dir opens again with another committer count.
        let config = TelemetryConfig {
            committers: 1,
            ..config
        };
        let log = SegmentPartitions::open(dir.path(), &config).unwrap();
        assert_eq!(log.bounds(3).await.unwrap(), (0, 3));
        tokio::task::spawn_blocking(move || log.close())
            .await
            .unwrap();
    }
}
