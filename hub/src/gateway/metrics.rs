//! Gateway counters, rendered by `GET /metrics` in Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counters of the device-facing side.
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    /// TCP connections accepted.
    pub accepted: AtomicU64,
    /// Connections open right now (accepted, not yet closed).
    pub open: AtomicI64,
    /// Connections refused because `mqtt.max_connections` were open.
    pub refused_at_limit: AtomicU64,
    /// accept() failures for lack of file descriptors.
    pub refused_no_fds: AtomicU64,
    /// TLS handshakes that failed.
    pub tls_failures: AtomicU64,
    /// Connections closed for undecodable or oversized packets.
    pub malformed: AtomicU64,
    /// Telemetry messages stored.
    pub messages_in: AtomicU64,
    /// Messages sent to devices.
    pub messages_out: AtomicU64,
    auth_failures: Mutex<BTreeMap<&'static str, u64>>,
}

/// One connection counted in [`GatewayMetrics::open`] for as long as this lives: the
/// count goes down when it is dropped, also while a panicking task unwinds.
#[derive(Debug)]
pub struct OpenConnection(Arc<GatewayMetrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl GatewayMetrics {
    /// Counts a connection as open until the returned guard is dropped.
    pub fn open_connection(self: &Arc<Self>) -> OpenConnection {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(self))
    }

    /// Counts a refused CONNECT under `reason`.
    pub fn auth_failure(&self, reason: &'static str) {
        let mut failures = self
            .auth_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *failures.entry(reason).or_default() += 1;
    }

    /// Refused CONNECTs by reason.
    pub fn auth_failures(&self) -> BTreeMap<&'static str, u64> {
        self.auth_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, u64); 7] = [
            (
                "hub_mqtt_connections_accepted_total",
                "TCP connections accepted",
                self.accepted.load(Ordering::Relaxed),
            ),
            (
                "hub_mqtt_connections_refused_limit_total",
                "connections refused at mqtt.max_connections",
                self.refused_at_limit.load(Ordering::Relaxed),
            ),
            (
                "hub_mqtt_accept_no_fds_total",
                "accepts failed for lack of file descriptors",
                self.refused_no_fds.load(Ordering::Relaxed),
            ),
            (
                "hub_mqtt_tls_failures_total",
                "failed TLS handshakes",
                self.tls_failures.load(Ordering::Relaxed),
            ),
            (
                "hub_mqtt_malformed_total",
                "connections closed for malformed packets",
                self.malformed.load(Ordering::Relaxed),
            ),
            (
                "hub_messages_in_total",
                "telemetry messages stored",
                self.messages_in.load(Ordering::Relaxed),
            ),
            (
                "hub_messages_out_total",
                "messages sent to devices",
                self.messages_out.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let open = self.open.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP hub_mqtt_connections_open connections open now\n# TYPE hub_mqtt_connections_open gauge\nhub_mqtt_connections_open {open}"
        );
        let _ = writeln!(
            out,
            "# HELP hub_auth_failures_total refused device CONNECTs by reason\n# TYPE hub_auth_failures_total counter"
        );
        for (reason, count) in self.auth_failures() {
            let _ = writeln!(
                out,
                "hub_auth_failures_total{{reason=\"{reason}\"}} {count}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_failures_by_reason() {
        let metrics = GatewayMetrics::default();
        metrics.accepted.fetch_add(3, Ordering::Relaxed);
        metrics.auth_failure("expired");
        metrics.auth_failure("expired");
        let text = metrics.render();
        assert!(
            text.contains("hub_mqtt_connections_accepted_total 3"),
            "{text}"
        );
        assert!(
            text.contains("hub_auth_failures_total{reason=\"expired\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn an_open_connection_is_uncounted_even_when_its_task_panics() {
        let metrics = Arc::new(GatewayMetrics::default());
        let open = metrics.open_connection();
        assert_eq!(metrics.open.load(Ordering::Relaxed), 1);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _open = open;
            panic!("connection task failed");
        }));
        assert!(panicked.is_err());
        assert_eq!(metrics.open.load(Ordering::Relaxed), 0);
    }
}
