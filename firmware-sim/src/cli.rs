//! The command line (DESIGN section 5): the checks that need more than one flag, in
//! [`Args::validate`], so every bad combination is refused before anything connects.
//! The flags themselves are [`crate::settings::Args`]; their value types and parsers
//! are [`crate::values`]'s.

use crate::settings::Args;
use crate::values::{Auth, Provision, Scenario};

impl Args {
    /// Checks the combinations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.target.is_some() && self.verify {
            return Err("--verify reads the stream through the hub's service API; a plain MQTT --target has none".into());
        }
        if self.target.is_some() && self.uses_sdk() {
            return Err("--sdk, --twin-every and the method flags need the hub's twin and method topics; a plain MQTT --target has none".into());
        }
        if self.target.is_some() && self.groups().iter().any(|g| g.auth == Auth::X509) {
            return Err("--auth x509 needs the hub's CA key to issue device certificates; a plain MQTT --target has none".into());
        }
        if self.target.is_some() && self.tls && self.ca_file.is_none() {
            return Err("--tls with a plain MQTT --target needs --ca-file: the CA its certificate chains to".into());
        }
        // Devices from a file need the service API only to read telemetry back.
        let needs_api = self.target.is_none() && (self.credentials.is_none() || self.verify);
        if self.credentials.is_some() && self.mqtt.is_none() && self.data_dir.is_none() {
            return Err("--credentials needs to know where devices connect: --mqtt HOST:PORT or --data-dir DIR".into());
        }
        if self.credentials.is_some() && (self.tls || self.auth == Auth::X509) {
            return Err(
                "--credentials holds symmetric keys for plain MQTT: drop --tls and --auth x509"
                    .into(),
            );
        }
        if needs_api && self.hub.is_none() && self.data_dir.is_none() {
            return Err("say where the hub is: --hub URL or --data-dir DIR (or --target mqtt://HOST:PORT for a plain broker)".into());
        }
        if needs_api && self.token.is_none() && self.data_dir.is_none() {
            return Err("the service API needs a token: --token TOKEN, or --data-dir DIR to mint one with `hub token`".into());
        }
        if self.prefix.is_empty() {
            return Err("--prefix must not be empty".into());
        }
        let x509 = self.groups().iter().any(|g| g.auth == Auth::X509);
        if (self.tls || x509) && self.data_dir.is_none() && self.target.is_none() {
            return Err("--tls and --auth x509 need --data-dir DIR: the hub's CA (DIR/certs) and its mqtts address".into());
        }
        if self.scenario_file.is_some() {
            if self.scenario != Scenario::Telemetry || self.flap.is_some() {
                return Err("--scenario-file describes telemetry device groups; it does not combine with another --scenario or --flap".into());
            }
            if self.workers.is_some_and(|k| k > 1) {
                return Err("--scenario-file runs in one process; drop --workers".into());
            }
        }
        self.validate_provision()?;
        // Per group: with no scenario file, the one group made of the flags.
        crate::scenario_file::validate_groups(self, &self.groups())?;
        crate::scenarios::validate(self)
    }
}

impl Args {
    /// `--provision dps` and its flags.
    fn validate_provision(&self) -> Result<(), String> {
        let dps = self.provision == Provision::Dps;
        if !dps {
            if self.group.is_some() || self.group_key.is_some() || self.id_scope.is_some() {
                return Err("--group, --group-key and --id-scope belong to --provision dps".into());
            }
            return Ok(());
        }
        if self.group.is_none() {
            return Err("--provision dps needs --group NAME: the enrollment group the devices register under".into());
        }
        if self.target.is_some() || self.credentials.is_some() || self.scenario_file.is_some() {
            return Err("--provision dps registers the fleet with the hub itself; it does not combine with --target, --credentials or --scenario-file".into());
        }
        if self.workers.is_some_and(|k| k > 1) {
            return Err(
                "--provision dps registers the fleet from one process; drop --workers".into(),
            );
        }
        if self.auth == Auth::X509 || self.tls {
            return Err("--provision dps registers with group-derived symmetric keys over MQTT/TCP; drop --auth x509 and --tls".into());
        }
        if self.id_scope.is_none() && self.data_dir.is_none() {
            return Err("--provision dps needs the ID scope: --id-scope SCOPE or --data-dir DIR (DIR/dps-scope)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Result<Args, String> {
        let argv = std::iter::once("firmware-sim").chain(extra.iter().copied());
        let args = Args::try_parse_from(argv).map_err(|err| err.to_string())?;
        args.validate()?;
        Ok(args)
    }

    #[test]
    fn bad_combinations_are_refused_with_a_reason() {
        assert!(args(&["--target", "mqtt://127.0.0.1:1883"]).is_ok());
        let err = args(&["--target", "mqtt://127.0.0.1:1883", "--verify"]).unwrap_err();
        assert!(err.contains("--verify"), "{err}");
        let err = args(&["--devices", "5"]).unwrap_err();
        assert!(err.contains("--hub"), "{err}");
        let err = args(&["--hub", "http://127.0.0.1:1"]).unwrap_err();
        assert!(err.contains("token"), "{err}");
        assert!(args(&["--hub", "http://x", "--token", "t", "--qos", "2"]).is_err());
        assert!(args(&["--hub", "http://x", "--token", "t", "--devices", "0"]).is_err());
        let err = args(&[
            "--hub",
            "http://x",
            "--token",
            "t",
            "--payload",
            "{\"v\":1}",
            "--verify",
        ])
        .unwrap_err();
        assert!(err.contains("{seq}"), "{err}");
        assert!(args(&["--hub", "http://x", "--token", "t", "--twin-every", "5s"]).is_ok());
    }

    #[test]
    fn dps_provisioning_needs_a_group_and_a_scope() {
        let hub = ["--hub", "http://x", "--token", "t"];
        let with = |extra: &[&str]| args(&[&hub[..], extra].concat());
        assert!(with(&["--provision", "dps", "--group", "g", "--id-scope", "0ne1"]).is_ok());
        let dps = ["--provision", "dps", "--group", "g", "--id-scope", "s"];
        for (extra, named) in [
            (&["--provision", "dps", "--id-scope", "s"][..], "--group"),
            (&["--provision", "dps", "--group", "g"][..], "--id-scope"),
            (&["--group", "g"][..], "--provision dps"),
            (&[&dps[..], &["--workers", "2"]].concat()[..], "--workers"),
            (&[&dps[..], &["--auth", "x509"]].concat()[..], "x509"),
        ] {
            let err = with(extra).unwrap_err();
            assert!(err.contains(named), "{extra:?}: {err}");
        }
    }
}
