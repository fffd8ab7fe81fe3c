//! The fleet registering through the provisioning contract (`--provision dps`): every
//! device's registration ([`crate::dps::register`]) with at most `in_flight` at once,
//! a progress line each second, and the [`ProvisioningReport`] — registrations per
//! second, the CONNECT-to-`assigned` latency percentiles, throttling and failures.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::dps::{Assigned, GroupEnrollment};
use crate::report::{Errors, Latency, ProvisioningReport, histogram};

/// What registering the fleet gave: per device (in the order of the ids) its
/// assignment, or `None` when it failed, and the report.
pub struct Registered {
    /// Each device's assignment, in fleet order.
    pub devices: Vec<Option<Assigned>>,
    /// The counts, rate and latencies.
    pub report: ProvisioningReport,
}

/// Registers `ids` under `group` at the MQTT listener `addr`, device `i` from
/// `sources[i % len]` when sources are given.
pub async fn register_fleet(
    addr: SocketAddr,
    sources: Option<Vec<IpAddr>>,
    group: &str,
    enrollment: GroupEnrollment,
    ids: &[String],
    in_flight: usize,
) -> Registered {
    let in_flight = in_flight.clamp(1, ids.len().max(1));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let progress = tokio::spawn(progress(ids.len(), done.clone(), failed.clone()));
    let started = Instant::now();
    let enrollment = &enrollment;
    let sources = sources.as_deref();
    let mut results: Vec<_> = futures_util::stream::iter(ids.iter().enumerate())
        .map(|(i, id)| {
            let bind = sources.and_then(|s| s.get(i % s.len()).copied());
            let (done, failed) = (&done, &failed);
            async move {
                let begun = Instant::now();
                let result = crate::dps::register(addr, bind, enrollment, id).await;
                let counter = if result.is_ok() { done } else { failed };
                counter.fetch_add(1, Ordering::Relaxed);
                (i, result, begun.elapsed())
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    let secs = started.elapsed().as_secs_f64();
    progress.abort();
    results.sort_by_key(|(i, _, _)| *i);

    let mut latencies = histogram();
    let mut errors = Errors::default();
    let mut report = ProvisioningReport {
        group: group.to_string(),
        attempted: ids.len() as u64,
        in_flight: in_flight as u64,
        secs,
        ..ProvisioningReport::default()
    };
    let devices = results
        .into_iter()
        .map(|(_, result, took)| match result {
            Ok(assigned) => {
                report.registered += 1;
                report.throttled += u64::from(assigned.throttled);
                report.polls += u64::from(assigned.polls);
                let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                let _ = latencies.record(micros.max(1));
                Some(assigned)
            }
            Err(err) => {
                report.failed += 1;
                errors.add(&err);
                None
            }
        })
        .collect();
    report.per_sec = report.registered as f64 / secs.max(1e-9);
    report.latency_ms = Latency::from_histogram(&latencies);
    report.errors = errors.top();
    Registered { devices, report }
}

/// A line on stderr each second until aborted.
async fn progress(total: usize, done: Arc<AtomicU64>, failed: Arc<AtomicU64>) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        eprintln!(
            "[{:>4}s] registered {}/{total}  failed {}",
            started.elapsed().as_secs(),
            done.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        );
    }
}
