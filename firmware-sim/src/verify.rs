//! `--verify`: reads this run's telemetry back through the service API, from the
//! offsets each partition had before the run, and counts lost and duplicated
//! messages and the send → enqueued latency.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

use crate::api::{Api, ApiError, PartitionOffsets};
use crate::report::{Latency, Verification, histogram};
use crate::template::Template;

/// How long to keep reading when fewer messages than acknowledged have been found.
/// Acknowledged QoS 1 messages are durable, so they are readable at once; the wait
/// covers QoS 0 messages still on their way.
const SETTLE: Duration = Duration::from_secs(5);

/// Where reading starts: one past each partition's last offset before the run.
pub fn start_offsets(before: &[PartitionOffsets]) -> HashMap<u64, u64> {
    before
        .iter()
        .map(|p| (p.id, u64::try_from(p.last + 1).unwrap_or(0)))
        .collect()
}

/// Counts what came back of `run`. `acked[d][n]` says whether message `n` of device
/// index `d` was acknowledged; `devices` maps ids to indexes.
#[derive(Debug, Default)]
pub struct Tally {
    /// Copies read, per (device index, seq).
    seen: HashMap<(usize, u64), u32>,
    end_to_end: Vec<u64>,
}

impl Tally {
    /// Records one message body (already decoded) enqueued at `enqueued_ns`.
    pub fn record(
        &mut self,
        template: &Template,
        run: &str,
        devices: &HashMap<String, usize>,
        body: &str,
        enqueued_ns: Option<u128>,
    ) {
        let Some(stamp) = template.parse_body(body) else {
            return;
        };
        if stamp.run != run {
            return;
        }
        let Some(&device) = devices.get(&stamp.device) else {
            return;
        };
        *self.seen.entry((device, stamp.seq)).or_default() += 1;
        if let (Some(sent), Some(enqueued)) = (stamp.time_ns, enqueued_ns) {
            // Clocks are the same machine's in tests; elsewhere a skew shows as 0.
            self.end_to_end
                .push(u64::try_from(enqueued.saturating_sub(sent) / 1000).unwrap_or(u64::MAX));
        }
    }

    /// Distinct messages read.
    pub fn distinct(&self) -> u64 {
        self.seen.len() as u64
    }

    /// The verdict, given which messages were acknowledged.
    pub fn verdict(&self, acked: &[Vec<bool>]) -> Verification {
        let read: u64 = self.seen.values().map(|&n| u64::from(n)).sum();
        let duplicated: u64 = self.seen.values().map(|&n| u64::from(n - 1)).sum();
        let mut lost = 0;
        for (device, messages) in acked.iter().enumerate() {
            for (seq, &was_acked) in messages.iter().enumerate() {
                if was_acked && !self.seen.contains_key(&(device, seq as u64)) {
                    lost += 1;
                }
            }
        }
        let unacked_read = self
            .seen
            .keys()
            .filter(|(device, seq)| {
                !acked
                    .get(*device)
                    .and_then(|m| m.get(*seq as usize))
                    .copied()
                    .unwrap_or(false)
            })
            .count() as u64;
        let mut h = histogram();
        for &us in &self.end_to_end {
            let _ = h.record(us.max(1));
        }
        Verification {
            read,
            distinct: self.distinct(),
            lost,
            duplicated,
            unacked_read,
            end_to_end_ms: Latency::from_histogram(&h),
        }
    }
}

/// A message's body as text: JSON bodies come back as JSON, others as base64.
fn body_text(message: &Value) -> Option<String> {
    match &message["body"] {
        Value::String(b64) => STANDARD
            .decode(b64)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// `enqueuedTime` (RFC 3339) in ns since the epoch.
fn enqueued_ns(message: &Value) -> Option<u128> {
    let text = message["enqueuedTime"].as_str()?;
    parse_rfc3339_ns(text)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
pub fn parse_rfc3339_ns(text: &str) -> Option<u128> {
    let (date, rest) = text.split_once(['T', 't'])?;
    let mut parts = date.split('-');
    let (y, m, d): (i64, i64, i64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    let (clock, offset_secs) = if let Some(clock) = rest.strip_suffix(['Z', 'z']) {
        (clock, 0i64)
    } else {
        let at = rest.rfind(['+', '-'])?;
        let (clock, offset) = rest.split_at(at);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let (oh, om) = offset[1..].split_once(':')?;
        (
            clock,
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60),
        )
    };
    let (hms, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    let mut hms = hms.split(':');
    let (hh, mm, ss): (i64, i64, i64) = (
        hms.next()?.parse().ok()?,
        hms.next()?.parse().ok()?,
        hms.next()?.parse().ok()?,
    );
    let nanos: i64 = if fraction.is_empty() {
        0
    } else {
        let digits: String = fraction.chars().take(9).collect();
        digits.parse::<i64>().ok()? * 10i64.pow(9 - digits.len() as u32)
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss - offset_secs;
    u128::try_from(i128::from(secs) * 1_000_000_000 + i128::from(nanos)).ok()
}

/// Reads every partition from `from` until it is exhausted (following `nextOffset`,
/// which may skip offsets in cluster mode), and again until `expected` distinct
/// messages are found or nothing new arrives for [`SETTLE`].
pub async fn read_back(
    api: &Api,
    mut from: HashMap<u64, u64>,
    template: &Template,
    run: &str,
    devices: &HashMap<String, usize>,
    expected: u64,
) -> Result<Tally, ApiError> {
    let mut tally = Tally::default();
    let mut last_progress = Instant::now();
    loop {
        let before = tally.distinct();
        let mut partitions: Vec<_> = from.keys().copied().collect();
        partitions.sort_unstable();
        for partition in partitions {
            loop {
                let offset = from.get(&partition).copied().unwrap_or(0);
                let (messages, next) = api.read(partition, offset).await?;
                if messages.is_empty() {
                    break;
                }
                for message in &messages {
                    if let Some(body) = body_text(message) {
                        tally.record(template, run, devices, &body, enqueued_ns(message));
                    }
                }
                from.insert(partition, next.max(offset + 1));
            }
        }
        if tally.distinct() > before {
            last_progress = Instant::now();
        }
        if tally.distinct() >= expected || last_progress.elapsed() >= SETTLE {
            return Ok(tally);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_parse_to_epoch_nanoseconds() {
        assert_eq!(parse_rfc3339_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ns("2024-02-29T12:34:56.789Z"),
            Some(1_709_210_096_789_000_000)
        );
        assert_eq!(
            parse_rfc3339_ns("2024-02-29T13:34:56.789+01:00"),
            Some(1_709_210_096_789_000_000)
        );
        assert_eq!(parse_rfc3339_ns("yesterday"), None);
    }

    #[test]
    fn lost_duplicated_and_unacked_messages_are_told_apart() {
        let template = Template::sized(0);
        let devices: HashMap<String, usize> = [("a".to_string(), 0), ("b".to_string(), 1)].into();
        let mut tally = Tally::default();
        let body = |d: &str, n: u64| String::from_utf8(template.render("run", d, n, 5)).unwrap();
        tally.record(&template, "run", &devices, &body("a", 0), Some(1005));
        tally.record(&template, "run", &devices, &body("a", 0), Some(1005));
        tally.record(&template, "run", &devices, &body("a", 1), None);
        tally.record(&template, "run", &devices, &body("b", 1), None);
        // Other runs, unknown devices and foreign bodies are ignored.
        tally.record(&template, "old", &devices, &body("a", 2), None);
        tally.record(&template, "run", &devices, &body("zz", 0), None);
        tally.record(&template, "run", &devices, "{\"temp\":1}", None);
        let acked = vec![vec![true, true], vec![true, false]];
        let v = tally.verdict(&acked);
        assert_eq!((v.read, v.distinct), (4, 3));
        assert_eq!((v.lost, v.duplicated, v.unacked_read), (1, 1, 1));
        assert_eq!(v.end_to_end_ms.unwrap().count, 2);
    }
}
