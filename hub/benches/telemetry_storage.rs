//! Telemetry storage micro-benchmark: redb tables versus append-only segment
//! files, at equal durability (every batch is on stable storage before the
//! commit call returns).
//!
//! It models the telemetry group committer: concurrent device messages of one
//! partition are batched, the batch gets one durable commit, then every
//! waiting PUBACK is released. A record is 320 B (64 B of header/properties +
//! 256 B of payload, random bytes from a pre-generated pool).
//!
//! Measured:
//! 1. One partition, batch sizes 25, 100, 250 and 1000 records:
//!    - `redb`: one `redb::Database`, one table `u64 offset -> &[u8] record`,
//!      one write transaction per batch, default `Durability::Immediate`.
//!    - `seg-grow`: append-only segment file, each record framed as
//!      `[u32 len][u32 crc32(record)][u64 offset][record]`, the batch encoded
//!      into one buffer, one `write_all_at`, one `File::sync_data`
//!      (fdatasync); the file grows, so fdatasync also persists size and
//!      block allocation.
//!    - `seg-setlen`: same, the segment sized to 64 MiB with `set_len` when
//!      created (sparse: size is fixed but blocks are still allocated on first
//!      write).
//!    - `seg-zeroed`: same, the 64 MiB segment written with zeros and synced
//!      before the timed run (a pre-allocated / recycled segment): overwrites
//!      touch no metadata, so fdatasync flushes data only. When full it wraps
//!      to offset 0 (a recycled segment; readers stop at the first frame whose
//!      offset or CRC does not match).
//!
//!    Segments roll every 64 MiB (`seg-grow`/`seg-setlen`: new file, plus
//!    `set_len` + fsync for `seg-setlen`, plus a directory fsync), inside the
//!    timed commit that triggers the roll.
//! 2. Four partitions written concurrently by four threads, batch 250: redb
//!    (one database, four tables, write transactions serialize), redb with a
//!    single committer writing 250 records to each of the four tables per
//!    transaction, and four independent segment files per segment variant.
//! 3. Sequential read-back of 100,000 records (warm page cache, the redb
//!    database re-opened before each pass; segment reads verify every CRC).
//!
//! Reported per configuration: records/s, commits/s, commit latency p50/p99/max
//! (time from batch in memory to durable: encode/insert + write + sync), CPU
//! time as % of one core, and bytes allocated on disk per record.
//!
//! Run (release mode, takes about 1–2 minutes):
//!
//! ```text
//! cargo bench -p hub --bench telemetry_storage
//! ```
//!
//! Files are written under a temporary directory inside `target/` of the
//! workspace (a real disk, not tmpfs), or under `TELEMETRY_BENCH_DIR` if set;
//! it is removed at the end. `TELEMETRY_BENCH_SECS` (default 2.5) sets the
//! measured duration of each write configuration.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::time::TimeValLike;
use redb::{Database, ReadableDatabase, TableDefinition};

const HEADER_BYTES: usize = 64;
const PAYLOAD_BYTES: usize = 256;
const RECORD_BYTES: usize = HEADER_BYTES + PAYLOAD_BYTES;
const FRAME_HEADER_BYTES: usize = 16;
const POOL_RECORDS: usize = 4096;
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const BATCH_SIZES: [usize; 4] = [25, 100, 250, 1000];
const CONCURRENT_BATCH: usize = 250;
const PARTITIONS: usize = 4;
const WARMUP_BATCHES: usize = 10;
const READ_RECORDS: u64 = 100_000;
const READ_PASSES: usize = 5;

const TABLES: [TableDefinition<u64, &[u8]>; PARTITIONS] = [
    TableDefinition::new("telemetry_p0"),
    TableDefinition::new("telemetry_p1"),
    TableDefinition::new("telemetry_p2"),
    TableDefinition::new("telemetry_p3"),
];

/// Pre-generated records, so that generating them is not measured.
struct Pool {
    records: Vec<Vec<u8>>,
}

impl Pool {
    fn new() -> Self {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let records = (0..POOL_RECORDS)
            .map(|_| {
                let mut record = Vec::with_capacity(RECORD_BYTES);
                while record.len() < RECORD_BYTES {
                    // xorshift64*: incompressible, deterministic bytes.
                    state ^= state >> 12;
                    state ^= state << 25;
                    state ^= state >> 27;
                    let word = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
                    record.extend_from_slice(&word.to_le_bytes());
                }
                record.truncate(RECORD_BYTES);
                record
            })
            .collect();
        Self { records }
    }

    fn get(&self, offset: u64) -> &[u8] {
        let index = usize::try_from(offset % POOL_RECORDS as u64).expect("pool index fits usize");
        &self.records[index]
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SegMode {
    Grow,
    SetLen,
    Zeroed,
}

impl SegMode {
    fn label(self) -> &'static str {
        match self {
            Self::Grow => "seg-grow",
            Self::SetLen => "seg-setlen",
            Self::Zeroed => "seg-zeroed",
        }
    }
}

/// One partition's append-only log made of 64 MiB segment files.
struct SegmentLog {
    dir: PathBuf,
    mode: SegMode,
    file: File,
    pos: u64,
    seq: u64,
    buf: Vec<u8>,
}

fn sync_dir(dir: &Path) {
    File::open(dir)
        .expect("open segment directory")
        .sync_all()
        .expect("fsync segment directory");
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.seg"))
}

impl SegmentLog {
    fn create(dir: PathBuf, mode: SegMode) -> Self {
        fs::create_dir_all(&dir).expect("create segment directory");
        let file = Self::open_segment(&dir, mode, 0);
        Self {
            dir,
            mode,
            file,
            pos: 0,
            seq: 0,
            buf: Vec::new(),
        }
    }

    fn open_segment(dir: &Path, mode: SegMode, seq: u64) -> File {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(segment_path(dir, seq))
            .expect("create segment file");
        match mode {
            SegMode::Grow => {}
            SegMode::SetLen => {
                file.set_len(SEGMENT_BYTES).expect("set_len segment");
                file.sync_all().expect("fsync new segment");
            }
            SegMode::Zeroed => {
                let zeros = vec![0u8; 1024 * 1024];
                let mut at = 0;
                while at < SEGMENT_BYTES {
                    file.write_all_at(&zeros, at).expect("zero-fill segment");
                    at += zeros.len() as u64;
                }
                file.sync_all().expect("fsync zero-filled segment");
            }
        }
        sync_dir(dir);
        file
    }

    /// Appends `count` records starting at `first_offset` and makes them durable.
    fn append_batch(&mut self, pool: &Pool, first_offset: u64, count: usize) {
        self.buf.clear();
        for offset in first_offset..first_offset + count as u64 {
            let record = pool.get(offset);
            let len = u32::try_from(record.len()).expect("record length fits u32");
            self.buf.extend_from_slice(&len.to_le_bytes());
            self.buf
                .extend_from_slice(&crc32fast::hash(record).to_le_bytes());
            self.buf.extend_from_slice(&offset.to_le_bytes());
            self.buf.extend_from_slice(record);
        }
        if self.pos + self.buf.len() as u64 > SEGMENT_BYTES {
            match self.mode {
                SegMode::Zeroed => self.pos = 0,
                SegMode::Grow | SegMode::SetLen => {
                    self.seq += 1;
                    self.file = Self::open_segment(&self.dir, self.mode, self.seq);
                    self.pos = 0;
                }
            }
        }
        self.file
            .write_all_at(&self.buf, self.pos)
            .expect("write segment batch");
        self.pos += self.buf.len() as u64;
        self.file.sync_data().expect("fdatasync segment");
    }
}

fn redb_commit(
    db: &Database,
    table: TableDefinition<u64, &[u8]>,
    pool: &Pool,
    first: u64,
    n: usize,
) {
    let txn = db.begin_write().expect("begin write transaction");
    {
        let mut table = txn.open_table(table).expect("open table");
        for offset in first..first + n as u64 {
            table
                .insert(offset, pool.get(offset))
                .expect("insert record");
        }
    }
    txn.commit().expect("commit");
}

fn thread_cpu() -> Duration {
    let usage = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage");
    let micros = usage.user_time().num_microseconds() + usage.system_time().num_microseconds();
    Duration::from_micros(u64::try_from(micros).expect("cpu time is non-negative"))
}

/// Result of one measured run of one writer thread.
struct Run {
    records: u64,
    elapsed: Duration,
    cpu: Duration,
    latencies: Vec<Duration>,
}

/// Runs `commit(first_offset, batch)` for `WARMUP_BATCHES` unmeasured
/// batches, then for `duration`, timing every commit.
fn drive(batch: usize, duration: Duration, mut commit: impl FnMut(u64, usize)) -> Run {
    let mut offset = 0u64;
    for _ in 0..WARMUP_BATCHES {
        commit(offset, batch);
        offset += batch as u64;
    }
    let cpu_start = thread_cpu();
    let start = Instant::now();
    let mut latencies = Vec::new();
    let mut records = 0u64;
    while start.elapsed() < duration {
        let t = Instant::now();
        commit(offset, batch);
        latencies.push(t.elapsed());
        offset += batch as u64;
        records += batch as u64;
    }
    Run {
        records,
        elapsed: start.elapsed(),
        cpu: thread_cpu() - cpu_start,
        latencies,
    }
}

/// Sums the per-thread runs of one configuration.
struct Summary {
    records: u64,
    commits: usize,
    elapsed: Duration,
    cpu: Duration,
    latencies: Vec<Duration>,
}

impl Summary {
    fn from_runs(runs: Vec<Run>) -> Self {
        let mut summary = Self {
            records: 0,
            commits: 0,
            elapsed: Duration::ZERO,
            cpu: Duration::ZERO,
            latencies: Vec::new(),
        };
        for run in runs {
            summary.records += run.records;
            summary.commits += run.latencies.len();
            summary.elapsed = summary.elapsed.max(run.elapsed);
            summary.cpu += run.cpu;
            summary.latencies.extend(run.latencies);
        }
        summary.latencies.sort_unstable();
        summary
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let n = self.latencies.len();
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
        self.latencies[rank - 1].as_secs_f64() * 1e3
    }

    #[allow(clippy::cast_precision_loss)]
    fn row(&self, label: &str, batch: &str, disk_bytes: u64, disk_records: u64) -> String {
        let secs = self.elapsed.as_secs_f64();
        format!(
            "| {label} | {batch} | {commits} | {rps:.0} | {cps:.0} | {p50:.2} | {p99:.2} | {max:.2} | {cpu:.0} | {disk} |",
            commits = self.commits,
            rps = self.records as f64 / secs,
            cps = self.commits as f64 / secs,
            p50 = self.percentile_ms(0.50),
            p99 = self.percentile_ms(0.99),
            max = self.percentile_ms(1.0),
            cpu = self.cpu.as_secs_f64() / secs * 100.0,
            disk = if disk_bytes == 0 {
                "fixed 64 MiB/partition".to_owned()
            } else {
                format!("{:.0}", disk_bytes as f64 / disk_records as f64)
            },
        )
    }
}

const TABLE_HEADER: &str = "| storage | batch | commits | records/s | commits/s | p50 ms | p99 ms | max ms | CPU % of 1 core | disk B/record |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

/// Bytes allocated on disk by the files under `path`.
fn allocated_bytes(path: &Path) -> u64 {
    let meta = fs::metadata(path).expect("stat");
    if meta.is_dir() {
        fs::read_dir(path)
            .expect("read dir")
            .map(|entry| allocated_bytes(&entry.expect("dir entry").path()))
            .sum()
    } else {
        meta.blocks() * 512
    }
}

/// Allocated bytes of a segment log; 0 (shown as fixed) for pre-zeroed
/// segments, whose size does not depend on the records written.
fn seg_disk_bytes(mode: SegMode, dir: &Path) -> u64 {
    if mode == SegMode::Zeroed {
        0
    } else {
        allocated_bytes(dir)
    }
}

fn written_records(summary: &Summary, writers: usize, batch: usize) -> u64 {
    summary.records + (writers * WARMUP_BATCHES * batch) as u64
}

fn single_partition(root: &Path, pool: &Pool, duration: Duration) {
    println!("\n## One partition, one writer\n\n{TABLE_HEADER}");
    for batch in BATCH_SIZES {
        let dir = root.join(format!("single-redb-{batch}"));
        fs::create_dir_all(&dir).expect("create dir");
        let db = Database::create(dir.join("telemetry.redb")).expect("create redb");
        let run = drive(batch, duration, |first, n| {
            redb_commit(&db, TABLES[0], pool, first, n)
        });
        drop(db);
        let summary = Summary::from_runs(vec![run]);
        let row = summary.row(
            "redb",
            &batch.to_string(),
            allocated_bytes(&dir),
            written_records(&summary, 1, batch),
        );
        println!("{row}");
        fs::remove_dir_all(&dir).expect("remove dir");

        for mode in [SegMode::Grow, SegMode::SetLen, SegMode::Zeroed] {
            let dir = root.join(format!("single-{}-{batch}", mode.label()));
            let mut log = SegmentLog::create(dir.clone(), mode);
            let run = drive(batch, duration, |first, n| log.append_batch(pool, first, n));
            drop(log);
            let summary = Summary::from_runs(vec![run]);
            let row = summary.row(
                mode.label(),
                &batch.to_string(),
                seg_disk_bytes(mode, &dir),
                written_records(&summary, 1, batch),
            );
            println!("{row}");
            fs::remove_dir_all(&dir).expect("remove dir");
        }
    }
}

fn concurrent(root: &Path, pool: &Arc<Pool>, duration: Duration) {
    println!("\n## {PARTITIONS} partitions, batch {CONCURRENT_BATCH}\n\n{TABLE_HEADER}");
    let batch = CONCURRENT_BATCH;

    // redb: one database, one table per partition, one writer thread each.
    let dir = root.join("concurrent-redb");
    fs::create_dir_all(&dir).expect("create dir");
    let db = Arc::new(Database::create(dir.join("telemetry.redb")).expect("create redb"));
    let barrier = Arc::new(Barrier::new(PARTITIONS));
    let handles: Vec<_> = (0..PARTITIONS)
        .map(|p| {
            let (db, pool, barrier) = (Arc::clone(&db), Arc::clone(pool), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                drive(batch, duration, |first, n| {
                    redb_commit(&db, TABLES[p], &pool, first, n)
                })
            })
        })
        .collect();
    let runs = handles
        .into_iter()
        .map(|h| h.join().expect("writer thread"))
        .collect();
    drop(db);
    let summary = Summary::from_runs(runs);
    let row = summary.row(
        "redb, 4 threads, 4 tables",
        "250",
        allocated_bytes(&dir),
        written_records(&summary, PARTITIONS, batch),
    );
    println!("{row}");
    fs::remove_dir_all(&dir).expect("remove dir");

    // redb: one committer; each transaction carries one batch of every partition.
    let dir = root.join("concurrent-redb-one-committer");
    fs::create_dir_all(&dir).expect("create dir");
    let db = Database::create(dir.join("telemetry.redb")).expect("create redb");
    let run = drive(batch * PARTITIONS, duration, |first, n| {
        let per_partition = n / PARTITIONS;
        let first = first / PARTITIONS as u64;
        let txn = db.begin_write().expect("begin write transaction");
        for definition in TABLES {
            let mut table = txn.open_table(definition).expect("open table");
            for offset in first..first + per_partition as u64 {
                table
                    .insert(offset, pool.get(offset))
                    .expect("insert record");
            }
        }
        txn.commit().expect("commit");
    });
    drop(db);
    let summary = Summary::from_runs(vec![run]);
    let row = summary.row(
        "redb, 1 committer, 4 tables",
        "4×250",
        allocated_bytes(&dir),
        written_records(&summary, 1, batch * PARTITIONS),
    );
    println!("{row}");
    fs::remove_dir_all(&dir).expect("remove dir");

    // Segments: four independent logs, one writer thread each.
    for mode in [SegMode::Grow, SegMode::SetLen, SegMode::Zeroed] {
        let dir = root.join(format!("concurrent-{}", mode.label()));
        let logs: Vec<_> = (0..PARTITIONS)
            .map(|p| SegmentLog::create(dir.join(format!("p{p}")), mode))
            .collect();
        let barrier = Arc::new(Barrier::new(PARTITIONS));
        let handles: Vec<_> = logs
            .into_iter()
            .map(|mut log| {
                let (pool, barrier) = (Arc::clone(pool), Arc::clone(&barrier));
                thread::spawn(move || {
                    barrier.wait();
                    drive(batch, duration, |first, n| {
                        log.append_batch(&pool, first, n)
                    })
                })
            })
            .collect();
        let runs = handles
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect();
        let summary = Summary::from_runs(runs);
        let label = format!("{}, 4 threads, 4 files", mode.label());
        let row = summary.row(
            &label,
            "250",
            seg_disk_bytes(mode, &dir),
            written_records(&summary, PARTITIONS, batch),
        );
        println!("{row}");
        fs::remove_dir_all(&dir).expect("remove dir");
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

#[allow(clippy::cast_precision_loss)]
fn read_row(label: &str, samples: Vec<Duration>) -> String {
    let min = samples.iter().min().copied().unwrap_or_default();
    let med = median(samples);
    format!(
        "| {label} | {READ_RECORDS} | {med:.1} | {min:.1} | {rps:.0} |",
        med = med.as_secs_f64() * 1e3,
        min = min.as_secs_f64() * 1e3,
        rps = READ_RECORDS as f64 / med.as_secs_f64(),
    )
}

fn read_back(root: &Path, pool: &Pool) {
    println!(
        "\n## Sequential read of {READ_RECORDS} records (warm page cache, {READ_PASSES} passes)\n\n| storage | records | median ms | min ms | records/s (median) |\n|---|---:|---:|---:|---:|"
    );
    let write_batch = 1000;

    let redb_path = root.join("read.redb");
    {
        let db = Database::create(&redb_path).expect("create redb");
        let mut first = 0;
        while first < READ_RECORDS {
            redb_commit(&db, TABLES[0], pool, first, write_batch);
            first += write_batch as u64;
        }
    }
    let mut samples = Vec::new();
    for _ in 0..READ_PASSES {
        let db = Database::open(&redb_path).expect("open redb");
        let start = Instant::now();
        let txn = db.begin_read().expect("begin read transaction");
        let table = txn.open_table(TABLES[0]).expect("open table");
        let mut expected = 0u64;
        let mut bytes = 0usize;
        for entry in table.range(0..READ_RECORDS).expect("range") {
            let (key, value) = entry.expect("read entry");
            assert_eq!(key.value(), expected, "redb key sequence");
            let value = value.value();
            bytes += std::hint::black_box(value).len();
            expected += 1;
        }
        assert_eq!(expected, READ_RECORDS, "redb record count");
        assert_eq!(bytes, READ_RECORDS as usize * RECORD_BYTES, "redb bytes");
        samples.push(start.elapsed());
    }
    println!("{}", read_row("redb (range scan)", samples));

    let seg_dir = root.join("read-seg");
    {
        let mut log = SegmentLog::create(seg_dir.clone(), SegMode::Grow);
        let mut first = 0;
        while first < READ_RECORDS {
            log.append_batch(pool, first, write_batch);
            first += write_batch as u64;
        }
    }
    let mut samples = Vec::new();
    for _ in 0..READ_PASSES {
        let start = Instant::now();
        let file = File::open(segment_path(&seg_dir, 0)).expect("open segment");
        let mut reader = BufReader::with_capacity(1024 * 1024, file);
        let mut header = [0u8; FRAME_HEADER_BYTES];
        let mut record = vec![0u8; RECORD_BYTES];
        let mut expected = 0u64;
        while expected < READ_RECORDS {
            reader.read_exact(&mut header).expect("read frame header");
            let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
            let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
            let offset = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
            assert_eq!(offset, expected, "segment offset sequence");
            record.resize(usize::try_from(len).expect("len fits usize"), 0);
            reader.read_exact(&mut record).expect("read record");
            assert_eq!(crc32fast::hash(&record), crc, "segment crc");
            std::hint::black_box(&record);
            expected += 1;
        }
        samples.push(start.elapsed());
    }
    println!(
        "{}",
        read_row("segment (BufReader 1 MiB, CRC checked)", samples)
    );
}

fn main() {
    let secs: f64 = std::env::var("TELEMETRY_BENCH_SECS").ok().map_or(2.5, |s| {
        s.parse().expect("TELEMETRY_BENCH_SECS is a number")
    });
    let duration = Duration::from_secs_f64(secs);
    let base = std::env::var_os("TELEMETRY_BENCH_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    fs::create_dir_all(&base).expect("create bench base directory");
    let root = tempfile::Builder::new()
        .prefix("telemetry-storage-bench-")
        .tempdir_in(&base)
        .expect("create temp dir");
    let pool = Arc::new(Pool::new());
    let started = Instant::now();
    println!(
        "# telemetry_storage: {RECORD_BYTES} B records ({HEADER_BYTES} B header + {PAYLOAD_BYTES} B payload), {secs} s per write configuration, dir {}",
        root.path().display()
    );
    single_partition(root.path(), &pool, duration);
    concurrent(root.path(), &pool, duration);
    read_back(root.path(), &pool);
    println!(
        "\ntotal bench time: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
