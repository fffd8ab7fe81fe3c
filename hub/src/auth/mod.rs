//! Authentication. Devices: SAS tokens ([`sas`]), device JWTs ([`jwt`]) and X.509
//! client certificates ([`x509`]), combined with the registry by
//! [`device::DeviceAuthenticator`]. Services: bearer tokens ([`service`]) and Azure's
//! shared access policies ([`policy`]).

pub mod device;
pub mod jwt;
pub mod policy;
pub mod sas;
pub mod service;
pub mod x509;

/// Seconds since the Unix epoch (0 if the clock is before it): the time base of token
/// expiries (`se`, `exp`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
