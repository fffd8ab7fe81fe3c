//! What every run stands on: the fleet (the hub found, devices provisioned or read
//! from a credentials file, each given its login and source address), the run id,
//! the live progress line, why a run could not be made, and the empty report a
//! scenario fills.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::api::{self, Api, ApiError};
use crate::device::Identity;
use crate::report::{Counters, Report};
use crate::settings::{Args, Group};
use crate::values::{Auth, Provision, Scenario, resolve};

/// Why a run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The service API failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The arguments do not describe a usable run.
    #[error("{0}")]
    Config(String),
    /// Not one device connected.
    #[error("no device connected; first failure: {0}")]
    NoneConnected(String),
    /// A device credential could not be made.
    #[error(transparent)]
    Credential(#[from] crate::credentials::CredentialError),
    /// Devices failed to register through the provisioning contract.
    #[error("not every device registered:\n{0}")]
    Registration(String),
}

/// Where devices go and how they authenticate.
pub struct Fleet {
    /// `hub` or `mqtt`.
    pub target: &'static str,
    /// Where devices connect.
    pub mqtt: SocketAddr,
    /// Every device's client id, login, topic and source address.
    pub identities: Vec<Identity>,
    /// TLS setup, when a group connects over TLS.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Device keys (hub targets), for the device-sdk path.
    pub keys: Vec<String>,
    /// The service API (hub targets).
    pub api: Option<Api>,
    /// How the fleet registered (`--provision dps`).
    pub provisioning: Option<crate::report::ProvisioningReport>,
}

/// The fleet, each device given its source address (`--source-addrs`, or automatic).
pub async fn fleet(args: &Args, groups: &[Group]) -> Result<Fleet, RunError> {
    let mut fleet = provisioned_fleet(args, groups).await?;
    let connections = match args.scenario {
        Scenario::ConnectRate => args.total.unwrap_or(u64::from(args.devices)),
        _ => u64::from(args.devices),
    };
    let explicit = args.source_addrs.as_ref().map(|s| s.0.as_slice());
    if let Some(sources) = crate::net::sources(explicit, fleet.mqtt, connections) {
        for (i, identity) in fleet.identities.iter_mut().enumerate() {
            identity.bind = sources.get(i % sources.len()).copied();
        }
    }
    Ok(fleet)
}

/// The fleet of a credentials file (`--credentials`): its first `--devices` entries,
/// no provisioning; the service API only for `--verify`.
async fn file_fleet(args: &Args, path: &std::path::Path) -> Result<Fleet, RunError> {
    let entries = crate::credentials::read_file(path).map_err(RunError::Config)?;
    let wanted = args.devices as usize;
    if entries.len() < wanted {
        return Err(RunError::Config(format!(
            "{} holds {} devices; --devices asks for {wanted}",
            path.display(),
            entries.len()
        )));
    }
    let endpoints = args
        .data_dir
        .as_deref()
        .map(api::read_endpoints)
        .transpose()?;
    let mqtt = mqtt_address(args, endpoints.as_ref(), None)?;
    let api = if args.verify {
        Some(service_api(args, endpoints.as_ref()).await?)
    } else {
        None
    };
    let devices = entries.into_iter().take(wanted).map(|device| {
        let hostname = device.hostname.unwrap_or_else(|| args.hostname.clone());
        (hostname, args.auth, device.id, device.key)
    });
    hub_fleet(mqtt, devices, None, api)
}

/// The MQTT address devices connect to: `--mqtt`, else the data dir's, else
/// `fallback_host`:1883.
fn mqtt_address(
    args: &Args,
    endpoints: Option<&api::Endpoints>,
    fallback_host: Option<&str>,
) -> Result<SocketAddr, RunError> {
    match (&args.mqtt, endpoints.and_then(|e| e.mqtt), fallback_host) {
        (Some(addr), _, _) => resolve(addr).map_err(RunError::Config),
        (None, Some(addr), _) => Ok(addr),
        (None, None, Some(host)) => resolve(&format!("{host}:1883")).map_err(RunError::Config),
        (None, None, None) => Err(RunError::Config("no --mqtt and no --data-dir".into())),
    }
}

/// A hub fleet: each device's login made for its host name with its authentication
/// (hostname, auth, id, key), in fleet order.
fn hub_fleet(
    mqtt: SocketAddr,
    devices: impl ExactSizeIterator<Item = (String, Auth, String, String)>,
    tls: Option<Arc<crate::tls::Tls>>,
    api: Option<Api>,
) -> Result<Fleet, RunError> {
    let mut identities = Vec::with_capacity(devices.len());
    let mut keys = Vec::with_capacity(devices.len());
    for (hostname, auth, id, key) in devices {
        let password = crate::credentials::password(auth, &hostname, &id, &key)?;
        identities.push(Identity::hub_device(&hostname, id, password));
        keys.push(key);
    }
    Ok(Fleet {
        target: "hub",
        mqtt,
        identities,
        keys,
        tls,
        api,
        provisioning: None,
    })
}

/// The hub's service API: `--hub` or the data dir's address, with `--token` or one
/// minted from the data dir.
async fn service_api(args: &Args, endpoints: Option<&api::Endpoints>) -> Result<Api, RunError> {
    let base = match (&args.hub, endpoints) {
        (Some(url), _) => url.clone(),
        (None, Some(endpoints)) => format!("http://{}", endpoints.http),
        (None, None) => return Err(RunError::Config("no --hub and no --data-dir".into())),
    };
    let token = match (&args.token, &args.data_dir) {
        (Some(token), _) => token.clone(),
        (None, Some(dir)) => {
            let scopes = match args.provision {
                Provision::Api => "registry:read,registry:write,service:connect",
                // The group's key is read through the provisioning service API.
                Provision::Dps => "registry:read,registry:write,service:connect,provisioning:read",
            };
            api::mint_token(&api::hub_binary(args.hub_bin.as_deref()), dir, scopes).await?
        }
        (None, None) => return Err(RunError::Config("no --token and no --data-dir".into())),
    };
    Ok(Api::new(&base, token))
}

async fn provisioned_fleet(args: &Args, groups: &[Group]) -> Result<Fleet, RunError> {
    if let Some(path) = &args.credentials {
        return file_fleet(args, path).await;
    }
    let ids: Vec<String> = if args.scenario_groups.is_empty() {
        // The one group of the flags: a `--workers` child's slice starts at
        // `--first-device`, so children never share a device.
        args.device_ids()
    } else {
        groups
            .iter()
            .flat_map(|g| (0..g.devices).map(|i| g.device_id(i)))
            .collect()
    };
    // Each device's group, in fleet order.
    let auths: Vec<_> = groups
        .iter()
        .flat_map(|g| std::iter::repeat_n(g.auth, g.devices as usize))
        .collect();
    if let Some(addr) = args.target {
        let identities = ids
            .into_iter()
            .map(|id| Identity {
                topic: format!("devices/{id}/messages/events/"),
                client_id: id,
                login: None,
                bind: None,
            })
            .collect();
        let tls = match (&args.ca_file, args.tls) {
            (Some(ca_file), true) => Some(
                crate::tls::Tls::trusting(ca_file, addr)
                    .map_err(|err| RunError::Config(err.to_string()))?,
            ),
            _ => None,
        };
        return Ok(Fleet {
            target: "mqtt",
            mqtt: addr,
            identities,
            keys: Vec::new(),
            tls,
            api: None,
            provisioning: None,
        });
    }
    let endpoints = args
        .data_dir
        .as_deref()
        .map(api::read_endpoints)
        .transpose()?;
    let api = service_api(args, endpoints.as_ref()).await?;
    let base = api.base().to_string();
    let host = base
        .split_once("://")
        .map_or(base.as_str(), |(_, rest)| rest)
        .split(['/', ':'])
        .next()
        .unwrap_or("localhost");
    let mqtt = mqtt_address(args, endpoints.as_ref(), Some(host))?;
    if args.provision == Provision::Dps {
        return dps_fleet(args, &ids, &auths, mqtt, api).await;
    }
    let credentials = api
        .provision_as(
            ids.into_iter()
                .zip(&auths)
                .map(|(id, &auth)| (id, auth == Auth::X509))
                .collect(),
        )
        .await?;
    let tls = match (&args.data_dir, groups.iter().any(|g| args.uses_tls(g.auth))) {
        (Some(dir), true) => Some(
            crate::tls::Tls::load(dir, endpoints.and_then(|e| e.mqtts))
                .map_err(|err| RunError::Config(err.to_string()))?,
        ),
        _ => None,
    };
    let devices = credentials
        .into_iter()
        .zip(auths)
        .map(|(device, auth)| (args.hostname.clone(), auth, device.id, device.key));
    hub_fleet(mqtt, devices, tls, Some(api))
}

/// The fleet of `--provision dps`: each device registers through the provisioning
/// contract with its key derived from the group's, then connects as the device id it
/// was assigned, signing for the hub it was assigned.
async fn dps_fleet(
    args: &Args,
    ids: &[String],
    auths: &[Auth],
    mqtt: SocketAddr,
    api: Api,
) -> Result<Fleet, RunError> {
    let group = args
        .group
        .clone()
        .ok_or_else(|| RunError::Config("--provision dps needs --group".into()))?;
    let group_key = match &args.group_key {
        Some(key) => key.clone(),
        None => api.enrollment_group_key(&group).await?,
    };
    let id_scope = match (&args.id_scope, &args.data_dir) {
        (Some(scope), _) => scope.clone(),
        (None, Some(dir)) => {
            let path = dir.join("dps-scope");
            std::fs::read_to_string(&path)
                .map(|text| text.trim().to_string())
                .map_err(|err| RunError::Config(format!("cannot read {}: {err}", path.display())))?
        }
        (None, None) => return Err(RunError::Config("--provision dps needs --id-scope".into())),
    };
    let explicit = args.source_addrs.as_ref().map(|s| s.0.as_slice());
    let sources = crate::net::sources(explicit, mqtt, ids.len() as u64);
    let enrollment = crate::dps::GroupEnrollment {
        id_scope,
        group_key,
    };
    let in_flight = args.connect_inflight as usize;
    let registered =
        crate::provision::register_fleet(mqtt, sources, &group, enrollment, ids, in_flight).await;
    let report = registered.report;
    if report.failed > 0 {
        return Err(RunError::Registration(report.text()));
    }
    let devices: Vec<_> = registered
        .devices
        .into_iter()
        .flatten()
        .zip(auths)
        .map(|(device, &auth)| (device.hub, auth, device.device_id, device.key))
        .collect();
    let mut fleet = hub_fleet(mqtt, devices.into_iter(), None, Some(api))?;
    fleet.provisioning = Some(report);
    Ok(fleet)
}

/// A short id for this run, stamped into every payload so `--verify` reads only
/// this run's messages even when devices are reused.
pub(crate) fn run_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A report with no telemetry in it, for a scenario to fill.
pub fn shell(args: &Args, fleet: &Fleet, run: String) -> Report {
    Report {
        target: fleet.target.to_string(),
        path: "lean".to_string(),
        run,
        devices: u64::from(args.devices),
        connected: 0,
        connect_failed: 0,
        connect_secs: 0.0,
        connect_rate: 0.0,
        qos: args.qos,
        sent: 0,
        acked: 0,
        failed: 0,
        disconnects: 0,
        elapsed_secs: 0.0,
        drain_secs: 0.0,
        msgs_per_sec: 0.0,
        puback_ms: None,
        cpu: None,
        methods: 0,
        twin_reports: 0,
        c2d: 0,
        c2d_received: 0,
        desired: 0,
        desired_acks: 0,
        interrupted: false,
        verify: None,
        seed: 0,
        groups: Vec::new(),
        warmup_secs: 0.0,
        puback_hdr: None,
        scenario: None,
        flap: None,
        workers: None,
        provisioning: fleet.provisioning.clone(),
    }
}

/// The live progress: an indicatif spinner on a terminal, else one line per second
/// on stderr.
pub(crate) struct Progress {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub(crate) fn start(groups: Vec<Arc<Counters>>, devices: u64) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let bar = std::io::stderr().is_terminal().then(|| {
                let bar = indicatif::ProgressBar::new_spinner();
                bar.enable_steady_tick(Duration::from_millis(200));
                bar
            });
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = (0u64, Instant::now());
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let counters = Counters::sum(&groups);
                let done = Counters::get(&counters.acked).max(Counters::get(&counters.sent));
                let rate = (done - last.0) as f64 / last.1.elapsed().as_secs_f64().max(1e-9);
                last = (done, Instant::now());
                let errors = Counters::get(&counters.connect_failed)
                    + Counters::get(&counters.failed)
                    + Counters::get(&counters.disconnects);
                let line = format!(
                    "[{:>4}s] connected {}/{devices}  sent {}  acked {}  {rate:.0} msgs/s  errors {errors}",
                    started.elapsed().as_secs(),
                    Counters::get(&counters.connected),
                    Counters::get(&counters.sent),
                    Counters::get(&counters.acked),
                );
                match &bar {
                    Some(bar) => bar.set_message(line),
                    None => eprintln!("{line}"),
                }
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        });
        Self { stop, task }
    }

    pub(crate) fn finish(self) {
        let _ = self.stop.send(true);
        // The task ends at once; not waiting keeps `finish` synchronous.
        drop(self.task);
    }
}
