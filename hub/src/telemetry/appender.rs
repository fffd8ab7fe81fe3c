//! The group committer of one partition. Appends from many connections queue up
//! while the previous batch is being made durable; a dedicated thread takes
//! everything queued (bounded in count, bytes and linger time), appends it with one
//! write and one `fdatasync`, then answers every waiter. A waiter's PUBACK goes out
//! only after its batch is durable; a failed commit answers every waiter with the
//! error, and none is acknowledged.
//!
//! Memory is bounded by a byte budget per partition: a submitter waits for budget
//! before queueing, which (through the connection task) stops reading the device's
//! socket.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use super::segment::{LogError, Record, SegmentLog};

/// What a partition's storage must do; [`SegmentLog`] in production, a
/// fault-injecting wrapper in tests.
pub trait PartitionStore: Send + Sync + 'static {
    /// Appends a batch durably; returns the first offset.
    fn append(&mut self, batch: &[(i64, Bytes)]) -> Result<u64, LogError>;
    /// Reads up to `max` records from `from`.
    fn read(&self, from: u64, max: usize, max_bytes: usize) -> Result<Vec<Record>, LogError>;
    /// First stored offset.
    fn first_offset(&self) -> u64;
    /// One past the last durable offset.
    fn end_offset(&self) -> u64;
    /// Drops old segments (see [`SegmentLog::apply_retention`]).
    fn apply_retention(&mut self, older_than: i64, max_bytes: u64) -> Result<usize, LogError>;
}

impl PartitionStore for SegmentLog {
    fn append(&mut self, batch: &[(i64, Bytes)]) -> Result<u64, LogError> {
        SegmentLog::append(self, batch)
    }
    fn read(&self, from: u64, max: usize, max_bytes: usize) -> Result<Vec<Record>, LogError> {
        SegmentLog::read(self, from, max, max_bytes)
    }
    fn first_offset(&self) -> u64 {
        SegmentLog::first_offset(self)
    }
    fn end_offset(&self) -> u64 {
        SegmentLog::end_offset(self)
    }
    fn apply_retention(&mut self, older_than: i64, max_bytes: u64) -> Result<usize, LogError> {
        SegmentLog::apply_retention(self, older_than, max_bytes)
    }
}

/// Bounds of one commit.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most messages in one commit.
    pub max_messages: usize,
    /// Most payload bytes in one commit.
    pub max_bytes: usize,
    /// How long the committer lingers for more messages after the first (0: commit
    /// what is queued at once; batches still form while the previous sync runs).
    pub max_wait: Duration,
    /// Bytes that may wait for a commit before submitters wait.
    pub queue_bytes: usize,
}

/// Why an append was not made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// The commit failed.
    #[error("commit failed: {0}")]
    Commit(Arc<LogError>),
    /// The partition is shutting down.
    #[error("partition closed")]
    Closed,
}

struct Append {
    time: i64,
    payload: Bytes,
    done: oneshot::Sender<Result<u64, AppendError>>,
    _budget: OwnedSemaphorePermit,
}

/// Upper bounds (seconds) of the commit-latency histogram buckets.
pub const COMMIT_BUCKETS: [f64; 9] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25];

/// Commit latencies of one partition (a Prometheus histogram).
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Commits at or below each bound of [`COMMIT_BUCKETS`] (cumulative).
    pub buckets: [std::sync::atomic::AtomicU64; 9],
    /// All commits.
    pub count: std::sync::atomic::AtomicU64,
    /// Total commit time, microseconds.
    pub sum_micros: std::sync::atomic::AtomicU64,
    /// Messages committed.
    pub messages: std::sync::atomic::AtomicU64,
}

impl CommitStats {
    fn record(&self, elapsed: Duration, messages: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let seconds = elapsed.as_secs_f64();
        for (bound, bucket) in COMMIT_BUCKETS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
        self.messages.fetch_add(messages as u64, Relaxed);
    }
}

/// One partition: its storage, its committer, and the durable end readers wait on.
pub struct Partition {
    store: Arc<RwLock<Box<dyn PartitionStore>>>,
    /// The first stored offset, kept beside the store so that asking for the bounds
    /// never waits on the lock the committer holds through its fsync.
    first: Arc<AtomicU64>,
    /// Taken (dropped) by [`Partition::close`]; the committer then drains and stops.
    queue: Mutex<Option<mpsc::UnboundedSender<Append>>>,
    budget: Arc<Semaphore>,
    end: watch::Receiver<u64>,
    queue_bytes: usize,
    stats: Arc<CommitStats>,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("end", &*self.end.borrow())
            .finish_non_exhaustive()
    }
}

impl Partition {
    /// Starts the committer thread for `store`; it ends when the partition is dropped
    /// (the returned handle joins it).
    pub fn start(
        store: Box<dyn PartitionStore>,
        limits: BatchLimits,
        name: String,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (queue, rx) = mpsc::unbounded_channel();
        let (end_tx, end) = watch::channel(store.end_offset());
        let first = Arc::new(AtomicU64::new(store.first_offset()));
        let store = Arc::new(RwLock::new(store));
        let thread_store = Arc::clone(&store);
        let stats = Arc::new(CommitStats::default());
        let thread_stats = Arc::clone(&stats);
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || commit_loop(thread_store, rx, end_tx, limits, &thread_stats))?;
        // Budget is counted in KiB so a u32 semaphore covers large queues.
        let queue_kib = limits.queue_bytes.div_ceil(1024).max(1);
        Ok((
            Self {
                store,
                first,
                queue: Mutex::new(Some(queue)),
                budget: Arc::new(Semaphore::new(queue_kib)),
                end,
                queue_bytes: queue_kib,
                stats,
            },
            handle,
        ))
    }

    /// Queues `payload` in submission order, waiting for budget when the committer is
    /// behind; the returned receiver answers with the offset once durable.
    pub async fn submit(
        &self,
        time: i64,
        payload: Bytes,
    ) -> Result<oneshot::Receiver<Result<u64, AppendError>>, AppendError> {
        let kib = (payload.len().div_ceil(1024)).clamp(1, self.queue_bytes) as u32;
        let budget = Arc::clone(&self.budget)
            .acquire_many_owned(kib)
            .await
            .map_err(|_| AppendError::Closed)?;
        let (done, receipt) = oneshot::channel();
        // Sent under the lock (an unbounded send never waits) rather than through a
        // cloned sender: a clone and its drop are four atomic updates per message on
        // counters every connection shares.
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue
            .as_ref()
            .ok_or(AppendError::Closed)?
            .send(Append {
                time,
                payload,
                done,
                _budget: budget,
            })
            .map_err(|_| AppendError::Closed)?;
        Ok(receipt)
    }

    /// Commit latencies.
    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }

    /// Bytes (rounded up to KiB per message) waiting for a commit.
    pub fn queued_bytes(&self) -> u64 {
        let free = self.budget.available_permits();
        (self.queue_bytes.saturating_sub(free) as u64) * 1024
    }

    /// Refuses further appends; the committer commits what is queued, then stops.
    pub fn close(&self) {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Reads durable records. Blocks while a commit holds the store (through its
    /// fsync): call it off the async workers, e.g. through [`Partition::reader`].
    pub fn read(&self, from: u64, max: usize, max_bytes: usize) -> Result<Vec<Record>, LogError> {
        self.reader().read(from, max, max_bytes)
    }

    /// A handle that reads this partition from another thread.
    pub fn reader(&self) -> PartitionReader {
        PartitionReader {
            store: Arc::clone(&self.store),
        }
    }

    /// (first stored offset, one past the last durable offset). Never waits for a
    /// commit.
    pub fn bounds(&self) -> (u64, u64) {
        (self.first.load(AtomicOrdering::Acquire), *self.end.borrow())
    }

    /// Watches the durable end offset.
    pub fn watch_end(&self) -> watch::Receiver<u64> {
        self.end.clone()
    }

    /// Applies retention.
    pub fn apply_retention(&self, older_than: i64, max_bytes: u64) -> Result<usize, LogError> {
        let mut store = self.store.write().unwrap_or_else(PoisonError::into_inner);
        let removed = store.apply_retention(older_than, max_bytes);
        self.first
            .store(store.first_offset(), AtomicOrdering::Release);
        removed
    }
}

/// Reads a partition's durable records from any thread.
#[derive(Clone)]
pub struct PartitionReader {
    store: Arc<RwLock<Box<dyn PartitionStore>>>,
}

impl PartitionReader {
    /// Reads durable records (blocks while a commit holds the store).
    pub fn read(&self, from: u64, max: usize, max_bytes: usize) -> Result<Vec<Record>, LogError> {
        self.store
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .read(from, max, max_bytes)
    }
}

fn commit_loop(
    store: Arc<RwLock<Box<dyn PartitionStore>>>,
    mut rx: mpsc::UnboundedReceiver<Append>,
    end: watch::Sender<u64>,
    limits: BatchLimits,
    stats: &CommitStats,
) {
    let mut batch: Vec<Append> = Vec::new();
    let mut records: Vec<(i64, Bytes)> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut bytes = first.payload.len();
        batch.push(first);
        let full = |batch: &Vec<Append>, bytes: usize| {
            batch.len() >= limits.max_messages || bytes >= limits.max_bytes
        };
        let take_queued = |batch: &mut Vec<Append>,
                           bytes: &mut usize,
                           rx: &mut mpsc::UnboundedReceiver<Append>| {
            while !full(batch, *bytes) {
                match rx.try_recv() {
                    Ok(next) => {
                        *bytes += next.payload.len();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
        };
        take_queued(&mut batch, &mut bytes, &mut rx);
        if !limits.max_wait.is_zero() && !full(&batch, bytes) {
            // Linger with one sleep, not a polling loop: senders do not wake a
            // sleeping committer, so lingering costs one context switch however many
            // messages arrive meanwhile.
            std::thread::sleep(limits.max_wait);
            take_queued(&mut batch, &mut bytes, &mut rx);
        }
        records.clear();
        records.extend(batch.iter().map(|a| (a.time, a.payload.clone())));
        let started = Instant::now();
        let result = store
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .append(&records);
        if result.is_ok() {
            stats.record(started.elapsed(), records.len());
        }
        match result {
            Ok(first_offset) => {
                end.send_replace(first_offset + batch.len() as u64);
                for (i, append) in batch.drain(..).enumerate() {
                    let _ = append.done.send(Ok(first_offset + i as u64));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, messages = batch.len(), "telemetry commit failed; nothing acknowledged");
                let err = Arc::new(err);
                for append in batch.drain(..) {
                    let _ = append.done.send(Err(AppendError::Commit(Arc::clone(&err))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A store that fails commits while `fail` is set, like a disk error would.
    struct Faulty {
        inner: SegmentLog,
        fail: Arc<AtomicBool>,
        commits: Arc<AtomicUsize>,
    }

    impl Faulty {
        /// A segment log in `dir` that commits until the returned switch is set, with
        /// its commit counter.
        fn open(dir: &std::path::Path) -> (Self, Arc<AtomicBool>, Arc<AtomicUsize>) {
            let fail = Arc::new(AtomicBool::new(false));
            let commits = Arc::new(AtomicUsize::new(0));
            let store = Self {
                inner: SegmentLog::open(dir, 1 << 20).unwrap(),
                fail: Arc::clone(&fail),
                commits: Arc::clone(&commits),
            };
            (store, fail, commits)
        }
    }

    impl PartitionStore for Faulty {
        fn append(&mut self, batch: &[(i64, Bytes)]) -> Result<u64, LogError> {
            self.commits.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return Err(LogError::Io {
                    path: "injected".into(),
                    source: std::io::Error::other("injected fault"),
                });
            }
            self.inner.append(batch)
        }
        fn read(&self, from: u64, max: usize, max_bytes: usize) -> Result<Vec<Record>, LogError> {
            self.inner.read(from, max, max_bytes)
        }
        fn first_offset(&self) -> u64 {
            self.inner.first_offset()
        }
        fn end_offset(&self) -> u64 {
            self.inner.end_offset()
        }
        fn apply_retention(&mut self, older_than: i64, max_bytes: u64) -> Result<usize, LogError> {
            self.inner.apply_retention(older_than, max_bytes)
        }
    }

    /// A store whose commit takes as long as the test says (a slow fsync).
    struct Slow {
        inner: SegmentLog,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl PartitionStore for Slow {
        fn append(&mut self, batch: &[(i64, Bytes)]) -> Result<u64, LogError> {
            if let Ok(release) = self.release.lock() {
                let _ = release.recv_timeout(Duration::from_secs(30));
            }
            self.inner.append(batch)
        }
        fn read(&self, from: u64, max: usize, max_bytes: usize) -> Result<Vec<Record>, LogError> {
            self.inner.read(from, max, max_bytes)
        }
        fn first_offset(&self) -> u64 {
            self.inner.first_offset()
        }
        fn end_offset(&self) -> u64 {
            self.inner.end_offset()
        }
        fn apply_retention(&mut self, older_than: i64, max_bytes: u64) -> Result<usize, LogError> {
            self.inner.apply_retention(older_than, max_bytes)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_bounds_never_wait_for_a_commit_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (release, stalled) = std::sync::mpsc::channel();
        let store = Slow {
            inner: SegmentLog::open(dir.path(), 1 << 20).unwrap(),
            release: Mutex::new(stalled),
        };
        let (partition, _thread) =
            Partition::start(Box::new(store), limits(), "slow".into()).unwrap();
        let receipt = partition.submit(0, Bytes::from_static(b"x")).await.unwrap();
        // The committer is now inside its (stalled) commit, holding the store.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let partition = Arc::new(partition);
        let asking = Arc::clone(&partition);
        let bounds = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::task::spawn_blocking(move || asking.bounds()),
        )
        .await
        .expect("bounds answered while a commit was in progress")
        .unwrap();
        assert_eq!(bounds, (0, 0), "the message is not durable yet");
        release.send(()).unwrap();
        assert_eq!(receipt.await.unwrap().unwrap(), 0);
        assert_eq!(partition.bounds(), (0, 1));
    }

    fn limits() -> BatchLimits {
        BatchLimits {
            max_messages: 64,
            max_bytes: 1 << 20,
            max_wait: Duration::ZERO,
            queue_bytes: 1 << 20,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_batched_and_all_durable_in_submission_order() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, commits) = Faulty::open(dir.path());
        let (partition, _thread) =
            Partition::start(Box::new(store), limits(), "test".into()).unwrap();
        let mut receipts = Vec::new();
        for i in 0..500u32 {
            receipts.push(
                partition
                    .submit(0, Bytes::from(i.to_le_bytes().to_vec()))
                    .await
                    .unwrap(),
            );
        }
        for (i, receipt) in receipts.into_iter().enumerate() {
            assert_eq!(receipt.await.unwrap().unwrap(), i as u64);
        }
        assert!(
            commits.load(Ordering::SeqCst) < 500,
            "batched: {} commits",
            commits.load(Ordering::SeqCst)
        );
        let records = partition.read(0, 1000, usize::MAX).unwrap();
        assert_eq!(records.len(), 500);
        assert!(
            records
                .iter()
                .enumerate()
                .all(|(i, r)| r.payload.as_ref() == (i as u32).to_le_bytes())
        );
        assert_eq!(*partition.watch_end().borrow(), 500);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lingering_committer_takes_what_arrives_while_it_waits_in_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, commits) = Faulty::open(dir.path());
        let lingering = BatchLimits {
            max_wait: Duration::from_millis(300),
            ..limits()
        };
        let (partition, _thread) =
            Partition::start(Box::new(store), lingering, "linger".into()).unwrap();
        // One message starts the linger; nine more trickle in well within it.
        let mut receipts = vec![partition.submit(0, Bytes::from_static(b"0")).await.unwrap()];
        for i in 1..10u8 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            receipts.push(partition.submit(0, Bytes::from(vec![i])).await.unwrap());
        }
        for (i, receipt) in receipts.into_iter().enumerate() {
            assert_eq!(receipt.await.unwrap().unwrap(), i as u64);
        }
        assert_eq!(commits.load(Ordering::SeqCst), 1, "one commit for the ten");
    }

    #[tokio::test]
    async fn a_failed_commit_acknowledges_nothing_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, fail, _) = Faulty::open(dir.path());
        fail.store(true, Ordering::SeqCst);
        let (partition, _thread) =
            Partition::start(Box::new(store), limits(), "test".into()).unwrap();
        let receipt = partition
            .submit(0, Bytes::from_static(b"lost"))
            .await
            .unwrap();
        assert!(matches!(
            receipt.await.unwrap(),
            Err(AppendError::Commit(_))
        ));
        assert_eq!(partition.bounds(), (0, 0));
        assert_eq!(*partition.watch_end().borrow(), 0, "readers see nothing");

        // Once the fault clears, appends succeed from the same offset.
        fail.store(false, Ordering::SeqCst);
        let receipt = partition
            .submit(0, Bytes::from_static(b"kept"))
            .await
            .unwrap();
        assert_eq!(receipt.await.unwrap().unwrap(), 0);
    }

    #[tokio::test]
    async fn submitters_wait_when_the_queue_budget_is_spent() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, _) = Faulty::open(dir.path());
        let limits = BatchLimits {
            queue_bytes: 4 * 1024,
            ..limits()
        };
        let (partition, _thread) =
            Partition::start(Box::new(store), limits, "test".into()).unwrap();
        // The whole budget in one message: the next submit waits until it commits.
        let first = partition
            .submit(0, Bytes::from(vec![0u8; 4096]))
            .await
            .unwrap();
        let second = partition
            .submit(0, Bytes::from(vec![1u8; 10]))
            .await
            .unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 0);
        assert_eq!(second.await.unwrap().unwrap(), 1);
    }
}
