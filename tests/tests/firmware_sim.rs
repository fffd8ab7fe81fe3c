//! firmware-sim end to end, running the built binary: a small fleet against a real
//! hub gets every message acknowledged and read back exactly once (and a second run
//! reuses the devices); the same load runs against a real Mosquitto; bad arguments
//! fail with a message; Ctrl-C ends a run with a partial report. The scenarios each
//! get a small bounded run against a real hub with their counts checked: connections
//! held and the connect rate, method and twin round trips, the connect storm (dropped
//! by the devices, and after a hub restart), `--flap`, and `--workers` (merged
//! counters and histograms, and Ctrl-C through the parent).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hub_tests::{Hub, firmware_sim_binary};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long one simulator run may take beyond its `--duration`.
const RUN_SLACK: Duration = Duration::from_secs(60);

fn sim() -> Result<Command> {
    let mut command = Command::new(firmware_sim_binary()?);
    command
        .env_remove("FIRMWARE_SIM_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Ok(command)
}

/// Runs firmware-sim to completion; returns (exit success, stdout, stderr).
async fn run_sim(args: &[&str]) -> Result<(bool, String, String)> {
    let output = tokio::time::timeout(RUN_SLACK, sim()?.args(args).output())
        .await
        .context("firmware-sim did not finish in time")??;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// Runs firmware-sim with `--json` and returns the report.
async fn report(args: &[&str]) -> Result<Value> {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, stdout, stderr) = run_sim(&all).await?;
    ensure!(ok, "firmware-sim failed:\n{stderr}");
    serde_json::from_str(&stdout)
        .with_context(|| format!("the report is not JSON:\n{stdout}\nstderr:\n{stderr}"))
}

fn n(report: &Value, key: &str) -> u64 {
    report[key].as_u64().unwrap_or(u64::MAX)
}

#[tokio::test]
async fn a_small_fleet_gets_every_message_acked_and_read_back_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    let pid = hub.pid().context("hub pid")?.to_string();
    let first = report(&[
        "--data-dir",
        &data_dir,
        "--devices",
        "50",
        "--duration",
        "5s",
        "--rate",
        "20",
        "--qos",
        "1",
        "--verify",
        "--hub-pid",
        &pid,
    ])
    .await?;
    assert_eq!(n(&first, "connected"), 50, "{first:#}");
    assert_eq!(n(&first, "connect_failed"), 0, "{first:#}");
    let sent = n(&first, "sent");
    assert!(
        sent > 1000,
        "50 devices × 20/s × 5 s sent only {sent}: {first:#}"
    );
    assert_eq!(n(&first, "acked"), sent, "{first:#}");
    assert_eq!(n(&first, "failed"), 0, "{first:#}");
    assert_eq!(
        first["puback_ms"]["count"].as_u64(),
        Some(sent),
        "{first:#}"
    );
    let verify = &first["verify"];
    assert_eq!(verify["lost"].as_u64(), Some(0), "{first:#}");
    assert_eq!(verify["duplicated"].as_u64(), Some(0), "{first:#}");
    assert_eq!(verify["read"].as_u64(), Some(sent), "{first:#}");
    assert_eq!(verify["distinct"].as_u64(), Some(sent), "{first:#}");
    assert_eq!(verify["unexpected"].as_u64(), Some(0), "{first:#}");
    assert_eq!(verify["unacked_read"].as_u64(), Some(0), "{first:#}");
    assert!(verify["end_to_end_ms"]["p50"].is_number(), "{first:#}");
    assert!(
        first["cpu"]["hub_secs"].as_f64().is_some_and(|s| s > 0.0),
        "{first:#}"
    );

    // A second run reuses the 50 devices (their keys come back from the registry),
    // connects with device JWTs this time, and verifies only its own messages,
    // although the stream holds the first run's too.
    let second = report(&[
        "--data-dir",
        &data_dir,
        "--devices",
        "50",
        "--duration",
        "1s",
        "--rate",
        "max",
        "--inflight",
        "4",
        "--auth",
        "jwt",
        "--verify",
    ])
    .await?;
    assert_eq!(n(&second, "connected"), 50, "{second:#}");
    assert_ne!(second["run"], first["run"]);
    let sent = n(&second, "sent");
    assert!(sent > 0 && n(&second, "acked") == sent, "{second:#}");
    assert_eq!(second["verify"]["read"].as_u64(), Some(sent), "{second:#}");
    assert_eq!(second["verify"]["lost"].as_u64(), Some(0), "{second:#}");
    assert_eq!(
        second["verify"]["duplicated"].as_u64(),
        Some(0),
        "{second:#}"
    );

    // QoS 0: nothing is acknowledged, every message written is read back, and the
    // closing QoS 1 fence each device sends (to time the run up to where the hub had
    // taken everything in) is neither counted nor taken for one of the run's.
    let third = report(&[
        "--data-dir",
        &data_dir,
        "--devices",
        "10",
        "--duration",
        "1s",
        "--rate",
        "max",
        "--qos",
        "0",
        "--verify",
    ])
    .await?;
    let sent = n(&third, "sent");
    assert!(sent > 0, "{third:#}");
    assert_eq!(n(&third, "acked"), 0, "{third:#}");
    assert_eq!(n(&third, "failed"), 0, "{third:#}");
    assert_eq!(third["verify"]["read"].as_u64(), Some(sent), "{third:#}");
    assert_eq!(third["verify"]["lost"].as_u64(), Some(0), "{third:#}");
    assert_eq!(third["verify"]["unexpected"].as_u64(), Some(0), "{third:#}");
    assert!(
        third["elapsed_secs"].as_f64().is_some_and(|s| s >= 1.0),
        "the rate window runs at least the sending second: {third:#}"
    );
    Ok(())
}

/// A Mosquitto broker on a free loopback port, stopped when dropped.
struct Mosquitto {
    _child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    /// A TLS broker's CA and server certificate.
    _certs: Option<tempfile::TempDir>,
}

fn mosquitto_binary() -> Result<PathBuf> {
    let path = std::env::var_os("MOSQUITTO_BIN")
        .map_or_else(|| PathBuf::from("/usr/sbin/mosquitto"), PathBuf::from);
    if !Path::new(&path).exists() {
        bail!(
            "no Mosquitto at {}: `apt-get install mosquitto` (the plain-MQTT comparison \
             needs a real broker), or set MOSQUITTO_BIN",
            path.display()
        );
    }
    Ok(path)
}

impl Mosquitto {
    async fn start() -> Result<Self> {
        Self::start_with("").await
    }

    /// Mosquitto with a TLS listener: a server certificate for `localhost` from a CA
    /// made here, whose certificate is `dir/ca.pem` (what clients trust).
    async fn start_tls() -> Result<Self> {
        let ca = certs::Ca::generate("firmware-sim test CA")?;
        let server = ca.issue_server(&certs::SubjectAltNames::for_hub(
            "localhost",
            [std::net::IpAddr::from([127, 0, 0, 1])],
        ))?;
        let certs_dir = tempfile::tempdir()?;
        ca.write(certs_dir.path(), "ca")?;
        server.write(certs_dir.path(), "server")?;
        let path = |name: &str| certs_dir.path().join(name).display().to_string();
        // `user root`: Mosquitto reads the key after dropping to its own user, and the
        // key is private to this one.
        let mut broker = Self::start_with(&format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nuser root\n",
            path("ca.pem"),
            path("server.pem"),
            path("server.key"),
        ))
        .await?;
        broker._certs = Some(certs_dir);
        Ok(broker)
    }

    /// Mosquitto with `listener_options` under its one listener.
    async fn start_with(listener_options: &str) -> Result<Self> {
        let binary = mosquitto_binary()?;
        let dir = tempfile::tempdir()?;
        // Mosquitto cannot be told to pick a port itself: take a free one from the
        // kernel and hand it over (another process could grab it in between; the
        // readiness poll below then fails loudly rather than testing the wrong thing).
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\n{listener_options}allow_anonymous true\npersistence false\n"
            ),
        )?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start mosquitto")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            ensure!(
                Instant::now() < deadline,
                "mosquitto is not listening on {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            _child: child,
            port,
            _dir: dir,
            _certs: None,
        })
    }

    /// The CA certificate of a TLS broker.
    fn ca_file(&self) -> Option<PathBuf> {
        self._certs.as_ref().map(|dir| dir.path().join("ca.pem"))
    }
}

#[tokio::test]
async fn the_same_load_runs_against_a_plain_mqtt_broker() -> Result<()> {
    let broker = Mosquitto::start().await?;
    let target = format!("mqtt://127.0.0.1:{}", broker.port);
    let qos1 = report(&[
        "--target",
        &target,
        "--devices",
        "20",
        "--duration",
        "2s",
        "--rate",
        "max",
    ])
    .await?;
    assert_eq!(qos1["target"], "mqtt");
    assert_eq!(n(&qos1, "connected"), 20, "{qos1:#}");
    let sent = n(&qos1, "sent");
    assert!(sent > 0, "{qos1:#}");
    assert_eq!(n(&qos1, "acked"), sent, "{qos1:#}");
    assert_eq!(n(&qos1, "failed"), 0, "{qos1:#}");
    assert!(qos1["puback_ms"]["p99"].is_number(), "{qos1:#}");

    let qos0 = report(&[
        "--target",
        &target,
        "--devices",
        "5",
        "--duration",
        "1s",
        "--rate",
        "50",
        "--qos",
        "0",
    ])
    .await?;
    assert!(n(&qos0, "sent") > 0, "{qos0:#}");
    assert_eq!(n(&qos0, "acked"), 0, "QoS 0 has no PUBACK: {qos0:#}");
    assert_eq!(n(&qos0, "failed"), 0, "{qos0:#}");
    Ok(())
}

#[tokio::test]
async fn the_same_load_runs_against_a_plain_broker_over_tls() -> Result<()> {
    let broker = Mosquitto::start_tls().await?;
    let target = format!("mqtt://127.0.0.1:{}", broker.port);
    let ca_file = broker.ca_file().context("a TLS broker has a CA")?;
    let ca_file = ca_file.to_string_lossy().into_owned();
    let tls = report(&[
        "--target",
        &target,
        "--tls",
        "--ca-file",
        &ca_file,
        "--devices",
        "10",
        "--duration",
        "2s",
        "--rate",
        "max",
    ])
    .await?;
    assert_eq!(tls["target"], "mqtt", "{tls:#}");
    assert_eq!(tls["path"], "lean", "{tls:#}");
    assert_eq!(n(&tls, "connected"), 10, "{tls:#}");
    let sent = n(&tls, "sent");
    assert!(sent > 0, "{tls:#}");
    assert_eq!(n(&tls, "acked"), sent, "{tls:#}");
    assert_eq!(n(&tls, "failed"), 0, "{tls:#}");
    // Without --tls the same port speaks TLS to a plain client: nobody connects.
    let (ok, _, stderr) = run_sim(&[
        "--target",
        &target,
        "--devices",
        "1",
        "--duration",
        "1s",
        "--json",
    ])
    .await?;
    ensure!(!ok, "a plain client connected to a TLS listener: {stderr}");
    Ok(())
}

#[tokio::test]
async fn invalid_arguments_fail_with_a_message() -> Result<()> {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--target", "mqtt://127.0.0.1:1", "--devices", "0"],
            "--devices",
        ),
        (&["--target", "mqtt://127.0.0.1:1", "--qos", "2"], "--qos"),
        (&["--target", "mqtt://127.0.0.1:1", "--rate", "fast"], "max"),
        (
            &["--target", "mqtt://127.0.0.1:1", "--duration", "soon"],
            "duration",
        ),
        (&["--target", "http://127.0.0.1:1"], "mqtt://"),
        (&["--target", "mqtt://127.0.0.1:1", "--verify"], "--verify"),
        (&["--devices", "3"], "--hub"),
        (&["--hub", "http://127.0.0.1:1"], "token"),
        (
            &["--target", "mqtt://127.0.0.1:1", "--payload", "{oops}"],
            "placeholder",
        ),
        (&["--no-such-flag"], "--no-such-flag"),
    ];
    for (args, needle) in cases {
        let (ok, stdout, stderr) = run_sim(args).await?;
        assert!(!ok, "{args:?} succeeded:\n{stdout}");
        assert!(
            stderr.contains(needle),
            "{args:?}: the error does not mention {needle}:\n{stderr}"
        );
    }
    // Valid arguments but nobody listening: a clear error, non-zero exit.
    let (ok, _, stderr) = run_sim(&["--target", "mqtt://127.0.0.1:1", "--duration", "1s"]).await?;
    assert!(!ok);
    assert!(stderr.contains("no device connected"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn ctrl_c_ends_a_run_with_a_partial_report() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    // This run finds the hub by URL and token, without its data dir.
    let token = hub.owner_token().await?;
    let mqtt = hub.endpoint("mqtt").context("mqtt endpoint")?.to_string();
    let mut child = sim()?
        .args([
            "--hub",
            &hub.url(),
            "--token",
            &token,
            "--mqtt",
            &mqtt,
            "--devices",
            "10",
            "--duration",
            "120s",
            "--rate",
            "max",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // The progress line (one a second, stderr is not a terminal) says when messages
    // flow.
    wait_for_progress(&mut child, Duration::from_secs(30), |line| {
        line.contains("connected 10/10") && !line.contains(" acked 0 ")
    })
    .await?;
    let output = interrupt(child, Duration::from_secs(30)).await?;
    assert!(output.status.success(), "{:?}", output.status);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(&stdout)
        .with_context(|| format!("the partial report is not JSON:\n{stdout}"))?;
    assert_eq!(report["interrupted"], true, "{report:#}");
    let sent = n(&report, "sent");
    assert!(sent > 0, "{report:#}");
    assert_eq!(
        n(&report, "acked") + n(&report, "failed"),
        sent,
        "{report:#}"
    );
    assert!(
        report["elapsed_secs"].as_f64().is_some_and(|s| s < 60.0),
        "{report:#}"
    );
    Ok(())
}

#[tokio::test]
async fn sdk_devices_report_twins_answer_methods_and_complete_c2d() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    let mut child = sim()?
        .args([
            "--data-dir",
            &data_dir,
            "--devices",
            "3",
            "--prefix",
            "fw-",
            "--duration",
            "6s",
            "--rate",
            "10",
            "--twin-every",
            "500ms",
            "--method-delay-ms",
            "20",
            "--verify",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_for_progress(&mut child, Duration::from_secs(30), |line| {
        line.contains("connected 3/3")
    })
    .await?;

    let answer: Value = hub
        .http()
        .post(format!("{}/twins/fw-0/methods", hub.url()))
        .bearer_auth(&token)
        .json(&serde_json::json!({
            "methodName": "reboot",
            "payload": {"delay": 1},
            "responseTimeoutInSeconds": 10,
            "connectTimeoutInSeconds": 10
        }))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["payload"]["method"], "reboot", "{answer}");
    assert_eq!(answer["payload"]["payload"]["delay"], 1, "{answer}");
    let queued = hub
        .http()
        .post(format!("{}/devices/fw-1/messages/deviceBound", hub.url()))
        .bearer_auth(&token)
        .json(&serde_json::json!({"body": "hello"}))
        .send()
        .await?;
    ensure!(queued.status().is_success(), "C2D: {}", queued.status());

    let output = tokio::time::timeout(RUN_SLACK, child.wait_with_output())
        .await
        .context("firmware-sim did not finish")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(output.status.success(), "firmware-sim failed:\n{stdout}");
    let report: Value = serde_json::from_str(&stdout)
        .with_context(|| format!("the report is not JSON:\n{stdout}"))?;
    assert_eq!(report["path"], "sdk", "{report:#}");
    assert_eq!(n(&report, "methods"), 1, "{report:#}");
    assert_eq!(n(&report, "c2d"), 1, "{report:#}");
    assert!(n(&report, "twin_reports") >= 3, "{report:#}");
    let sent = n(&report, "sent");
    assert!(sent > 0 && n(&report, "acked") == sent, "{report:#}");
    assert_eq!(report["verify"]["lost"].as_u64(), Some(0), "{report:#}");
    assert_eq!(
        report["verify"]["duplicated"].as_u64(),
        Some(0),
        "{report:#}"
    );

    let twin: Value = hub.get_json(&token, "/twins/fw-2").await?;
    assert!(
        twin["properties"]["reported"]["simulator"]["reports"]
            .as_u64()
            .is_some_and(|r| r >= 1),
        "{twin:#}"
    );
    Ok(())
}

fn f(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

#[tokio::test]
async fn connections_are_held_and_handshakes_counted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    let pid = hub.pid().context("hub pid")?.to_string();
    let held = report(&[
        "--data-dir",
        &data_dir,
        "--scenario",
        "connections",
        "--devices",
        "30",
        "--hold",
        "1s",
        "--hub-pid",
        &pid,
    ])
    .await?;
    let s = &held["scenario"];
    assert_eq!(s["name"], "connections", "{held:#}");
    assert_eq!(s["held"]["held"].as_u64(), Some(30), "{held:#}");
    assert_eq!(s["held"]["open_after_hold"].as_u64(), Some(30), "{held:#}");
    assert_eq!(s["handshakes"]["ok"].as_u64(), Some(30), "{held:#}");
    assert_eq!(s["handshakes"]["failed"].as_u64(), Some(0), "{held:#}");
    assert_eq!(s["handshakes"]["latency_ms"]["count"].as_u64(), Some(30));
    let rss = |key: &str| s["held"][key].as_u64().unwrap_or(0);
    assert!(rss("hub_rss_before_kib") > 0, "{held:#}");
    assert!(
        rss("hub_rss_end_kib") > 0 && rss("hub_rss_held_kib") > 0,
        "{held:#}"
    );
    assert!(f(&s["held"]["hold_secs"]) >= 1.0, "{held:#}");

    let rate = report(&[
        "--data-dir",
        &data_dir,
        "--scenario",
        "connect-rate",
        "--devices",
        "30",
        "--total",
        "200",
        "--connect-inflight",
        "20",
        "--hub-pid",
        &pid,
    ])
    .await?;
    let h = &rate["scenario"]["handshakes"];
    assert_eq!(h["attempted"].as_u64(), Some(200), "{rate:#}");
    assert_eq!(h["ok"].as_u64(), Some(200), "{rate:#}");
    assert_eq!(h["failed"].as_u64(), Some(0), "{rate:#}");
    assert_eq!(h["in_flight"].as_u64(), Some(20), "{rate:#}");
    assert_eq!(h["latency_ms"]["count"].as_u64(), Some(200), "{rate:#}");
    assert!(f(&h["per_sec"]) > 0.0, "{rate:#}");
    assert!(h["hdr"].is_string(), "{rate:#}");
    let cpu = &rate["scenario"]["cpu"];
    assert!(f(&cpu["hub_secs"]) > 0.0, "{rate:#}");
    assert!(f(&cpu["machine_secs"]) >= f(&cpu["hub_secs"]), "{rate:#}");
    Ok(())
}

#[tokio::test]
async fn method_round_trips_are_all_answered() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let _hub = Hub::start(dir.path()).await?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    let methods = report(&[
        "--data-dir",
        &data_dir,
        "--scenario",
        "methods",
        "--devices",
        "5",
        "--inflight",
        "2",
        "--warmup",
        "500ms",
        "--duration",
        "1s",
    ])
    .await?;
    let r = &methods["scenario"]["round_trips"];
    let sent = r["sent"].as_u64().unwrap_or(0);
    assert!(sent > 10, "{methods:#}");
    assert_eq!(r["answered"].as_u64(), Some(sent), "{methods:#}");
    assert_eq!(r["failed"].as_u64(), Some(0), "{methods:#}");
    // Every call reached a device, which answered it, and no device answered more.
    assert_eq!(r["device_answered"].as_u64(), Some(sent), "{methods:#}");
    let measured = r["measured"].as_u64().unwrap_or(0);
    assert!(
        measured > 0 && measured < sent,
        "warm-up calls are not measured: {methods:#}"
    );
    assert_eq!(
        r["latency_ms"]["count"].as_u64(),
        Some(measured),
        "{methods:#}"
    );
    assert_eq!(n(&methods, "connected"), 5, "{methods:#}");
    Ok(())
}

#[tokio::test]
async fn twin_reported_patches_round_trip() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    let twin = report(&[
        "--data-dir",
        &data_dir,
        "--scenario",
        "twin",
        "--prefix",
        "tw-",
        "--devices",
        "4",
        "--inflight",
        "2",
        "--duration",
        "1s",
    ])
    .await?;
    let r = &twin["scenario"]["round_trips"];
    let sent = r["sent"].as_u64().unwrap_or(0);
    assert!(sent > 10, "{twin:#}");
    assert_eq!(r["answered"].as_u64(), Some(sent), "{twin:#}");
    assert_eq!(r["failed"].as_u64(), Some(0), "{twin:#}");
    // Answers within the window are the samples; those to the last patches, after
    // it, are counted but not measured.
    let measured = r["measured"].as_u64().unwrap_or(0);
    assert!(measured > 0 && measured <= sent, "{twin:#}");
    assert_eq!(
        r["latency_ms"]["count"].as_u64(),
        Some(measured),
        "{twin:#}"
    );
    // The last patch a device sent is its reported state.
    let stored: Value = hub.get_json(&token, "/twins/tw-3").await?;
    assert!(
        stored["properties"]["reported"]["simulator"]["patch"]
            .as_u64()
            .is_some_and(|p| p >= 1),
        "{stored:#}"
    );
    Ok(())
}

#[tokio::test]
async fn a_connect_storm_gets_every_device_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    let pid = hub.pid().context("hub pid")?.to_string();
    let storm = report(&[
        "--data-dir",
        &data_dir,
        "--scenario",
        "storm",
        "--devices",
        "40",
        "--duration",
        "30s",
        "--hub-pid",
        &pid,
    ])
    .await?;
    let s = &storm["scenario"]["storm"];
    assert_eq!(s["connected_before"].as_u64(), Some(40), "{storm:#}");
    assert_eq!(s["back"].as_u64(), Some(40), "{storm:#}");
    let secs = f(&s["secs_to_all_back"]);
    assert!(secs > 0.0 && secs < 30.0, "{storm:#}");
    let attempts = s["reconnect_attempts"].as_u64().unwrap_or(0);
    assert_eq!(
        attempts,
        40 + s["reconnect_failed"].as_u64().unwrap_or(u64::MAX),
        "one successful attempt per device: {storm:#}"
    );
    assert!(
        s["hub"]["samples"].as_u64().is_some_and(|n| n >= 1),
        "{storm:#}"
    );
    assert!(
        s["hub"]["rss_peak_kib"].as_u64().is_some_and(|k| k > 0),
        "{storm:#}"
    );
    Ok(())
}

#[tokio::test]
async fn flapping_devices_reconnect_and_keep_their_counts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let _hub = Hub::start(dir.path()).await?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    let flap = report(&[
        "--data-dir",
        &data_dir,
        "--flap",
        "0.5",
        "--devices",
        "10",
        "--rate",
        "20",
        "--duration",
        "3s",
    ])
    .await?;
    let sent = n(&flap, "sent");
    assert!(sent > 100, "{flap:#}");
    assert_eq!(n(&flap, "acked") + n(&flap, "failed"), sent, "{flap:#}");
    assert_eq!(flap["puback_ms"]["count"].as_u64(), Some(n(&flap, "acked")));
    let drops = flap["flap"]["drops"].as_u64().unwrap_or(0);
    // 10 devices × ~3 tosses at P = 0.5: no drop at all has odds below 1 in 10^9.
    assert!(drops > 0, "{flap:#}");
    assert_eq!(flap["flap"]["reconnects"].as_u64(), Some(drops), "{flap:#}");
    assert_eq!(flap["flap"]["not_back"].as_u64(), Some(0), "{flap:#}");
    assert_eq!(n(&flap, "disconnects"), 0, "{flap:#}");
    Ok(())
}

#[tokio::test]
async fn workers_split_the_fleet_and_merge_their_reports() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    let merged = report(&[
        "--data-dir",
        &data_dir,
        "--workers",
        "2",
        "--source-addrs",
        "127.0.0.2-127.0.0.3",
        "--devices",
        "20",
        "--rate",
        "20",
        "--duration",
        "2s",
    ])
    .await?;
    assert_eq!(merged["workers"].as_u64(), Some(2), "{merged:#}");
    assert_eq!(n(&merged, "devices"), 20, "{merged:#}");
    assert_eq!(n(&merged, "connected"), 20, "{merged:#}");
    assert_eq!(n(&merged, "disconnects"), 0, "{merged:#}");
    // Each child took its own slice of the fleet: 20 devices, none shared (a shared
    // one would have its other connection taken over).
    let token = hub.owner_token().await?;
    let devices: Value = hub.get_json(&token, "/devices?top=1000").await?;
    let ids: std::collections::BTreeSet<&str> = devices
        .as_array()
        .context("a device list")?
        .iter()
        .filter_map(|d| d["deviceId"].as_str())
        .collect();
    assert_eq!(ids.len(), 20, "{ids:?}");
    let sent = n(&merged, "sent");
    assert!(sent > 200, "{merged:#}");
    assert_eq!(n(&merged, "acked"), sent, "{merged:#}");
    assert_eq!(n(&merged, "failed"), 0, "{merged:#}");
    // The merged histogram holds every child's samples, not an average of percentiles.
    assert_eq!(
        merged["puback_ms"]["count"].as_u64(),
        Some(sent),
        "{merged:#}"
    );
    assert_eq!(
        merged["run"].as_str().map(|r| r.split('+').count()),
        Some(2)
    );

    // The same 20 devices (the children provisioned disjoint halves) in a
    // connect-rate run over two workers: the handshakes are shared out and add up.
    let rate = report(&[
        "--data-dir",
        &data_dir,
        "--workers",
        "2",
        "--scenario",
        "connect-rate",
        "--devices",
        "20",
        "--total",
        "100",
    ])
    .await?;
    let h = &rate["scenario"]["handshakes"];
    assert_eq!(h["ok"].as_u64(), Some(100), "{rate:#}");
    assert_eq!(h["latency_ms"]["count"].as_u64(), Some(100), "{rate:#}");
    Ok(())
}

#[tokio::test]
async fn a_storm_after_a_hub_restart_gets_every_device_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Devices must find the restarted hub where they left it: a fixed MQTT port (taken
    // from the kernel, then handed over; the restart reuses it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mqtt = format!("127.0.0.1:{port}");
    let first = hub_tests::HubOptions::new(dir.path())
        .mqtt(&mqtt)
        .start()
        .await?;
    let pid_file = dir.path().join("hub.pid");
    std::fs::write(&pid_file, first.pid().context("hub pid")?.to_string())?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    let mut child = sim()?
        .args([
            "--data-dir",
            &data_dir,
            "--scenario",
            "storm",
            "--storm",
            "restart",
            "--devices",
            "20",
            "--duration",
            "60s",
            "--hub-pid-file",
            &pid_file.to_string_lossy(),
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_for_progress(&mut child, Duration::from_secs(30), |line| {
        line.contains("waiting for the hub to drop them")
    })
    .await?;

    first.stop().await?;
    let second = hub_tests::HubOptions::new(dir.path())
        .mqtt(&mqtt)
        .start()
        .await?;
    std::fs::write(&pid_file, second.pid().context("hub pid")?.to_string())?;
    let output = tokio::time::timeout(RUN_SLACK, child.wait_with_output())
        .await
        .context("firmware-sim did not finish")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(output.status.success(), "firmware-sim failed:\n{stdout}");
    let report: Value = serde_json::from_str(&stdout)
        .with_context(|| format!("the report is not JSON:\n{stdout}"))?;
    let s = &report["scenario"]["storm"];
    assert_eq!(s["mode"], "restart", "{report:#}");
    assert_eq!(s["connected_before"].as_u64(), Some(20), "{report:#}");
    assert_eq!(s["back"].as_u64(), Some(20), "{report:#}");
    let secs = f(&s["secs_to_all_back"]);
    assert!(secs > 0.0 && secs < 60.0, "{report:#}");
    let attempts = s["reconnect_attempts"].as_u64().unwrap_or(0);
    assert_eq!(
        attempts,
        20 + s["reconnect_failed"].as_u64().unwrap_or(u64::MAX),
        "{report:#}"
    );
    // The sampler followed the pid file to the new hub.
    assert!(
        s["hub"]["samples"].as_u64().is_some_and(|n| n >= 1),
        "{report:#}"
    );
    drop(second);
    Ok(())
}

#[tokio::test]
async fn ctrl_c_ends_every_worker_with_a_merged_partial_report() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let _hub = Hub::start(dir.path()).await?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    let mut child = sim()?
        .args([
            "--data-dir",
            &data_dir,
            "--workers",
            "2",
            "--devices",
            "4",
            "--duration",
            "120s",
            "--rate",
            "max",
            "--inflight",
            "2",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // The children's progress lines come through the parent's stderr.
    wait_for_progress(&mut child, Duration::from_secs(60), |line| {
        line.contains("connected 2/2") && !line.contains(" acked 0 ")
    })
    .await?;
    let output = interrupt(child, Duration::from_secs(60)).await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{:?}: {stdout}", output.status);
    let report: Value = serde_json::from_str(&stdout)
        .with_context(|| format!("the partial report is not JSON:\n{stdout}"))?;
    assert_eq!(report["interrupted"], true, "{report:#}");
    assert_eq!(report["workers"].as_u64(), Some(2), "{report:#}");
    let sent = n(&report, "sent");
    assert!(sent > 0, "{report:#}");
    assert_eq!(
        n(&report, "acked") + n(&report, "failed"),
        sent,
        "{report:#}"
    );
    assert!(f(&report["elapsed_secs"]) < 60.0, "{report:#}");
    Ok(())
}

#[tokio::test]
async fn a_scenario_with_two_groups_reports_per_group_counts_that_add_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let _hub = Hub::start(dir.path()).await?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    let scenario = dir.path().join("two-groups.toml");
    std::fs::write(
        &scenario,
        r#"
duration = "60s"   # overridden by --duration below
seed = 3

[[group]]
name = "sensors"
devices = 6
prefix = "sc-sensor-"
rate = 20
payload = '{{"r":"{run}","d":"{device}","n":{seq}}}'

[[group]]
name = "gateways"
devices = 3
prefix = "sc-gw-"
rate = 5
twin_every = "500ms"
"#,
    )?;
    let scenario = scenario.to_string_lossy().into_owned();
    let report = report(&[
        "--data-dir",
        &data_dir,
        "--scenario-file",
        &scenario,
        "--duration",
        "3s",
        "--verify",
    ])
    .await?;
    assert!(
        report["elapsed_secs"].as_f64().is_some_and(|s| s < 10.0),
        "--duration overrides the file: {report:#}"
    );
    assert_eq!(report["seed"], 3, "{report:#}");
    assert_eq!(report["path"], "mixed", "{report:#}");
    let groups = report["groups"].as_array().context("groups")?;
    assert_eq!(groups.len(), 2, "{report:#}");
    let (sensors, gateways) = (&groups[0], &groups[1]);
    assert_eq!(sensors["name"], "sensors");
    assert_eq!(sensors["path"], "lean");
    assert_eq!(gateways["name"], "gateways");
    assert_eq!(gateways["path"], "sdk");
    assert_eq!(n(sensors, "connected"), 6, "{report:#}");
    assert_eq!(n(gateways, "connected"), 3, "{report:#}");
    for key in ["connected", "sent", "acked", "failed", "twin_reports"] {
        assert_eq!(
            n(sensors, key) + n(gateways, key),
            n(&report, key),
            "{key} does not add up: {report:#}"
        );
    }
    for group in groups {
        let sent = n(group, "sent");
        assert!(sent > 0 && n(group, "acked") == sent, "{report:#}");
    }
    // 20/s against 5/s: the sensors send several times the gateways' share.
    assert!(
        n(sensors, "sent") > 3 * n(gateways, "sent"),
        "rates are per group: {report:#}"
    );
    assert!(n(gateways, "twin_reports") >= 3, "{report:#}");
    assert_eq!(n(sensors, "twin_reports"), 0, "{report:#}");
    // Each group's template reads its own bodies back.
    assert_eq!(report["verify"]["lost"].as_u64(), Some(0), "{report:#}");
    assert_eq!(
        report["verify"]["read"].as_u64(),
        Some(n(&report, "sent")),
        "{report:#}"
    );
    Ok(())
}

/// Reads `line`s of the simulator's progress on stderr until one contains `needle`.
/// Ctrl-C: SIGINT to firmware-sim, then its output once it ended (within `wait`).
async fn interrupt(child: Child, wait: Duration) -> Result<std::process::Output> {
    let pid = i32::try_from(child.id().context("pid")?)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGINT,
    )?;
    tokio::time::timeout(wait, child.wait_with_output())
        .await
        .context("firmware-sim did not end after SIGINT")?
        .context("firmware-sim's output")
}

/// Reads firmware-sim's progress lines (stderr) until one satisfies `seen`, within
/// `wait`; keeps draining stderr afterwards so the simulator never blocks on it.
async fn wait_for_progress(
    child: &mut Child,
    wait: Duration,
    seen: impl Fn(&str) -> bool,
) -> Result<()> {
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let found = tokio::time::timeout(wait, async {
        while let Some(line) = lines.next_line().await? {
            if seen(&line) {
                return Ok::<_, std::io::Error>(true);
            }
        }
        Ok(false)
    })
    .await
    .context("no such progress line in time")??;
    ensure!(found, "firmware-sim ended before the progress line came");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(())
}

#[tokio::test]
async fn a_desired_patch_is_acknowledged_in_the_reported_properties() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    let mut child = sim()?
        .args([
            "--data-dir",
            &data_dir,
            "--devices",
            "2",
            "--prefix",
            "pnp-",
            "--duration",
            "5s",
            "--rate",
            "2",
            "--sdk",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_for_progress(&mut child, Duration::from_secs(30), |line| {
        line.contains("connected 2/2")
    })
    .await?;
    let patched = hub
        .http()
        .patch(format!("{}/twins/pnp-1", hub.url()))
        .bearer_auth(&token)
        .json(&serde_json::json!({"properties": {"desired": {"interval": 30, "mode": "eco"}}}))
        .send()
        .await?;
    ensure!(patched.status().is_success(), "PATCH: {}", patched.status());
    let twin: Value = patched.json().await?;
    let version = twin["properties"]["desired"]["$version"]
        .as_u64()
        .context("desired $version")?;
    // The device answers in the background: poll the twin with a deadline.
    let deadline = Instant::now() + Duration::from_secs(15);
    let reported = loop {
        let twin: Value = hub.get_json(&token, "/twins/pnp-1").await?;
        let reported = twin["properties"]["reported"].clone();
        if reported["interval"]["av"].as_u64() == Some(version) {
            break reported;
        }
        ensure!(
            Instant::now() < deadline,
            "no acknowledgement of desired version {version}: {twin:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reported["interval"]["value"], 30, "{reported:#}");
    assert_eq!(reported["interval"]["ac"], 200, "{reported:#}");
    assert_eq!(reported["mode"]["value"], "eco", "{reported:#}");
    assert_eq!(
        reported["mode"]["av"].as_u64(),
        Some(version),
        "{reported:#}"
    );

    let output = tokio::time::timeout(RUN_SLACK, child.wait_with_output())
        .await
        .context("firmware-sim did not finish")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(output.status.success(), "firmware-sim failed:\n{stdout}");
    let report: Value = serde_json::from_str(&stdout)
        .with_context(|| format!("the report is not JSON:\n{stdout}"))?;
    assert_eq!(
        n(&report, "desired"),
        1,
        "one patch, to one device: {report:#}"
    );
    assert!(n(&report, "desired_acks") >= 1, "{report:#}");
    Ok(())
}

#[tokio::test]
async fn tls_and_x509_devices_get_every_message_acked_on_the_lean_path_and_on_device_sdk()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let _hub = Hub::start(dir.path()).await?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    // Certificates from the hub's development CA, CN = device id: on the lean path,
    // then the same devices through device-sdk.
    for (path, extra) in [("lean", &[][..]), ("sdk", &["--sdk"][..])] {
        let common = [
            "--data-dir",
            &data_dir,
            "--devices",
            "4",
            "--prefix",
            "cert-",
            "--auth",
            "x509",
            "--duration",
            "2s",
            "--rate",
            "10",
            "--verify",
        ];
        let x509 = report(&[&common[..], extra].concat()).await?;
        assert_eq!(x509["path"], path, "{x509:#}");
        assert_eq!(n(&x509, "connected"), 4, "{x509:#}");
        let sent = n(&x509, "sent");
        assert!(sent > 0 && n(&x509, "acked") == sent, "{x509:#}");
        assert_eq!(n(&x509, "failed"), 0, "{x509:#}");
        assert_eq!(x509["verify"]["lost"].as_u64(), Some(0), "{x509:#}");
    }
    // SAS devices over TLS on the lean path, at QoS 0 as fast as they can: every
    // device's closing QoS 1 fence is acknowledged and nothing written is lost.
    let lean = report(&[
        "--data-dir",
        &data_dir,
        "--devices",
        "3",
        "--prefix",
        "lean-tls-",
        "--tls",
        "--qos",
        "0",
        "--rate",
        "max",
        "--duration",
        "1s",
        "--verify",
    ])
    .await?;
    assert_eq!(lean["path"], "lean", "{lean:#}");
    assert_eq!(n(&lean, "connected"), 3, "{lean:#}");
    assert!(n(&lean, "sent") > 0, "{lean:#}");
    assert_eq!(n(&lean, "failed"), 0, "{lean:#}");
    assert_eq!(lean["verify"]["lost"].as_u64(), Some(0), "{lean:#}");
    // SAS devices over TLS, trusting the hub's CA, with tokens renewed by reconnecting
    // (device-sdk).
    let sas = report(&[
        "--data-dir",
        &data_dir,
        "--devices",
        "3",
        "--prefix",
        "tls-",
        "--tls",
        "--sas-ttl",
        "1h",
        "--duration",
        "2s",
        "--rate",
        "10",
    ])
    .await?;
    assert_eq!(n(&sas, "connected"), 3, "{sas:#}");
    let sent = n(&sas, "sent");
    assert!(sent > 0 && n(&sas, "acked") == sent, "{sas:#}");
    Ok(())
}

#[tokio::test]
async fn devices_from_a_credentials_file_connect_without_provisioning() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let mut lines = vec!["# two formats: Azure connection strings and `ID KEY`".to_string()];
    for i in 0..3 {
        let id = format!("listed-{i}");
        let key = hub.create_device(&token, &id).await?;
        lines.push(if i == 0 {
            format!("HostName=localhost;DeviceId={id};SharedAccessKey={key}")
        } else {
            format!("{id} {key}")
        });
    }
    let file = dir.path().join("fleet.txt");
    std::fs::write(&file, lines.join("\n"))?;
    let mqtt = hub.endpoint("mqtt").context("mqtt endpoint")?.to_string();
    let data_dir = dir.path().to_string_lossy().into_owned();
    let file = file.to_string_lossy().into_owned();
    // Without --verify the service API is not needed: --mqtt is enough.
    let plain = report(&[
        "--credentials",
        &file,
        "--mqtt",
        &mqtt,
        "--devices",
        "3",
        "--duration",
        "1s",
        "--rate",
        "max",
    ])
    .await?;
    assert_eq!(n(&plain, "connected"), 3, "{plain:#}");
    let sent = n(&plain, "sent");
    assert!(sent > 0 && n(&plain, "acked") == sent, "{plain:#}");
    // With --verify it reads the messages back through the data dir's API.
    let verified = report(&[
        "--credentials",
        &file,
        "--data-dir",
        &data_dir,
        "--devices",
        "2",
        "--duration",
        "1s",
        "--rate",
        "max",
        "--verify",
    ])
    .await?;
    let sent = n(&verified, "sent");
    assert_eq!(
        verified["verify"]["read"].as_u64(),
        Some(sent),
        "{verified:#}"
    );
    assert_eq!(verified["verify"]["lost"].as_u64(), Some(0), "{verified:#}");
    // More devices than the file holds is refused before anything connects.
    let (ok, _, stderr) = run_sim(&[
        "--credentials",
        &file,
        "--mqtt",
        &mqtt,
        "--devices",
        "4",
        "--duration",
        "1s",
    ])
    .await?;
    ensure!(!ok && stderr.contains("holds 3 devices"), "{stderr}");
    Ok(())
}

/// `--provision dps`: the fleet registers through the provisioning contract with keys
/// derived from a group's key — all at once, beyond the hub's 64 registration slots —
/// then sends telemetry as the devices it was assigned; every registration is stored
/// and the initial twin applied. A wrong group key registers nothing and says why.
#[tokio::test]
async fn a_fleet_provisions_through_dps_then_sends_telemetry() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let data_dir = dir.path().to_string_lossy().into_owned();
    let group = hub
        .cli(&[
            "dps",
            "group",
            "create",
            "line-a",
            "--initial-twin",
            r#"{"tags": {"line": "a"}}"#,
        ])
        .await?;
    ensure!(group.status.success(), "{}", group.stderr);
    let devices = 150;
    let dps = [
        "--data-dir",
        &data_dir,
        "--provision",
        "dps",
        "--group",
        "line-a",
    ];
    let fleet = devices.to_string();
    let report = report(
        &[
            &dps[..],
            &[
                "--prefix",
                "unit-",
                "--devices",
                &fleet,
                "--connect-inflight",
                &fleet,
                "--duration",
                "2s",
                "--rate",
                "5",
                "--verify",
            ],
        ]
        .concat(),
    )
    .await?;
    let provisioning = &report["provisioning"];
    assert_eq!(n(provisioning, "attempted"), devices, "{report:#}");
    assert_eq!(n(provisioning, "registered"), devices, "{report:#}");
    assert_eq!(n(provisioning, "failed"), 0, "{report:#}");
    assert!(n(provisioning, "polls") >= devices, "{report:#}");
    assert!(f(&provisioning["per_sec"]) > 0.0, "{report:#}");
    assert_eq!(
        n(&provisioning["latency_ms"], "count"),
        devices,
        "{report:#}"
    );
    assert_eq!(n(&report, "connected"), devices, "{report:#}");
    assert_eq!(n(&report["verify"], "lost"), 0, "{report:#}");
    assert_eq!(
        n(&report["verify"], "read"),
        n(&report, "acked"),
        "{report:#}"
    );

    let listed = hub
        .cli(&["dps", "registrations", "--group", "line-a"])
        .await?;
    ensure!(listed.status.success(), "{}", listed.stderr);
    let registrations: Value = serde_json::from_str(&listed.stdout)?;
    let registrations = registrations.as_array().context("a list")?;
    assert_eq!(registrations.len() as u64, devices);
    assert!(
        registrations
            .iter()
            .all(|r| r["status"] == "assigned" && r["assignedHub"] == "localhost"),
        "{registrations:?}"
    );
    let twin = hub.cli(&["twin", "get", "unit-149"]).await?;
    ensure!(twin.status.success(), "{}", twin.stderr);
    let twin: Value = serde_json::from_str(&twin.stdout)?;
    assert_eq!(twin["tags"]["line"], "a", "{twin:#}");

    // A key that is not the group's: every registration refused, nothing created.
    let (ok, _, stderr) = run_sim(
        &[
            &dps[..],
            &[
                "--group-key",
                "d3Jvbmcgd3Jvbmcgd3Jvbmcgd3Jvbmcgd3Jvbmc=",
                "--prefix",
                "stranger-",
                "--devices",
                "3",
                "--duration",
                "1s",
            ],
        ]
        .concat(),
    )
    .await?;
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("not every device registered"), "{stderr}");
    assert!(stderr.contains("0 assigned of 3 (3 failed)"), "{stderr}");
    let all: Value = serde_json::from_str(&hub.cli(&["dps", "registrations"]).await?.stdout)?;
    assert_eq!(all.as_array().map(Vec::len), Some(devices as usize));
    let stranger = hub.cli(&["device", "get", "stranger-0"]).await?;
    assert!(!stranger.status.success(), "{}", stranger.stdout);
    Ok(())
}
