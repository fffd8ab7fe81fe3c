//! The hub: a self-hosted IoT device hub speaking Azure IoT Hub's device contract.
//!
//! A map of the crate, following a request from the edge inwards:
//!
//! - [`server`] starts a hub: opens the [`data_dir`] (certificates, owner key), the
//!   store, binds the listeners, prints `hub ready …`, and shuts down gracefully.
//! - [`gateway`] is the device-facing MQTT endpoint: listeners, one session per
//!   connection (a state machine without I/O), device authentication ([`auth`]) and
//!   the topic contract; it hands device traffic to capability services.
//! - [`api`] is the service REST API (axum). Each handler checks its bearer token
//!   ([`auth::service`]) and calls a capability service.
//! - [`registry`] owns device identities (ids, credentials, status, etags) and live
//!   presence; it talks to storage only through its [`registry::RegistryStore`] trait.
//! - [`store`] holds the backends implementing the capability traits: the embedded
//!   redb store (and segment files for telemetry), and in cluster mode
//!   (`--cluster nats://…`) NATS JetStream streams and KV buckets (`store::nats`),
//!   which also carry presence, node heartbeats and the routing of methods and C2D
//!   between hub nodes.
//! - [`config`] is the configuration tree, its defaults and validation.
//!
//! - [`telemetry`] owns the durable partitioned streams behind a log seam (segment
//!   files with group commit, or a JetStream stream): reads by offset,
//!   consumer-group checkpoints, retention.
//!
//! - [`twins`] owns the device twins: documents, merge patch with versions and
//!   metadata, the query language, compare-and-set writes to their store.
//!
//! - [`commands`] owns cloud-to-device queues with feedback and direct methods.

pub mod amqp;
pub mod api;
pub mod auth;
pub mod commands;
pub mod config;
pub mod data_dir;
pub mod gateway;
pub mod registry;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod twins;

pub use config::Config;
pub use server::{ServeError, Server, run};
