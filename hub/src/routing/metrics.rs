//! Per-endpoint delivery counters for `/metrics`: delivered, retries, dead-lettered,
//! lag (messages behind the end of the logs) and the enqueue-to-delivery latency
//! histogram.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// One endpoint's counters.
#[derive(Debug, Default)]
pub struct EndpointMetrics {
    /// Messages delivered.
    pub delivered: AtomicU64,
    /// Failed delivery attempts (each retried).
    pub retries: AtomicU64,
    /// Messages given up on after `routing.retry_for` and put in the dead-letter stream.
    pub dead_lettered: AtomicU64,
    /// Messages below the end of the logs not yet delivered, per worker.
    lags: Mutex<BTreeMap<String, u64>>,
    buckets: [AtomicU64; 12],
    latency_count: AtomicU64,
    latency_micros: AtomicU64,
}

impl EndpointMetrics {
    /// Records one delivered message that waited `latency` since it was enqueued.
    pub fn observe(&self, latency: Duration) {
        let seconds = latency.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_micros
            .fetch_add(latency.as_micros() as u64, Relaxed);
        self.delivered.fetch_add(1, Relaxed);
    }

    /// Sets the lag of one worker (`log/partition`).
    pub fn set_lag(&self, worker: &str, lag: u64) {
        self.lags
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(worker.to_string(), lag);
    }

    fn lag(&self) -> u64 {
        self.lags
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum()
    }
}

/// A metric's name, help text and reading.
type Counter = (&'static str, &'static str, fn(&EndpointMetrics) -> u64);

/// Every endpoint's counters, by name; kept across reconfigurations.
#[derive(Debug, Default, Clone)]
pub struct RoutingMetrics {
    endpoints: Arc<Mutex<BTreeMap<String, Arc<EndpointMetrics>>>>,
}

impl RoutingMetrics {
    /// The counters of `endpoint`.
    pub fn endpoint(&self, endpoint: &str) -> Arc<EndpointMetrics> {
        let mut endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(endpoints.entry(endpoint.to_string()).or_default())
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut out = String::new();
        let counters: [Counter; 4] = [
            (
                "hub_routing_delivered_total",
                "Messages delivered to the endpoint.",
                |m| m.delivered.load(Relaxed),
            ),
            (
                "hub_routing_retries_total",
                "Failed delivery attempts to the endpoint, each retried.",
                |m| m.retries.load(Relaxed),
            ),
            (
                "hub_routing_dead_lettered_total",
                "Messages put in the dead-letter stream after routing.retry_for.",
                |m| m.dead_lettered.load(Relaxed),
            ),
            (
                "hub_routing_lag",
                "Messages in the logs not yet delivered to the endpoint.",
                |m| m.lag(),
            ),
        ];
        for (name, help, value) in counters {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (endpoint, metrics) in &endpoints {
                out.push_str(&format!(
                    "{name}{{endpoint=\"{endpoint}\"}} {}\n",
                    value(metrics)
                ));
            }
        }
        out.push_str(
            "# HELP hub_routing_latency_seconds Time from enqueue to delivery per endpoint.\n\
             # TYPE hub_routing_latency_seconds histogram\n",
        );
        for (endpoint, metrics) in &endpoints {
            for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&metrics.buckets) {
                out.push_str(&format!(
                    "hub_routing_latency_seconds_bucket{{endpoint=\"{endpoint}\",le=\"{bound}\"}} {}\n",
                    bucket.load(Relaxed)
                ));
            }
            let count = metrics.latency_count.load(Relaxed);
            out.push_str(&format!(
                "hub_routing_latency_seconds_bucket{{endpoint=\"{endpoint}\",le=\"+Inf\"}} {count}\n\
                 hub_routing_latency_seconds_sum{{endpoint=\"{endpoint}\"}} {}\n\
                 hub_routing_latency_seconds_count{{endpoint=\"{endpoint}\"}} {count}\n",
                metrics.latency_micros.load(Relaxed) as f64 / 1e6
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_lag_and_histogram_per_endpoint() {
        let metrics = RoutingMetrics::default();
        let hook = metrics.endpoint("hook");
        hook.observe(Duration::from_millis(20));
        hook.retries.fetch_add(2, Relaxed);
        hook.set_lag("telemetry/0", 5);
        hook.set_lag("telemetry/1", 2);
        let text = metrics.render();
        assert!(text.contains("hub_routing_delivered_total{endpoint=\"hook\"} 1"));
        assert!(text.contains("hub_routing_retries_total{endpoint=\"hook\"} 2"));
        assert!(text.contains("hub_routing_lag{endpoint=\"hook\"} 7"));
        assert!(
            text.contains("hub_routing_latency_seconds_bucket{endpoint=\"hook\",le=\"0.01\"} 0")
        );
        assert!(
            text.contains("hub_routing_latency_seconds_bucket{endpoint=\"hook\",le=\"0.025\"} 1")
        );
    }
}
