//! Authentication: service tokens for the REST API ([`service`]). Device credentials
//! (SAS, device JWTs, X.509) join here with the MQTT gateway.

pub mod service;
