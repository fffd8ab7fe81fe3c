//! The operator's own certificates (`[tls]`) against the real binary: MQTT/TLS presents
//! the operator's server certificate, a device certificate from a CA in the operator's
//! device CA bundle authenticates (and one from the development CA no longer does),
//! and replacing the files plus SIGHUP (or, for the bundle, the file change alone)
//! changes what new handshakes and checks see while a connection made before the
//! reload stays up; a bad file keeps the old material. HTTPS presents the same
//! certificate as MQTT/TLS.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use certs::{Ca, CertifiedKey, SubjectAltNames};
use hub_tests::mqtt::{self, RawClient};
use hub_tests::{Hub, HubOptions};
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

fn server_cert(ca: &Ca) -> Result<CertifiedKey> {
    Ok(ca.issue_server(&SubjectAltNames::for_hub(
        "localhost",
        [IpAddr::V4(Ipv4Addr::LOCALHOST)],
    ))?)
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

fn hangup(hub: &Hub) -> Result<()> {
    let pid = hub.pid().context("hub exited")?;
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -HUP {pid}: {status}");
    }
    Ok(())
}

/// Connects CA-authenticated device `id` over TLS trusting only `server_ca_pem`.
async fn connect(
    addr: SocketAddr,
    server_ca_pem: &str,
    id: &str,
    device: &CertifiedKey,
) -> Result<RawClient<TlsStream<TcpStream>>> {
    let config = mqtt::tls_config(server_ca_pem, Some((&device.cert_pem, &device.key_pem)))?;
    let mut client = mqtt::tls(addr, config).await?;
    let ack = client.connect(id, None, None, true).await?;
    if ack.code != ConnectReturnCode::Success {
        bail!("{id} refused: {:?}", ack.code);
    }
    Ok(client)
}

/// Connects the probing device `cam-op` (the long-lived connection is another device,
/// so a probe never takes its session over).
async fn device(
    addr: SocketAddr,
    server_ca_pem: &str,
    cert: &CertifiedKey,
) -> Result<RawClient<TlsStream<TcpStream>>> {
    connect(addr, server_ca_pem, "cam-op", cert).await
}

/// Whether a TLS handshake with `addr` succeeds trusting only `ca_pem`.
async fn handshake(addr: SocketAddr, ca_pem: &str) -> Result<bool> {
    Ok(mqtt::tls(addr, mqtt::tls_config(ca_pem, None)?)
        .await
        .is_ok())
}

/// Polls until a device trusting only `server_ca_pem` connects with `cert` (a reload
/// is applied asynchronously after the signal or file change).
async fn wait_for_trust(
    addr: SocketAddr,
    server_ca_pem: &str,
    cert: &CertifiedKey,
) -> Result<RawClient<TlsStream<TcpStream>>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match device(addr, server_ca_pem, cert).await {
            Ok(client) => return Ok(client),
            Err(err) if Instant::now() > deadline => {
                return Err(err.context("the new server certificate never appeared"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_certificates_authenticate_and_reload_without_dropping_connections() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let files = dir.path().join("operator");
    std::fs::create_dir_all(&files)?;
    let (cert_path, key_path, bundle_path) = (
        files.join("server.pem"),
        files.join("server.key"),
        files.join("device-cas.pem"),
    );

    let first_ca = Ca::generate("operator server CA 1")?;
    let second_ca = Ca::generate("operator server CA 2")?;
    let device_ca = Ca::generate("operator device CA")?;
    let other_device_ca = Ca::generate("operator device CA (second in bundle)")?;
    let first = server_cert(&first_ca)?;
    write(&cert_path, &first.cert_pem)?;
    write(&key_path, &first.key_pem)?;
    write(
        &bundle_path,
        &format!("{}{}", other_device_ca.cert_pem(), device_ca.cert_pem()),
    )?;
    let config = dir.path().join("hub.toml");
    write(
        &config,
        &format!(
            "[tls]\nserver_cert = {:?}\nserver_key = {:?}\ndevice_ca_bundle = {:?}\n",
            cert_path, key_path, bundle_path
        ),
    )?;
    let hub = HubOptions::new(&data)
        .env("HUB_CONFIG", &config.display().to_string())
        .args(["--https", "127.0.0.1:0"])
        .start()
        .await?;
    let mqtts = hub.endpoint("mqtts").context("no mqtts endpoint")?;
    let https = hub.endpoint("https").context("no https endpoint")?;
    let token = hub.owner_token().await?;
    for id in ["cam-op", "cam-live"] {
        let created = hub
            .http()
            .put(format!("{}/devices/{id}", hub.url()))
            .bearer_auth(&token)
            .json(&json!({"authentication": {"type": "certificateAuthority"}}))
            .send()
            .await?;
        assert!(created.status().is_success(), "{}", created.status());
    }

    // Trusted through the operator's CA only; the device's certificate comes from the
    // operator's device CA bundle.
    let cam = device_ca.issue_device("cam-op")?;
    let live_cert = device_ca.issue_device("cam-live")?;
    let mut live = connect(mqtts, first_ca.cert_pem(), "cam-live", &live_cert).await?;
    live.ping().await?;
    device(mqtts, first_ca.cert_pem(), &cam)
        .await?
        .ping()
        .await?;
    assert!(handshake(https, first_ca.cert_pem()).await?, "HTTPS too");
    let dev_ca = Ca::read(&data.join("certs"), "ca")?.context("development CA")?;
    assert!(
        device(mqtts, dev_ca.cert_pem(), &cam).await.is_err(),
        "the development server certificate is not presented"
    );
    // The bundle replaces the development device CA.
    let dev_cam = dev_ca.issue_device("cam-op")?;
    assert!(device(mqtts, first_ca.cert_pem(), &dev_cam).await.is_err());

    // Replace the server certificate and key, then SIGHUP.
    let second = server_cert(&second_ca)?;
    write(&cert_path, &second.cert_pem)?;
    write(&key_path, &second.key_pem)?;
    hangup(&hub)?;
    wait_for_trust(mqtts, second_ca.cert_pem(), &cam)
        .await?
        .ping()
        .await?;
    assert!(
        device(mqtts, first_ca.cert_pem(), &cam).await.is_err(),
        "new handshakes no longer present the first certificate"
    );
    assert!(handshake(https, second_ca.cert_pem()).await?);
    assert!(!handshake(https, first_ca.cert_pem()).await?);
    // The connection made before the reload is still alive.
    live.ping().await?;

    // A new device CA bundle, picked up from the file change alone (no signal): devices
    // of the new CA authenticate, those of the removed one no longer do, and the
    // device connected under the removed CA stays connected.
    let next_device_ca = Ca::generate("operator device CA 2")?;
    write(&bundle_path, next_device_ca.cert_pem())?;
    let next_cam = next_device_ca.issue_device("cam-op")?;
    wait_for_trust(mqtts, second_ca.cert_pem(), &next_cam)
        .await?
        .ping()
        .await?;
    assert!(device(mqtts, second_ca.cert_pem(), &cam).await.is_err());
    live.ping().await?;

    // A bad file is refused and the current certificate stays.
    write(&cert_path, "not a certificate")?;
    hangup(&hub)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !hub.stderr().contains("server certificate not reloaded") {
        if Instant::now() > deadline {
            bail!("the bad file was never logged: {}", hub.stderr());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    device(mqtts, second_ca.cert_pem(), &next_cam)
        .await?
        .ping()
        .await?;
    live.ping().await?;
    hub.stop().await?;
    Ok(())
}
