//! What a run measures (`--scenario`, `--flap`, `--workers`): the argument checks
//! that concern the scenarios, and the dispatch from the flags to the run — the
//! `--workers` parent, else the fleet provisioned and then one scenario on it. What
//! the scenarios report is [`crate::report`]'s; what they stand on (the fleet, the
//! progress line, the empty report they fill) is [`crate::run`]'s.
//!
//! - [`telemetry`]: devices send telemetry (the default), lean or device-sdk, per
//!   group.
//! - [`connections`]: connections held (hub RSS before, held, end) and the connect
//!   rate (handshakes with latency percentiles and CPU on every side).
//! - [`round_trips`]: direct-method and twin reported-patch round trips.
//! - [`storm`]: every connection dropped at once (or a hub restart), and the time
//!   until all are back.
//!
//! `--flap` is [`crate::flap`]'s (telemetry while devices drop and reconnect).

pub mod connections;
pub mod round_trips;
pub mod storm;
pub mod telemetry;

use crate::report::Report;
use crate::run::RunError;
use crate::settings::Args;
use crate::values::{Scenario, StormMode};

/// Checks the scenario flags against each other and the rest.
pub fn validate(args: &Args) -> Result<(), String> {
    let telemetry = args.scenario == Scenario::Telemetry;
    if !telemetry && args.flap.is_some() {
        return Err(
            "--flap drops devices that send telemetry: it goes with the telemetry scenario only"
                .into(),
        );
    }
    if (!telemetry || args.flap.is_some()) && args.groups().iter().any(|g| args.uses_tls(g.auth)) {
        return Err("--tls and --auth x509 run with the telemetry scenario (without --flap); the other scenarios connect over plain TCP".into());
    }
    if (!telemetry || args.flap.is_some()) && args.uses_sdk() {
        return Err("--sdk, --twin-every and the method flags belong to the telemetry scenario (without --flap)".into());
    }
    if (!telemetry || args.flap.is_some()) && args.verify {
        return Err(
            "--verify reads telemetry back: it goes with the telemetry scenario (without --flap)"
                .into(),
        );
    }
    if matches!(args.scenario, Scenario::Methods | Scenario::Twin) && args.target.is_some() {
        return Err(format!(
            "the {} scenario needs the hub's $iothub topics{}; a plain MQTT --target has none",
            if args.scenario == Scenario::Methods {
                "methods"
            } else {
                "twin"
            },
            if args.scenario == Scenario::Methods {
                " and service API"
            } else {
                ""
            }
        ));
    }
    if args.ramp.is_some() && (!telemetry || args.flap.is_some()) {
        return Err("--ramp paces the telemetry scenario's connects; the other scenarios connect --connect-inflight at a time".into());
    }
    if args.total.is_some() && args.scenario != Scenario::ConnectRate {
        return Err("--total is the connect-rate scenario's number of handshakes".into());
    }
    if args.scenario != Scenario::Storm && args.storm != StormMode::Drop {
        return Err("--storm restart goes with --scenario storm".into());
    }
    if !args.warmup.is_zero() && args.uses_sdk() {
        return Err(
            "--warmup is measured on the lean path; drop it or the device-sdk flags".into(),
        );
    }
    if args.workers.is_some_and(|k| k > args.devices) {
        return Err(format!(
            "--workers {} is more processes than the {} devices to share out",
            args.workers.unwrap_or(0),
            args.devices
        ));
    }
    if args.workers.is_some_and(|k| k > 1) && args.verify {
        return Err("--verify with --workers is not supported: run --verify in one process".into());
    }
    if args.workers.is_some_and(|k| k > 1) && args.storm == StormMode::Restart {
        return Err("--storm restart waits for one hub restart: run it in one process".into());
    }
    Ok(())
}

/// Runs what `args` ask for; `interrupt` ends it early (Ctrl-C) with a partial
/// report.
pub async fn run(
    args: Args,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Report, RunError> {
    if let Some(workers) = args.workers.filter(|k| *k > 1) {
        return crate::workers::run(args, workers, interrupt).await;
    }
    let mut interrupt = std::pin::pin!(interrupt);
    let groups = args.groups();
    let fleet = tokio::select! {
        fleet = crate::run::fleet(&args, &groups) => fleet?,
        () = &mut interrupt => return Err(RunError::Config("interrupted while provisioning".into())),
    };
    if args.flap.is_some() {
        return crate::flap::run(args, fleet, interrupt).await;
    }
    match args.scenario {
        Scenario::Telemetry => telemetry::run(args, groups, fleet, interrupt).await,
        Scenario::Connections => connections::held(args, fleet, interrupt).await,
        Scenario::ConnectRate => connections::rate(args, fleet, interrupt).await,
        Scenario::Methods => round_trips::methods(args, fleet, interrupt).await,
        Scenario::Twin => round_trips::twin(args, fleet, interrupt).await,
        Scenario::Storm => storm::run(args, fleet, interrupt).await,
    }
}
