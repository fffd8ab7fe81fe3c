//! firmware-sim: the fleet simulator and load tool (DESIGN section 5).
//!
//! # Layers
//!
//! The modules stand in layers, top to bottom. A module imports only modules of its
//! own layer or below; the modules of one layer do not form an import loop. The
//! `layers` unit test (src/layers.rs) reads the sources and holds the same table.
//!
//! 1. **Command line** — `main.rs` and [`cli`]: parse the flags, apply a scenario
//!    file, refuse bad combinations ([`settings::Args::validate`]), start the run,
//!    print the report.
//! 2. **Scenarios** — what a run measures, and the dispatch to it:
//!    - [`scenarios`]: the scenario checks and the dispatch (`--workers`, else the
//!      fleet, then one scenario); [`scenarios::telemetry`], the default;
//!      [`scenarios::connections`], [`scenarios::round_trips`] and
//!      [`scenarios::storm`].
//!    - [`flap`]: telemetry while devices drop and reconnect (`--flap`).
//!    - [`scenario_file`]: device groups from a TOML file (`--scenario-file`).
//! 3. **Run and fleet** — what every scenario stands on:
//!    - [`run`]: the fleet (provisioned, or from a credentials file), the run id, the
//!      live progress, the run's errors, the empty report a scenario fills.
//!    - [`workers`]: `--workers K` child processes and the merge of their reports.
//!    - [`settings`]: every flag ([`settings::Args`]) and the device groups
//!      ([`settings::Group`]).
//!    - [`api`]: the hub's service API — endpoints.json, a service token, idempotent
//!      provisioning of `PREFIX0…PREFIXn`, reading the telemetry stream.
//!    - [`verify`]: counting lost and duplicated messages in the stream.
//!    - [`provision`]: the fleet registering through the provisioning contract
//!      (`--provision dps`), registrations/s and latency.
//! 4. **Device paths** — one simulated device each:
//!    - [`lean`]: the lean publish path, MQTT on rumqttc's packet codec over TCP, with
//!      [`lean::Inflight`] pairing PUBACKs to sends without I/O.
//!    - [`sdk`]: the full-behaviour path on device-sdk (twin, methods, C2D).
//!    - [`credentials`]: SAS (via device-sdk) and device JWT passwords.
//!    - [`dps`]: one device's registration through the Device Provisioning Service
//!      contract over MQTT (register, poll with `retry-after`, assigned).
//! 5. **Wire and net** — connections and payloads:
//!    - [`device`]: a device's identity on the wire and its connection errors.
//!    - [`wire`]: one MQTT connection on the packet codec, for the scenarios.
//!    - [`net`]: source addresses and bind-before-connect.
//!    - [`tls`]: the hub's CA and MQTT-over-TLS address, device certificates for x509.
//!    - [`template`]: payloads rendered per message and parsed back, with generated
//!      fields from [`generators`] (random walk, sine, counter, timestamp).
//!    - [`probe`]: RSS, machine CPU, CPU marks and the hub sampler, from /proc.
//! 6. **Ground**, beside every layer (any module may use it):
//!    - [`report`]: counters, histograms, CPU from /proc, the report's sections and
//!      the text and JSON report.
//!    - [`values`]: the flags' value types and parsers (rates, durations, auth,
//!      scenario, storm mode, targets).

pub mod api;
pub mod cli;
pub mod credentials;
pub mod device;
pub mod dps;
pub mod flap;
pub mod generators;
#[cfg(test)]
mod layers;
pub mod lean;
pub mod net;
pub mod probe;
pub mod provision;
pub mod report;
pub mod run;
pub mod scenario_file;
pub mod scenarios;
pub mod sdk;
pub mod settings;
pub mod template;
pub mod tls;
pub mod values;
pub mod verify;
pub mod wire;
pub mod workers;
