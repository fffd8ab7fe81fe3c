//! Generated payload fields, as sensors produce them: a bounded random walk, a sine
//! with noise, a counter, an RFC 3339 timestamp. A [`Generator`] is parsed once from
//! its placeholder (`{walk:start=20,step=0.5}`); each device holds [`Fields`] — its
//! walk positions and a random stream seeded from the run's seed and its id — so the
//! same seed gives each device the same values, and rendering writes into the
//! payload buffer without allocating.

use std::io::Write;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A generated field.
#[derive(Debug, Clone, PartialEq)]
pub enum Generator {
    /// `{walk:start=S,step=D,min=A,max=B,digits=N}`: each message moves the value by a
    /// uniform amount in [−D, D], kept within [A, B].
    Walk {
        /// First value.
        start: f64,
        /// Largest move per message.
        step: f64,
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
        /// Decimals written.
        digits: u8,
        /// Index of this walk's position in [`Fields`].
        slot: usize,
    },
    /// `{sine:period=P,amp=A,offset=O,noise=E,digits=N}`: O + A·sin(2π·t/P + φ) + a
    /// uniform noise in [−E, E], t the send time, φ a phase per device.
    Sine {
        /// Period, seconds.
        period: f64,
        /// Amplitude.
        amp: f64,
        /// Centre.
        offset: f64,
        /// Largest noise.
        noise: f64,
        /// Decimals written.
        digits: u8,
        /// Index of this sine's phase in [`Fields`].
        slot: usize,
    },
    /// `{counter:start=S,step=D,digits=N}`: S + D·(the device's message number).
    Counter {
        /// First value.
        start: f64,
        /// Increment per message.
        step: f64,
        /// Decimals written.
        digits: u8,
    },
    /// `{timestamp}`: the send time, RFC 3339 in UTC with milliseconds.
    Timestamp,
}

/// A generator placeholder that cannot be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct GeneratorError(pub String);

/// Names of the generators, for error messages.
pub const NAMES: &str = "{walk:…}, {sine:…}, {counter:…}, {timestamp}";

impl Generator {
    /// Parses `name` with its `args` (the text after `:`, `k=v` pairs split by `,`);
    /// `slots` counts the per-device values taken so far. `None` when `name` is not a
    /// generator.
    pub fn parse(
        name: &str,
        args: &str,
        slots: &mut usize,
    ) -> Option<Result<Generator, GeneratorError>> {
        let known: &[&str] = match name {
            "walk" => &["start", "step", "min", "max", "digits"],
            "sine" => &["period", "amp", "offset", "noise", "digits"],
            "counter" => &["start", "step", "digits"],
            "timestamp" => &[],
            _ => return None,
        };
        Some(Self::parse_known(name, args, known, slots))
    }

    fn parse_known(
        name: &str,
        args: &str,
        known: &[&str],
        slots: &mut usize,
    ) -> Result<Generator, GeneratorError> {
        let fail = |m: String| Err(GeneratorError(m));
        let mut values: Vec<(&str, &str)> = Vec::new();
        for pair in args.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return fail(format!("{pair:?} is not key=value"));
            };
            let key = key.trim();
            if !known.contains(&key) {
                return fail(if known.is_empty() {
                    format!("{name} takes no arguments, got {key:?}")
                } else {
                    format!("unknown argument {key:?} (known: {})", known.join(", "))
                });
            }
            if values.iter().any(|(k, _)| *k == key) {
                return fail(format!("{key} given twice"));
            }
            values.push((key, value.trim()));
        }
        let text = |key: &str| values.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let number = |key: &str, default: f64| -> Result<f64, GeneratorError> {
            match text(key) {
                None => Ok(default),
                Some(v) => match v.parse::<f64>() {
                    Ok(n) if n.is_finite() => Ok(n),
                    _ => Err(GeneratorError(format!("{key}={v}: not a number"))),
                },
            }
        };
        let digits = |default: u8| -> Result<u8, GeneratorError> {
            match text("digits") {
                None => Ok(default),
                Some(v) => match v.parse::<u8>() {
                    Ok(n) if n <= 9 => Ok(n),
                    _ => Err(GeneratorError(format!("digits={v}: not 0 to 9"))),
                },
            }
        };
        let mut slot = || {
            *slots += 1;
            *slots - 1
        };
        match name {
            "walk" => {
                let (start, step) = (number("start", 0.0)?, number("step", 1.0)?);
                let (min, max) = (
                    number("min", f64::NEG_INFINITY)?,
                    number("max", f64::INFINITY)?,
                );
                if step < 0.0 {
                    return fail(format!("step={step}: must not be negative"));
                }
                if !(min <= start && start <= max) {
                    return fail(format!("start={start} is outside min={min}, max={max}"));
                }
                Ok(Generator::Walk {
                    start,
                    step,
                    min,
                    max,
                    digits: digits(2)?,
                    slot: slot(),
                })
            }
            "sine" => {
                let period = match text("period") {
                    None => 60.0,
                    Some(v) => crate::values::parse_duration(v)
                        .map_err(|m| GeneratorError(format!("period={v}: {m}")))?
                        .as_secs_f64(),
                };
                if period <= 0.0 {
                    return fail("period must be longer than 0".into());
                }
                let noise = number("noise", 0.0)?;
                if noise < 0.0 {
                    return fail(format!("noise={noise}: must not be negative"));
                }
                Ok(Generator::Sine {
                    period,
                    amp: number("amp", 1.0)?,
                    offset: number("offset", 0.0)?,
                    noise,
                    digits: digits(2)?,
                    slot: slot(),
                })
            }
            "counter" => Ok(Generator::Counter {
                start: number("start", 0.0)?,
                step: number("step", 1.0)?,
                digits: digits(0)?,
            }),
            _ => Ok(Generator::Timestamp),
        }
    }

    /// The starting value of this generator's slot for a new device.
    fn initial(&self, rng: &mut StdRng) -> Option<f64> {
        match self {
            Generator::Walk { start, .. } => Some(*start),
            // Devices are out of phase with each other, as real ones would be.
            Generator::Sine { .. } => Some(rng.random::<f64>() * std::f64::consts::TAU),
            _ => None,
        }
    }

    /// Writes the value for message `seq` sent at `time_ns` (ns since the epoch).
    pub fn write(&self, fields: &mut Fields, seq: u64, time_ns: u128, out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail.
        match *self {
            Generator::Walk {
                step,
                min,
                max,
                digits,
                slot,
                ..
            } => {
                let Some(value) = fields.values.get_mut(slot) else {
                    return;
                };
                let delta = (fields.rng.random::<f64>() * 2.0 - 1.0) * step;
                *value = (*value + delta).clamp(min, max);
                let _ = write!(out, "{:.*}", usize::from(digits), *value);
            }
            Generator::Sine {
                period,
                amp,
                offset,
                noise,
                digits,
                slot,
            } => {
                let phase = fields.values.get(slot).copied().unwrap_or(0.0);
                let t = (time_ns % (1u128 << 100)) as f64 / 1e9;
                let jitter = (fields.rng.random::<f64>() * 2.0 - 1.0) * noise;
                let value =
                    offset + amp * (std::f64::consts::TAU * t / period + phase).sin() + jitter;
                let _ = write!(out, "{:.*}", usize::from(digits), value);
            }
            Generator::Counter {
                start,
                step,
                digits,
            } => {
                let value = start + step * seq as f64;
                let _ = write!(out, "{:.*}", usize::from(digits), value);
            }
            Generator::Timestamp => write_rfc3339(out, time_ns),
        }
    }
}

/// One device's generator state: walk positions, sine phases, and its random stream.
#[derive(Debug, Clone)]
pub struct Fields {
    values: Vec<f64>,
    rng: StdRng,
}

impl Fields {
    /// The state of `device` for `generators`, seeded by `seed`: the same pair gives
    /// the same values.
    pub fn new<'a>(
        generators: impl Iterator<Item = &'a Generator>,
        seed: u64,
        device: &str,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(mix(seed, fnv1a(device.as_bytes())));
        let mut values = Vec::new();
        for generator in generators {
            if let Some(value) = generator.initial(&mut rng) {
                values.push(value);
            }
        }
        Self { values, rng }
    }
}

/// FNV-1a: a hash of the device id that stays the same across builds and platforms
/// (std's hasher promises neither).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64's finaliser over seed and device hash, so nearby seeds give unrelated
/// streams.
fn mix(seed: u64, device: u64) -> u64 {
    let mut z = seed ^ device.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for `time_ns` since the epoch.
pub fn write_rfc3339(out: &mut Vec<u8>, time_ns: u128) {
    let millis = u64::try_from(time_ns / 1_000_000).unwrap_or(u64::MAX);
    let secs = millis / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX);
    let rest = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        millis % 1000
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator(name: &str, args: &str) -> Generator {
        Generator::parse(name, args, &mut 0).unwrap().unwrap()
    }

    fn values(g: &Generator, seed: u64, device: &str, n: u64) -> Vec<f64> {
        let mut fields = Fields::new(std::iter::once(g), seed, device);
        (0..n)
            .map(|seq| {
                let mut out = Vec::new();
                g.write(&mut fields, seq, u128::from(seq) * 250_000_000, &mut out);
                String::from_utf8(out).unwrap().parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn the_same_seed_and_device_give_the_same_values() {
        let walk = generator("walk", "start=20,step=0.5");
        let a = values(&walk, 42, "d1", 100);
        assert_eq!(a, values(&walk, 42, "d1", 100));
        assert_ne!(a, values(&walk, 43, "d1", 100), "another seed");
        assert_ne!(a, values(&walk, 42, "d2", 100), "another device");
        let sine = generator("sine", "period=10s,amp=5,noise=0.2");
        assert_eq!(values(&sine, 7, "d", 50), values(&sine, 7, "d", 50));
    }

    #[test]
    fn a_random_walk_moves_at_most_a_step_and_stays_in_bounds() {
        let walk = generator("walk", "start=20,step=0.5,min=18,max=21,digits=6");
        let v = values(&walk, 1, "d", 2000);
        let mut last = 20.0;
        for &x in &v {
            assert!((x - last).abs() <= 0.5 + 1e-6, "{last} → {x}");
            assert!((18.0..=21.0).contains(&x), "{x}");
            last = x;
        }
        assert!(v.iter().any(|&x| (x - 20.0).abs() > 0.5), "it walks");
    }

    #[test]
    fn a_sine_stays_within_its_amplitude_plus_noise_and_reaches_it() {
        let sine = generator("sine", "period=2s,amp=5,offset=10,noise=0.2,digits=4");
        // 4 messages a second over 10 periods.
        let v = values(&sine, 9, "d", 80);
        assert!(v.iter().all(|x| (x - 10.0).abs() <= 5.2 + 1e-3), "{v:?}");
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        assert!(hi - lo > 6.0, "it swings: {lo}..{hi}");
    }

    #[test]
    fn counters_and_timestamps() {
        let counter = generator("counter", "start=100,step=5");
        assert_eq!(values(&counter, 0, "d", 3), vec![100.0, 105.0, 110.0]);
        let mut out = Vec::new();
        write_rfc3339(&mut out, 1_709_210_096_789_123_456);
        assert_eq!(String::from_utf8(out).unwrap(), "2024-02-29T12:34:56.789Z");
        let mut out = Vec::new();
        write_rfc3339(&mut out, 0);
        assert_eq!(String::from_utf8(out).unwrap(), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn bad_arguments_are_named() {
        let err = |name, args| Generator::parse(name, args, &mut 0).unwrap().unwrap_err().0;
        assert!(err("walk", "stpe=1").contains("\"stpe\""));
        assert!(err("walk", "start=x").contains("start=x"));
        assert!(err("walk", "start=50,max=40").contains("outside"));
        assert!(err("sine", "period=soon").contains("period"));
        assert!(err("timestamp", "x=1").contains("no arguments"));
        assert!(err("counter", "digits=12").contains("digits"));
        assert!(Generator::parse("nope", "", &mut 0).is_none());
    }
}
