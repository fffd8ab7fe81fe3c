//! Twin query engine over 100,000 in-memory twins: a tag equality filter returning
//! the first page of `SELECT *`, a `COUNT()` over the same filter, and a `GROUP BY`,
//! including the snapshot sort the service does per query.
//!
//! Run: `cargo bench -p hub --bench twin_query`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use hub::registry::{DeviceId, Presence};
use hub::twins::document::{TwinDocument, TwinLimits};
use hub::twins::{execute, query};
use serde_json::json;

const TWINS: usize = 100_000;
const RUNS: usize = 20;

fn main() {
    let mut twins = Vec::with_capacity(TWINS);
    for i in 0..TWINS {
        let mut twin = TwinDocument::new();
        let tags =
            json!({"site": format!("site-{}", i % 50), "floor": i % 10, "owner": {"team": "ops"}});
        let tags = tags.as_object().cloned().expect("object");
        twin.patch_tags(&tags, TwinLimits::default()).expect("tags");
        let reported = json!({"fw": format!("1.{}", i % 7), "rssi": -(i as i64 % 90)});
        twin.reported
            .apply(
                "reported",
                reported.as_object().expect("object"),
                "2026-01-01T00:00:00Z",
                false,
                TwinLimits::default(),
            )
            .expect("reported");
        let id = DeviceId::parse(&format!("device-{i:06}")).expect("id");
        twins.push((id, Arc::new(twin)));
    }
    let presence = Presence::default();
    let devices = HashMap::new();
    for text in [
        "SELECT * FROM devices WHERE tags.site = 'site-7'",
        "SELECT COUNT() AS n FROM devices WHERE tags.site = 'site-7'",
        "SELECT deviceId FROM devices WHERE tags.site = 'site-7' AND properties.reported.rssi > -40",
        "SELECT properties.reported.fw AS fw, COUNT() AS n FROM devices GROUP BY properties.reported.fw",
    ] {
        let parsed = query::parse(text).expect("query");
        let mut times = Vec::with_capacity(RUNS);
        let mut results = 0;
        for _ in 0..RUNS {
            let started = Instant::now();
            // What the service does per query: a sorted snapshot, then the scan.
            let mut snapshot: Vec<_> = twins
                .iter()
                .map(|(id, t)| (id.clone(), Arc::clone(t)))
                .collect();
            snapshot.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let deadline = Instant::now() + std::time::Duration::from_secs(60);
            let (output, _) = execute(&parsed, &snapshot, &devices, &presence, 0, 100, deadline)
                .expect("the query finishes within a minute");
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            results = match output {
                hub::twins::QueryOutput::Rows(rows) => rows.len(),
                hub::twins::QueryOutput::Devices(ids) => ids.len(),
            };
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{TWINS} twins  {text}\n    results(first page)={results}  p50={:.1} ms  max={:.1} ms  ({RUNS} runs)",
            times[RUNS / 2],
            times[RUNS - 1]
        );
    }
}
