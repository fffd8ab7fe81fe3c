//! Authentication. Devices: SAS tokens ([`sas`]), device JWTs ([`jwt`]) and X.509
//! client certificates ([`x509`]), combined with the registry by
//! [`device::DeviceAuthenticator`]. Services: bearer tokens ([`service`]).

pub mod device;
pub mod jwt;
pub mod sas;
pub mod service;
pub mod x509;
