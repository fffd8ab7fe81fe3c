//! The Rust device client for the hub, built on rumqttc.
//!
//! It will speak the device half of the hub's MQTT contract (DESIGN section 2):
//! telemetry acknowledged only once durable, device twins, cloud-to-device messages
//! and direct methods, with reconnects that back off with jitter. The client arrives
//! with its own issue; this crate holds its place in the workspace until then and
//! exports nothing yet.
