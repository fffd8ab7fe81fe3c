//! Storage backends behind the capability traits. [`embedded`] keeps everything in
//! one redb file in the data directory; the NATS JetStream backend (cluster mode)
//! joins it later. Capabilities see traits (e.g. [`crate::registry::RegistryStore`]),
//! never a backend's tables.

pub mod embedded;
pub mod embedded_provisioning;
pub mod embedded_routing;
pub mod embedded_twins;
pub mod nats;
