//! The hub: a self-hosted IoT device hub speaking Azure IoT Hub's device contract.
//!
//! A map of the crate in its rooms (docs/DECISIONS.md "Layers"; `tests/tests/layers.rs`
//! checks that every import runs downwards), following a request from the edge inwards:
//!
//! Composition
//! - [`server`] starts a hub: opens the [`data_dir`] (certificates, owner key), the
//!   store, binds the listeners, wires backends, capabilities and edges, prints
//!   `hub ready …`, and shuts down gracefully.
//!
//! Edges (none imports another)
//! - [`gateway`] is the device-facing MQTT endpoint: listeners, one session per
//!   connection (a state machine without I/O), the topic contract; it authenticates
//!   through [`auth`], hands device traffic to the capabilities' ports and carries
//!   their deliveries ([`delivery::DeviceLinks`]) to devices.
//! - [`api`] is the service REST API (axum). Each handler checks its bearer token
//!   or policy signature ([`auth::service`], [`auth::policy`]) and calls a capability.
//! - [`http`] is what the HTTP-based edges share: the listener loop with its connection
//!   slots and client certificates, the WebSocket byte stream, Azure's error response.
//!
//! Backends
//! - [`store`] holds the backends implementing the capability traits: the embedded
//!   redb store (and segment files for telemetry), and in cluster mode
//!   (`--cluster nats://…`) NATS JetStream streams and KV buckets (`store::nats`),
//!   which also carry presence, node heartbeats and the routing of methods and C2D
//!   between hub nodes.
//!
//! Capabilities (each owns its state, its ports and the types it exchanges with edges)
//! - [`registry`] owns device identities (ids, credentials, status, etags) and live
//!   presence; it talks to storage only through its [`registry::RegistryStore`] trait.
//! - [`auth`] checks device credentials (SAS, JWT, X.509), service tokens and policies.
//! - [`delivery`] is how capabilities reach a connected device: deliveries, the port
//!   that carries them, subscriptions and persisted sessions.
//! - [`telemetry`] owns the durable partitioned streams behind a log seam (segment
//!   files with group commit, or a JetStream stream): ingest, reads by offset,
//!   consumer-group checkpoints, retention.
//! - [`twins`] owns the device twins: documents, merge patch with versions and
//!   metadata, the query language, compare-and-set writes to their store.
//! - [`commands`] owns cloud-to-device queues with feedback and direct methods.
//! - [`provisioning`] owns DPS-style enrollments and registrations: it attests a
//!   registering device, creates its registry device and initial twin, and answers
//!   the provisioning device contract for the MQTT and HTTPS edges.
//! - [`routing`] pushes telemetry and device events (created, deleted, connected,
//!   disconnected, twin changed) to webhooks, NATS subjects and named streams, each
//!   endpoint behind its own durable cursor in the logs.
//!
//! Ground
//! - [`config`] is the configuration tree, its defaults and validation;
//!   [`storage`] the storage error and health ports; [`properties`] a message's
//!   property bag; [`data_dir`] the data directory's files.

pub mod amqp;
pub mod api;
pub mod auth;
pub mod commands;
pub mod config;
pub mod console;
pub mod data_dir;
pub mod delivery;
pub mod gateway;
pub mod http;
pub mod properties;
pub mod provisioning;
pub mod registry;
pub mod routing;
pub mod server;
pub mod storage;
pub mod store;
pub mod telemetry;
pub mod twins;

pub use config::Config;
pub use server::{ServeError, Server, run};
