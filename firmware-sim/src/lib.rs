//! firmware-sim: the fleet simulator and load tool (DESIGN section 5).
//!
//! A run flows through these modules:
//! - [`cli`]: the command line and its value parsers (rates, durations, targets).
//! - [`api`]: the hub's service API — endpoints.json, a service token, idempotent
//!   provisioning of `PREFIX0…PREFIXn`, reading the telemetry stream.
//! - [`run`]: the orchestration — provision, connect at the ramp rate, send for the
//!   duration (or until Ctrl-C), drain, verify, measure CPU — and the live progress.
//! - [`lean`]: the lean publish path, MQTT on rumqttc's packet codec over TCP, with
//!   [`lean::Inflight`] pairing PUBACKs to sends without I/O.
//! - [`sdk`]: the full-behaviour path on device-sdk (twin, methods, C2D).
//! - [`credentials`]: SAS (via device-sdk) and device JWT passwords.
//! - [`scenario`]: device groups from a TOML file (or the one group the flags make),
//!   each with its own rate, payload and behaviour; the report counts per group.
//! - [`template`]: payloads rendered per message and parsed back, with generated
//!   fields from [`generators`] (random walk, sine, counter, timestamp).
//! - [`tls`]: the hub's CA and MQTT-over-TLS address, device certificates for x509.
//! - [`verify`]: counting lost and duplicated messages in the stream.
//! - [`report`]: counters, histograms, CPU from /proc, the text and JSON report.

pub mod api;
pub mod cli;
pub mod credentials;
pub mod generators;
pub mod lean;
pub mod report;
pub mod run;
pub mod scenario;
pub mod sdk;
pub mod template;
pub mod tls;
pub mod verify;
