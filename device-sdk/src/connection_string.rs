//! Azure-style device connection strings:
//! `HostName=…;DeviceId=…;SharedAccessKey=…[;GatewayHostName=…]`.

use crate::Error;

/// A parsed connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// The hub's host name (signed into SAS tokens, checked in the TLS certificate).
    pub host_name: String,
    /// The device id.
    pub device_id: String,
    /// The device's symmetric key, base64.
    pub shared_access_key: String,
    /// Where to connect instead of `host_name`, if given.
    pub gateway_host_name: Option<String>,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("device_id", &self.device_id)
            .field("shared_access_key", &"<redacted>")
            .field("gateway_host_name", &self.gateway_host_name)
            .finish()
    }
}

impl std::str::FromStr for ConnectionString {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let (mut host, mut device, mut key, mut gateway) = (None, None, None, None);
        for field in text.split(';').map(str::trim).filter(|f| !f.is_empty()) {
            let (name, value) = field
                .split_once('=')
                .ok_or_else(|| Error::ConnectionString(format!("{field:?} is not Name=Value")))?;
            match name {
                "HostName" => host = Some(value.to_string()),
                "DeviceId" => device = Some(value.to_string()),
                "SharedAccessKey" => key = Some(value.to_string()),
                "GatewayHostName" => gateway = Some(value.to_string()),
                // ModuleId, x509 … are not supported by this client yet.
                other => {
                    return Err(Error::ConnectionString(format!(
                        "unsupported field {other}"
                    )));
                }
            }
        }
        let missing = |what: &str| Error::ConnectionString(format!("{what} is missing"));
        Ok(Self {
            host_name: host.ok_or_else(|| missing("HostName"))?,
            device_id: device.ok_or_else(|| missing("DeviceId"))?,
            shared_access_key: key.ok_or_else(|| missing("SharedAccessKey"))?,
            gateway_host_name: gateway,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_field_and_refuses_what_is_missing() {
        let cs: ConnectionString =
            "HostName=hub.local;DeviceId=d1;SharedAccessKey=a2V5;GatewayHostName=10.0.0.5"
                .parse()
                .unwrap();
        assert_eq!(cs.host_name, "hub.local");
        assert_eq!(cs.device_id, "d1");
        assert_eq!(cs.shared_access_key, "a2V5");
        assert_eq!(cs.gateway_host_name.as_deref(), Some("10.0.0.5"));
        assert!(
            !format!("{cs:?}").contains("a2V5"),
            "the key is never printed"
        );
        assert!("HostName=h;DeviceId=d".parse::<ConnectionString>().is_err());
        assert!(
            "HostName=h;DeviceId=d;SharedAccessKey=k;ModuleId=m"
                .parse::<ConnectionString>()
                .is_err()
        );
        assert!("garbage".parse::<ConnectionString>().is_err());
    }
}
