//! C2D storage at fleet scale (issue 11): an embedded store holding N devices × 50
//! queued messages (N = 1,000 and 10,000), filled through `CommandStore::enqueue`
//! (one durable transaction per message, as `POST …/messages/deviceBound` does).
//!
//! Measured per fleet size:
//! 1. one expiry sweep when nothing is due (what the hub does every second), and when
//!    1% of the messages are due (removed in batches of `EXPIRY_BATCH`, with Expired
//!    feedback, exactly as `Commands::expire` does);
//! 2. the queue lengths of a page of 100 devices (what `GET /devices` adds to a page);
//! 3. for comparison, the work the code before issue 11 did: decoding every queued
//!    message (the old sweep, every second) and decoding the 100 queues of a page.
//!
//! Run: `cargo bench -p hub --bench c2d_storage`. The store lives in a temporary
//! directory under `$TMPDIR` (`TMPDIR=/dev/shm` makes the 550,000 fsyncs of the fill
//! cheap; the measured operations are reads, apart from the 1% sweep's commits).

use std::time::{Duration, Instant};

use bytes::Bytes;
use hub::commands::EXPIRY_BATCH;
use hub::commands::c2d::{AckMode, C2dMessage, Removed};
use hub::registry::DeviceId;
use hub::store::embedded::EmbeddedStore;
use time::OffsetDateTime;

const PER_DEVICE: usize = 50;
const RUNS: usize = 21;
const DUE_RUNS: usize = 5;
const PAGE: usize = 100;

fn message(n: usize, expiry: OffsetDateTime) -> C2dMessage {
    C2dMessage {
        seq: 0,
        message_id: format!("{n:032x}"),
        correlation_id: Some(format!("corr-{n}")),
        content_type: Some("application/json".into()),
        content_encoding: None,
        properties: vec![("kind".into(), "setpoint".into())],
        body: Bytes::from(format!(
            "{{\"setpoint\":{},\"unit\":\"celsius\",\"note\":\"{}\"}}",
            n % 30,
            "x".repeat(120)
        )),
        enqueued: OffsetDateTime::now_utc(),
        expiry,
        ack: AckMode::Full,
        delivery_count: 0,
        generation_id: String::new(),
    }
}

/// Median and max in milliseconds.
fn summary(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(times[times.len() / 2]), ms(times[times.len() - 1]))
}

fn time<T>(op: impl FnOnce() -> T) -> (Duration, T) {
    let started = Instant::now();
    let out = op();
    (started.elapsed(), out)
}

/// One sweep as `Commands::expire` runs it: batches until a short one.
fn sweep(store: &EmbeddedStore, now: OffsetDateTime) -> Removed {
    let mut total = Removed::default();
    loop {
        let removed = store.expire(now, EXPIRY_BATCH).expect("expire");
        total.messages += removed.messages;
        total.feedback += removed.feedback;
        if removed.messages < EXPIRY_BATCH {
            return total;
        }
    }
}

fn run(devices: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("hub.redb")).expect("store");
    let t0 = OffsetDateTime::now_utc();
    // 1% of the messages (every 100th) expire in 10 minutes, the rest in 2 hours.
    let soon = t0 + time::Duration::minutes(10);
    let later = t0 + time::Duration::hours(2);
    let ids: Vec<DeviceId> = (0..devices)
        .map(|d| DeviceId::parse(&format!("device-{d:06}")).expect("id"))
        .collect();
    let (fill, ()) = time(|| {
        for (d, id) in ids.iter().enumerate() {
            for m in 0..PER_DEVICE {
                let n = d * PER_DEVICE + m;
                let expiry = if n.is_multiple_of(100) { soon } else { later };
                store
                    .enqueue(id, message(n, expiry), PER_DEVICE)
                    .expect("enqueue");
            }
        }
    });
    let total = devices * PER_DEVICE;
    println!(
        "{devices} devices × {PER_DEVICE} = {total} messages; fill {:.1} s",
        fill.as_secs_f64()
    );

    // 1a. Nothing due (the common case, every second).
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let (elapsed, removed) = time(|| sweep(&store, t0));
        assert_eq!(removed, Removed::default());
        times.push(elapsed);
    }
    let (p50, max) = summary(times);
    println!(
        "  sweep, nothing due                 p50={p50:.3} ms  max={max:.3} ms  ({RUNS} runs)"
    );

    // 1b. 1% due; after each run the removed messages are queued again (due again).
    let at = t0 + time::Duration::minutes(30);
    let due_devices: Vec<&DeviceId> = ids.iter().step_by(2).collect();
    let mut times = Vec::with_capacity(DUE_RUNS);
    let mut removed_per_run = 0;
    for run in 0..DUE_RUNS {
        let (elapsed, removed) = time(|| sweep(&store, at));
        assert_eq!(removed.messages, total / 100, "run {run}");
        removed_per_run = removed.messages;
        times.push(elapsed);
        // Every 100th message is the first message of every second device: refill
        // those queues with one message due again.
        for (i, id) in due_devices.iter().enumerate() {
            store
                .enqueue(id, message(i, soon), PER_DEVICE)
                .expect("refill");
        }
    }
    let (p50, max) = summary(times);
    println!(
        "  sweep, 1% due ({removed_per_run} removed)      p50={p50:.1} ms  max={max:.1} ms  ({DUE_RUNS} runs)"
    );

    // 2. Queue lengths of a page of 100 devices from the middle of the fleet.
    let page = &ids[devices / 2..devices / 2 + PAGE];
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let (elapsed, counts) = time(|| {
            page.iter()
                .map(|id| store.count(id).expect("count"))
                .collect::<Vec<_>>()
        });
        assert!(counts.iter().all(|&c| c == PER_DEVICE));
        times.push(elapsed);
    }
    let (p50, max) = summary(times);
    println!(
        "  queue lengths, page of {PAGE}         p50={p50:.3} ms  max={max:.3} ms  ({RUNS} runs)"
    );

    // 3. The old code's work, for comparison: decode the page's 100 queues, and every
    //    queued message (the old sweep).
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let (elapsed, decoded) = time(|| {
            page.iter()
                .map(|id| store.pending(id, 0, PER_DEVICE).expect("read").len())
                .sum::<usize>()
        });
        assert_eq!(decoded, PAGE * PER_DEVICE);
        times.push(elapsed);
    }
    let (p50, max) = summary(times);
    println!(
        "  (before) decode the page's queues  p50={p50:.1} ms  max={max:.1} ms  ({RUNS} runs)"
    );
    let mut times = Vec::with_capacity(3);
    for _ in 0..3 {
        let (elapsed, decoded) = time(|| {
            ids.iter()
                .map(|id| store.pending(id, 0, PER_DEVICE).expect("read").len())
                .sum::<usize>()
        });
        assert_eq!(decoded, total);
        times.push(elapsed);
    }
    let (p50, max) = summary(times);
    println!("  (before) decode every message      p50={p50:.0} ms  max={max:.0} ms  (3 runs)");
}

fn main() {
    for devices in [1_000, 10_000] {
        run(devices);
    }
}
