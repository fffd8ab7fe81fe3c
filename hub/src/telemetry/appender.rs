//! The group committer. Appends from many connections, to any of the partitions a
//! committer serves, queue up while the previous batch is being made durable; a
//! dedicated thread takes everything queued (bounded in count, bytes and linger
//! time), appends each partition's share with one write and one `fdatasync`, then
//! answers every waiter. A waiter's PUBACK goes out only after its batch is durable; a
//! failed commit answers every waiter of that partition with the error, and none is
//! acknowledged.
//!
//! One committer may serve several partitions: on a machine with fewer cores than
//! partitions, one thread per partition costs more in wake-ups and context switches
//! than its parallel `fdatasync`s give (docs/BENCHMARKS.md, issue 17).
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
    /// Called once after the last append (a clean shutdown): leaves what lets the
    /// next open skip work (see [`SegmentLog::close`]).
    fn close(&mut self) {}
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
    fn close(&mut self) {
        SegmentLog::close(self);
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
    /// The partition's place among those its committer serves.
    slot: usize,
    /// One submitter's records (receipt time, payload), committed together.
    records: Vec<(i64, Bytes)>,
    /// Answered with the first record's offset.
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

/// The queue of one committer, shared by the partitions it serves; taken (dropped) by
/// [`Partition::close`], after which the committer drains and stops.
type Queue = Arc<Mutex<Option<mpsc::UnboundedSender<Append>>>>;

/// One partition: its storage, its committer's queue, and the durable end readers
/// wait on.
pub struct Partition {
    store: Arc<RwLock<Box<dyn PartitionStore>>>,
    /// The first stored offset, kept beside the store so that asking for the bounds
    /// never waits on the lock the committer holds through its fsync.
    first: Arc<AtomicU64>,
    queue: Queue,
    /// This partition's place among those its committer serves.
    slot: usize,
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
    /// Starts a committer thread serving `store` alone; it ends when the partition
    /// is closed (the returned handle joins it).
    pub fn start(
        store: Box<dyn PartitionStore>,
        limits: BatchLimits,
        name: String,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (mut partitions, handle) = Self::start_group(vec![store], limits, name)?;
        let partition = partitions
            .pop()
            .ok_or_else(|| std::io::Error::other("a committer started without its partition"))?;
        Ok((partition, handle))
    }

    /// Starts one committer thread serving all of `stores` (partitions in the order
    /// given); it ends when they are closed (closing one closes them all) and the
    /// returned handle joins it. The byte budget is per partition; `limits` bounds
    /// each pass of the committer over all of them.
    pub fn start_group(
        stores: Vec<Box<dyn PartitionStore>>,
        limits: BatchLimits,
        name: String,
    ) -> std::io::Result<(Vec<Self>, JoinHandle<()>)> {
        let (sender, rx) = mpsc::unbounded_channel();
        let queue: Queue = Arc::new(Mutex::new(Some(sender)));
        // Budget is counted in KiB so a u32 semaphore covers large queues.
        let queue_kib = limits.queue_bytes.div_ceil(1024).max(1);
        let mut partitions = Vec::with_capacity(stores.len());
        let mut slots = Vec::with_capacity(stores.len());
        for (slot, store) in stores.into_iter().enumerate() {
            let (end_tx, end) = watch::channel(store.end_offset());
            let first = Arc::new(AtomicU64::new(store.first_offset()));
            let store = Arc::new(RwLock::new(store));
            let stats = Arc::new(CommitStats::default());
            slots.push(Slot {
                store: Arc::clone(&store),
                end: end_tx,
                stats: Arc::clone(&stats),
            });
            partitions.push(Self {
                store,
                first,
                queue: Arc::clone(&queue),
                slot,
                budget: Arc::new(Semaphore::new(queue_kib)),
                end,
                queue_bytes: queue_kib,
                stats,
            });
        }
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || commit_loop(&slots, rx, limits))?;
        Ok((partitions, handle))
    }

    /// Queues `payload` in submission order, waiting for budget when the committer is
    /// behind; the returned receiver answers with the offset once durable.
    pub async fn submit(
        &self,
        time: i64,
        payload: Bytes,
    ) -> Result<oneshot::Receiver<Result<u64, AppendError>>, AppendError> {
        self.submit_all(vec![(time, payload)]).await
    }

    /// Queues `records` (receipt time, payload) in order, behind everything submitted
    /// before, waiting for budget when the committer is behind; they are committed
    /// together, and the returned receiver answers with the first one's offset once
    /// all are durable. One submission, however many records: a connection that
    /// read several messages at once pays for one hand-off.
    pub async fn submit_all(
        &self,
        records: Vec<(i64, Bytes)>,
    ) -> Result<oneshot::Receiver<Result<u64, AppendError>>, AppendError> {
        let kib = records
            .iter()
            .map(|(_, payload)| payload.len().div_ceil(1024).max(1))
            .sum::<usize>()
            .clamp(1, self.queue_bytes) as u32;
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
                slot: self.slot,
                records,
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

    /// Refuses further appends to this partition and to every other one its
    /// committer serves; the committer commits what is queued, then stops.
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

/// What a committer holds of one partition it serves.
struct Slot {
    store: Arc<RwLock<Box<dyn PartitionStore>>>,
    end: watch::Sender<u64>,
    stats: Arc<CommitStats>,
}

/// A pass of at least this many payload bytes commits its partitions in parallel.
const PARALLEL_SYNC_BYTES: usize = 128 * 1024;

/// What one pass of a committer has taken so far, each partition's share in
/// submission order. A pass takes whole submissions, so one submission is never
/// split between commits; the limits are checked between submissions.
struct Pass<'a> {
    shares: &'a mut [Vec<Append>],
    limits: BatchLimits,
    messages: usize,
    bytes: usize,
}

impl Pass<'_> {
    fn take(&mut self, append: Append) {
        self.messages += append.records.len();
        self.bytes += append.records.iter().map(|(_, p)| p.len()).sum::<usize>();
        match self.shares.get_mut(append.slot) {
            Some(share) => share.push(append),
            None => {
                let _ = append.done.send(Err(AppendError::Closed));
            }
        }
    }

    fn full(&self) -> bool {
        self.messages >= self.limits.max_messages || self.bytes >= self.limits.max_bytes
    }

    /// Takes what is queued, up to the limits, without waiting.
    fn take_queued(&mut self, rx: &mut mpsc::UnboundedReceiver<Append>) {
        while !self.full() {
            match rx.try_recv() {
                Ok(next) => self.take(next),
                Err(_) => break,
            }
        }
    }
}

fn commit_loop(slots: &[Slot], mut rx: mpsc::UnboundedReceiver<Append>, limits: BatchLimits) {
    let mut shares: Vec<Vec<Append>> = slots.iter().map(|_| Vec::new()).collect();
    let mut records: Vec<(i64, Bytes)> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut pass = Pass {
            shares: &mut shares,
            limits,
            messages: 0,
            bytes: 0,
        };
        pass.take(first);
        pass.take_queued(&mut rx);
        if !limits.max_wait.is_zero() && !pass.full() {
            // Linger with one sleep, not a polling loop: senders do not wake a
            // sleeping committer, so lingering costs one context switch however many
            // messages arrive meanwhile.
            std::thread::sleep(limits.max_wait);
            pass.take_queued(&mut rx);
        }
        if pass.bytes >= PARALLEL_SYNC_BYTES {
            // A large pass: each partition's write and sync on its own thread, so the
            // syncs overlap (a QoS 0 stream is bound by them); a small one is not
            // worth a thread start.
            std::thread::scope(|scope| {
                let mut busy = slots
                    .iter()
                    .zip(shares.iter_mut())
                    .filter(|(_, share)| !share.is_empty());
                let first = busy.next();
                for (slot, share) in busy {
                    let spawned = std::thread::Builder::new()
                        .name("telemetry-sync".into())
                        .spawn_scoped(scope, move || commit(slot, share, &mut Vec::new()));
                    if let Err(err) = spawned {
                        // Not enough threads: the loop below commits this share.
                        tracing::warn!(error = %err, "cannot start a sync thread; committing that partition after the others");
                    }
                }
                if let Some((slot, share)) = first {
                    commit(slot, share, &mut records);
                }
            });
        }
        // What is still queued commits here, partition by partition: all of a small
        // pass, and a share whose sync thread did not start.
        for (slot, share) in slots.iter().zip(shares.iter_mut()) {
            if !share.is_empty() {
                commit(slot, share, &mut records);
            }
        }
    }
    // Closed and drained: nothing is appended after this.
    for slot in slots {
        slot.store
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .close();
    }
}

/// Appends `share` (one partition's queued appends) durably and answers each.
fn commit(slot: &Slot, share: &mut Vec<Append>, records: &mut Vec<(i64, Bytes)>) {
    records.clear();
    records.extend(share.iter().flat_map(|a| a.records.iter().cloned()));
    let started = Instant::now();
    let result = slot
        .store
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .append(records);
    match result {
        Ok(first_offset) => {
            slot.stats.record(started.elapsed(), records.len());
            slot.end.send_replace(first_offset + records.len() as u64);
            let mut offset = first_offset;
            for append in share.drain(..) {
                let _ = append.done.send(Ok(offset));
                offset += append.records.len() as u64;
            }
        }
        Err(err) => {
            tracing::error!(error = %err, messages = records.len(), "telemetry commit failed; nothing acknowledged");
            let err = Arc::new(err);
            for append in share.drain(..) {
                let _ = append.done.send(Err(AppendError::Commit(Arc::clone(&err))));
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

    /// A store whose commit takes as long as the test says (a slow fsync), noting
    /// the thread each commit ran on.
    struct Slow {
        inner: SegmentLog,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
        threads: Arc<Mutex<Vec<String>>>,
    }

    impl Slow {
        /// A slow store in `dir`, the switch that lets one commit through, and the
        /// names of the threads its commits ran on.
        fn open(
            dir: &std::path::Path,
        ) -> (Self, std::sync::mpsc::Sender<()>, Arc<Mutex<Vec<String>>>) {
            let (release, stalled) = std::sync::mpsc::channel();
            let threads = Arc::new(Mutex::new(Vec::new()));
            let store = Self {
                inner: SegmentLog::open(dir, 1 << 20).unwrap(),
                release: Mutex::new(stalled),
                threads: Arc::clone(&threads),
            };
            (store, release, threads)
        }
    }

    impl PartitionStore for Slow {
        fn append(&mut self, batch: &[(i64, Bytes)]) -> Result<u64, LogError> {
            if let Ok(release) = self.release.lock() {
                let _ = release.recv_timeout(Duration::from_secs(30));
            }
            let thread = std::thread::current().name().unwrap_or("").to_string();
            self.threads.lock().unwrap().push(thread);
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
        let (store, release, _) = Slow::open(dir.path());
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
    async fn one_committer_keeps_each_of_its_partitions_in_its_own_order() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let opened: Vec<_> = dirs.iter().map(|d| Faulty::open(d.path())).collect();
        let commits: Vec<_> = opened.iter().map(|(_, _, c)| Arc::clone(c)).collect();
        let stores: Vec<Box<dyn PartitionStore>> = opened
            .into_iter()
            .map(|(store, _, _)| Box::new(store) as Box<dyn PartitionStore>)
            .collect();
        let (partitions, thread) =
            Partition::start_group(stores, limits(), "group".into()).unwrap();
        // Interleaved submissions: each partition numbers its own records from 0.
        let mut receipts = Vec::new();
        for i in 0..300u32 {
            let p = (i % 2) as usize;
            let receipt = partitions[p]
                .submit(0, Bytes::from(i.to_le_bytes().to_vec()))
                .await
                .unwrap();
            receipts.push((p, i, receipt));
        }
        for (_, i, receipt) in receipts {
            assert_eq!(receipt.await.unwrap().unwrap(), u64::from(i / 2));
        }
        for (p, partition) in partitions.iter().enumerate() {
            let records = partition.read(0, 1000, usize::MAX).unwrap();
            let expected: Vec<u32> = (0..300).filter(|i| (i % 2) as usize == p).collect();
            let got: Vec<u32> = records
                .iter()
                .map(|r| u32::from_le_bytes(r.payload.as_ref().try_into().unwrap()))
                .collect();
            assert_eq!(got, expected, "partition {p}");
            assert_eq!(*partition.watch_end().borrow(), 150);
            let commits = commits[p].load(Ordering::SeqCst);
            assert!(commits < 150, "partition {p} batched: {commits} commits");
        }
        // Closing one closes the committer: no partition takes more, the thread ends.
        partitions[0].close();
        assert!(matches!(
            partitions[1].submit(0, Bytes::from_static(b"late")).await,
            Err(AppendError::Closed)
        ));
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_pass_commits_its_partitions_on_parallel_threads_in_order() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let (a, release_a, threads_a) = Slow::open(dirs[0].path());
        let (b, release_b, threads_b) = Slow::open(dirs[1].path());
        let (partitions, _thread) =
            Partition::start_group(vec![Box::new(a), Box::new(b)], limits(), "group".into())
                .unwrap();
        // The committer stalls in a small commit of partition 0 while a large pass
        // for both partitions queues up behind it.
        let first = partitions[0]
            .submit(0, Bytes::from_static(b"a0"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let big = || Bytes::from(vec![7u8; PARALLEL_SYNC_BYTES / 2 + 1]);
        let second = partitions[0].submit(1, big()).await.unwrap();
        let other = partitions[1].submit(2, big()).await.unwrap();
        release_a.send(()).unwrap();
        release_a.send(()).unwrap();
        release_b.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 0);
        assert_eq!(second.await.unwrap().unwrap(), 1);
        assert_eq!(other.await.unwrap().unwrap(), 0);
        assert_eq!(*threads_a.lock().unwrap(), ["group", "group"]);
        assert_eq!(*threads_b.lock().unwrap(), ["telemetry-sync"]);
        let read = |p: usize| -> Vec<(u64, i64, usize)> {
            partitions[p]
                .read(0, 10, usize::MAX)
                .unwrap()
                .iter()
                .map(|r| (r.offset, r.time, r.payload.len()))
                .collect()
        };
        assert_eq!(read(0), [(0, 0, 2), (1, 1, PARALLEL_SYNC_BYTES / 2 + 1)]);
        assert_eq!(read(1), [(0, 2, PARALLEL_SYNC_BYTES / 2 + 1)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_submitted_batch_is_committed_together_with_consecutive_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, commits) = Faulty::open(dir.path());
        let (partition, _thread) =
            Partition::start(Box::new(store), limits(), "batch".into()).unwrap();
        let batch: Vec<(i64, Bytes)> = (0..5u8)
            .map(|i| (i64::from(i), Bytes::from(vec![i])))
            .collect();
        let first = partition
            .submit_all(batch)
            .await
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first, 0);
        assert_eq!(
            commits.load(Ordering::SeqCst),
            1,
            "one commit for the batch"
        );
        let next = partition.submit(9, Bytes::from_static(b"n")).await.unwrap();
        assert_eq!(next.await.unwrap().unwrap(), 5);
        let records = partition.read(0, 100, usize::MAX).unwrap();
        let got: Vec<(u64, i64, Vec<u8>)> = records
            .iter()
            .map(|r| (r.offset, r.time, r.payload.to_vec()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 0, vec![0]),
                (1, 1, vec![1]),
                (2, 2, vec![2]),
                (3, 3, vec![3]),
                (4, 4, vec![4]),
                (5, 9, b"n".to_vec())
            ]
        );
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
