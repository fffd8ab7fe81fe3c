//! Scenarios (`--scenario-file FILE`): device groups in TOML, each with its own count,
//! prefix, rate, QoS, payload and behaviour, plus run-wide globals (duration, ramp,
//! drain, seed) that flags given on the command line override, read into
//! [`crate::settings::Args`]; and the checks of the groups (the file's, or the one
//! group the flags make: [`crate::settings::Args::groups`]).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use clap::ArgMatches;
use clap::parser::ValueSource;
use serde::Deserialize;

use crate::settings::{Args, Group};
use crate::template::parse_payload;
use crate::values::{Auth, parse_duration, parse_rate};

/// The most devices one run may simulate (as `--devices`).
const MAX_DEVICES: u64 = 1_000_000;

/// A scenario file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file cannot be read.
    #[error("cannot read the scenario {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML, a key unknown, or a value of the wrong type (toml names the key and
    /// the line).
    #[error("scenario {path}: {message}")]
    Toml {
        /// The file.
        path: String,
        /// toml's message.
        message: String,
    },
    /// A value of the right type that is still unusable.
    #[error("scenario {path}: {key}: {message}")]
    Value {
        /// The file.
        path: String,
        /// The key, `group[i].name` for a group's.
        key: String,
        /// Why.
        message: String,
    },
}

/// A number or a text (`rate = 5` or `rate = "max"`, `duration = 30` or `"30s"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Integer(u64),
    Float(f64),
    Text(String),
}

impl NumberOrText {
    fn text(&self) -> String {
        match self {
            NumberOrText::Integer(n) => n.to_string(),
            NumberOrText::Float(f) => f.to_string(),
            NumberOrText::Text(t) => t.clone(),
        }
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    duration: Option<NumberOrText>,
    ramp: Option<f64>,
    drain: Option<NumberOrText>,
    seed: Option<u64>,
    #[serde(rename = "group", default)]
    groups: Vec<GroupFile>,
}

/// One `[[group]]` as written; a key left out takes the command line's value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    name: String,
    devices: u32,
    prefix: Option<String>,
    rate: Option<NumberOrText>,
    qos: Option<u8>,
    inflight: Option<u16>,
    payload: Option<NumberOrText>,
    twin_every: Option<NumberOrText>,
    method_delay_ms: Option<u64>,
    method_fail_rate: Option<f64>,
    auth: Option<String>,
    sdk: Option<bool>,
}

/// Whether the user gave flag `id` (on the command line or in the environment).
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Reads `path` and applies it to `args`: globals the command line did not give, and
/// the groups (`args.devices` becomes their total).
pub fn apply(path: &Path, args: &mut Args, matches: &ArgMatches) -> Result<(), ScenarioError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
        path: shown.clone(),
        source,
    })?;
    apply_text(&text, &shown, args, |id| given(matches, id))
}

/// [`apply`] on the file's text; `given(flag)` says whether the command line set it.
pub fn apply_text(
    text: &str,
    path: &str,
    args: &mut Args,
    given: impl Fn(&str) -> bool,
) -> Result<(), ScenarioError> {
    let file: ScenarioFile = toml::from_str(text).map_err(|err| ScenarioError::Toml {
        path: path.to_string(),
        message: err.to_string().trim_end().to_string(),
    })?;
    let bad = |key: String, message: String| ScenarioError::Value {
        path: path.to_string(),
        key,
        message,
    };
    if let Some(duration) = &file.duration
        && !given("duration")
    {
        args.duration = parse_duration(&duration.text()).map_err(|m| bad("duration".into(), m))?;
    }
    if let Some(drain) = &file.drain
        && !given("drain")
    {
        args.drain = parse_duration(&drain.text()).map_err(|m| bad("drain".into(), m))?;
    }
    if let Some(ramp) = file.ramp
        && !given("ramp")
    {
        if !(ramp.is_finite() && ramp > 0.0) {
            return Err(bad("ramp".into(), format!("{ramp} is not a positive rate")));
        }
        args.ramp = Some(ramp);
    }
    if let Some(seed) = file.seed
        && !given("seed")
    {
        args.seed = Some(seed);
    }
    if file.groups.is_empty() {
        return Err(bad(
            "group".into(),
            "a scenario needs at least one [[group]]".into(),
        ));
    }
    let mut groups = Vec::with_capacity(file.groups.len());
    let mut names = HashSet::new();
    for (i, g) in file.groups.into_iter().enumerate() {
        let key = |k: &str| format!("group[{i}].{k}");
        if g.name.is_empty() || !names.insert(g.name.clone()) {
            return Err(bad(
                key("name"),
                format!("{:?} is empty or names another group too", g.name),
            ));
        }
        if g.devices == 0 {
            return Err(bad(key("devices"), "must be at least 1".into()));
        }
        let rate = match &g.rate {
            Some(rate) => parse_rate(&rate.text()).map_err(|m| bad(key("rate"), m))?,
            None => args.rate,
        };
        let qos = g.qos.unwrap_or(args.qos);
        if qos > 1 {
            return Err(bad(key("qos"), format!("{qos} is not 0 or 1")));
        }
        let inflight = g.inflight.unwrap_or(args.inflight);
        if !(1..=65_000).contains(&inflight) {
            return Err(bad(
                key("inflight"),
                format!("{inflight} is not in 1..=65000"),
            ));
        }
        let payload = match &g.payload {
            Some(payload) => parse_payload(&payload.text()).map_err(|m| bad(key("payload"), m))?,
            None => args.payload.clone(),
        };
        let twin_every = match &g.twin_every {
            Some(every) => {
                Some(parse_duration(&every.text()).map_err(|m| bad(key("twin_every"), m))?)
            }
            None => args.twin_every,
        };
        let method_fail_rate = g.method_fail_rate.unwrap_or(args.method_fail_rate);
        if !(0.0..=1.0).contains(&method_fail_rate) {
            return Err(bad(
                key("method_fail_rate"),
                format!("{method_fail_rate} is not a fraction between 0 and 1"),
            ));
        }
        let auth = match g.auth.as_deref() {
            Some(text) => <Auth as clap::ValueEnum>::from_str(text, true)
                .map_err(|_| bad(key("auth"), format!("{text:?} is not sas, jwt or x509")))?,
            None => args.auth,
        };
        let method_delay = Duration::from_millis(g.method_delay_ms.unwrap_or(args.method_delay_ms));
        let sdk = g.sdk.unwrap_or(args.sdk)
            || twin_every.is_some()
            || !method_delay.is_zero()
            || method_fail_rate > 0.0
            || args.implies_sdk();
        groups.push(Group {
            prefix: g.prefix.unwrap_or_else(|| format!("{}-", g.name)),
            name: g.name,
            devices: g.devices,
            rate,
            qos,
            inflight,
            payload,
            twin_every,
            method_delay,
            method_fail_rate,
            auth,
            sdk,
        });
    }
    let total: u64 = groups.iter().map(|g| u64::from(g.devices)).sum();
    if total > MAX_DEVICES {
        return Err(bad(
            "group".into(),
            format!("{total} devices in all; at most {MAX_DEVICES}"),
        ));
    }
    args.devices = u32::try_from(total).unwrap_or(u32::MAX);
    args.scenario_groups = groups;
    Ok(())
}

/// Checks a set of groups: the combinations [`Args::validate`] refuses for the flags,
/// per group, and device ids that two groups would share.
pub fn validate_groups(args: &Args, groups: &[Group]) -> Result<(), String> {
    for g in groups {
        // Without a scenario the one group is the flags: no group name to show.
        let who = if args.scenario_groups.is_empty() {
            String::new()
        } else {
            format!("group {}: ", g.name)
        };
        if g.prefix.is_empty() {
            return Err(format!("{who}the prefix must not be empty"));
        }
        if args.target.is_some() && g.sdk {
            return Err(format!(
                "{who}the device-sdk path (twin, methods, --sas-ttl) needs the hub; a plain MQTT --target has none"
            ));
        }
        if g.sdk && g.qos == 0 {
            return Err(format!(
                "{who}the device-sdk path sends telemetry at QoS 1 only; use qos 1 or drop the device-sdk behaviour"
            ));
        }
        if args.verify && !g.payload.identifies_messages() {
            return Err(format!(
                "{who}--verify needs a payload that names its message: a size, or a template with {{run}}, {{device}} and {{seq}}"
            ));
        }
    }
    // PREFIX + number: "a" and "a1" both make "a10"; so do equal prefixes.
    for (i, a) in groups.iter().enumerate() {
        for b in &groups[i + 1..] {
            let (short, long) = if a.prefix.len() <= b.prefix.len() {
                (a, b)
            } else {
                (b, a)
            };
            if let Some(rest) = long.prefix.strip_prefix(short.prefix.as_str())
                && rest.chars().all(|c| c.is_ascii_digit())
            {
                return Err(format!(
                    "groups {} and {} would share device ids (prefixes {:?} and {:?})",
                    short.name, long.name, short.prefix, long.prefix
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::Rate;
    use clap::Parser;

    fn base(extra: &[&str]) -> Args {
        let argv = ["firmware-sim", "--hub", "http://x", "--token", "t"];
        Args::try_parse_from(argv.iter().chain(extra)).unwrap()
    }

    const TWO: &str = r#"
        duration = "3s"
        ramp = 50
        seed = 7

        [[group]]
        name = "thermo"
        devices = 4
        rate = 2
        payload = '{{"t":{walk:start=20,step=0.5}}}'

        [[group]]
        name = "meters"
        devices = 2
        prefix = "m-"
        rate = "max"
        qos = 0
    "#;

    #[test]
    fn groups_resolve_with_the_flags_as_defaults_and_the_command_line_wins() {
        let mut args = base(&["--qos", "1", "--inflight", "3"]);
        apply_text(TWO, "two.toml", &mut args, |flag| flag == "ramp").unwrap();
        assert_eq!(args.duration, Duration::from_secs(3));
        assert_eq!(args.ramp, None, "--ramp given on the command line is kept");
        assert_eq!(args.seed, Some(7));
        assert_eq!(args.devices, 6);
        let groups = args.groups();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].prefix, "thermo-");
        assert_eq!(groups[0].rate, Rate::PerSec(2.0));
        assert_eq!((groups[0].qos, groups[0].inflight), (1, 3));
        assert_eq!(groups[1].device_id(1), "m-1");
        assert_eq!((groups[1].rate, groups[1].qos), (Rate::Max, 0));
        assert!(validate_groups(&args, &groups).is_ok());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let mut args = base(&[]);
        let err = apply_text(
            "durration = 3\n[[group]]\nname='a'\ndevices=1\n",
            "f",
            &mut args,
            |_| false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("durration"), "{err}");
        let err = apply_text(
            "[[group]]\nname='a'\ndevices=1\nrat=2\n",
            "f",
            &mut args,
            |_| false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("rat"), "{err}");
        let err = apply_text(
            "[[group]]\nname='a'\ndevices=1\nrate='fast'\n",
            "f",
            &mut args,
            |_| false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("group[0].rate"), "{err}");
        let err = apply_text(
            "[[group]]\nname='a'\ndevices=1\npayload='{nope}'\n",
            "f",
            &mut args,
            |_| false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("group[0].payload") && err.contains("nope"),
            "{err}"
        );
        let err = apply_text("duration = '1s'\n", "f", &mut args, |_| false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[[group]]"), "{err}");
    }

    #[test]
    fn the_example_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let mut args = base(&[]);
                let matches = <Args as clap::CommandFactory>::command()
                    .try_get_matches_from(["firmware-sim"])
                    .unwrap();
                apply(&path, &mut args, &matches).unwrap_or_else(|err| panic!("{err}"));
                validate_groups(&args, &args.groups()).unwrap();
                seen += 1;
            }
        }
        assert!(seen >= 2, "examples in {}", dir.display());
    }

    #[test]
    fn groups_that_would_share_device_ids_are_refused() {
        let mut args = base(&[]);
        let text = "[[group]]\nname='a'\ndevices=1\nprefix='d'\n[[group]]\nname='b'\ndevices=1\nprefix='d1'\n";
        apply_text(text, "f", &mut args, |_| false).unwrap();
        let err = validate_groups(&args, &args.groups()).unwrap_err();
        assert!(err.contains("share device ids"), "{err}");
        let mut args = base(&["--qos", "0"]);
        let text = "[[group]]\nname='a'\ndevices=1\ntwin_every='1s'\n";
        apply_text(text, "f", &mut args, |_| false).unwrap();
        let err = validate_groups(&args, &args.groups()).unwrap_err();
        assert!(err.contains("group a") && err.contains("QoS 1"), "{err}");
    }
}
