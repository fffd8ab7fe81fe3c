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
//! - [`store`] holds the backends implementing the capability traits: today the
//!   embedded redb store.
//! - [`config`] is the configuration tree, its defaults and validation.
//!
//! - [`telemetry`] owns the durable partitioned streams: group commit into segment
//!   files, reads by offset, consumer-group checkpoints, retention.
//!
//! - [`twins`] owns the device twins: documents, merge patch with versions and
//!   metadata, the query language, write-behind group commit.
//!
//! - [`commands`] owns cloud-to-device queues with feedback and direct methods.
//!
//! Still to come: cluster mode.

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
