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

/// Counts what came back of `run`: copies read per (device index, sequence number),
/// one byte per message sent, so a long run's tally stays small.
#[derive(Debug, Default)]
pub struct Tally {
    /// `copies[d][n]`: copies of message `n` of device `d` read (saturating).
    copies: Vec<Vec<u8>>,
    /// Bodies of this run naming a device or sequence number it never sent.
    unexpected: u64,
    distinct: u64,
    read: u64,
    end_to_end: Vec<u64>,
}

impl Tally {
    /// A tally for devices that sent `sent[d]` messages each.
    pub fn new(sent: impl IntoIterator<Item = usize>) -> Self {
        Self {
            copies: sent.into_iter().map(|n| vec![0u8; n]).collect(),
            ..Self::default()
        }
    }

    /// Records one message body (already decoded) enqueued at `enqueued_ns`; `devices`
    /// maps device ids to indexes.
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
        let slot = devices
            .get(&stamp.device)
            .and_then(|&d| self.copies.get_mut(d))
            .and_then(|copies| copies.get_mut(usize::try_from(stamp.seq).ok()?));
        let Some(slot) = slot else {
            self.unexpected += 1;
            return;
        };
        if *slot == 0 {
            self.distinct += 1;
        }
        *slot = slot.saturating_add(1);
        self.read += 1;
        if let (Some(sent), Some(enqueued)) = (stamp.time_ns, enqueued_ns) {
            // Clocks are the same machine's in tests; elsewhere a skew shows as 0.
            self.end_to_end
                .push(u64::try_from(enqueued.saturating_sub(sent) / 1000).unwrap_or(u64::MAX));
        }
    }

    /// Distinct messages read.
    pub fn distinct(&self) -> u64 {
        self.distinct
    }

    /// The verdict, given which messages were acknowledged (QoS 1) or written (QoS 0).
    pub fn verdict(&self, delivered: &[Vec<bool>]) -> Verification {
        let (mut lost, mut duplicated, mut unacked_read) = (0, 0, 0);
        for (d, copies) in self.copies.iter().enumerate() {
            for (n, &count) in copies.iter().enumerate() {
                let expected = delivered
                    .get(d)
                    .and_then(|m| m.get(n))
                    .copied()
                    .unwrap_or(false);
                match (expected, count) {
                    (true, 0) => lost += 1,
                    (false, c) if c > 0 => unacked_read += 1,
                    _ => {}
                }
                duplicated += u64::from(count.saturating_sub(1));
            }
        }
        let mut h = histogram();
        for &us in &self.end_to_end {
            let _ = h.record(us.max(1));
        }
        Verification {
            read: self.read,
            distinct: self.distinct,
            lost,
            duplicated,
            unacked_read,
            unexpected: self.unexpected,
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
    templates: &[&Template],
    run: &str,
    devices: &HashMap<String, usize>,
    delivered: &[Vec<bool>],
) -> Result<Tally, ApiError> {
    let expected: u64 = delivered
        .iter()
        .map(|d| d.iter().filter(|&&x| x).count() as u64)
        .sum();
    let mut tally = Tally::new(delivered.iter().map(Vec::len));
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
                    // Scenario groups may each have their own template: the first
                    // that reads the body is its group's (a few groups at most).
                    if let Some(body) = body_text(message)
                        && let Some(template) =
                            templates.iter().find(|t| t.parse_body(&body).is_some())
                    {
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
        let mut tally = Tally::new([2, 2]);
        let body = |d: &str, n: u64| String::from_utf8(template.render("run", d, n, 5)).unwrap();
        tally.record(&template, "run", &devices, &body("a", 0), Some(1005));
        tally.record(&template, "run", &devices, &body("a", 0), Some(1005));
        tally.record(&template, "run", &devices, &body("a", 1), None);
        tally.record(&template, "run", &devices, &body("b", 1), None);
        // Other runs, unknown devices and foreign bodies are ignored.
        tally.record(&template, "old", &devices, &body("a", 2), None);
        tally.record(&template, "run", &devices, &body("zz", 0), None);
        tally.record(&template, "run", &devices, &body("b", 7), None);
        tally.record(&template, "run", &devices, "{\"temp\":1}", None);
        let acked = vec![vec![true, true], vec![true, false]];
        let v = tally.verdict(&acked);
        assert_eq!((v.read, v.distinct), (4, 3));
        assert_eq!((v.lost, v.duplicated, v.unacked_read), (1, 1, 1));
        assert_eq!(
            v.unexpected, 2,
            "an unknown device and a sequence number never sent"
        );
        assert_eq!(v.end_to_end_ms.unwrap().count, 2);
    }
}
