//! Device connections end when the registry takes their credential away, and direct
//! methods wait for a device that is reconnecting: against the real binary with raw
//! MQTT devices.
//!
//! - Rotating a device's key (or thumbprint) closes, within a second, the connection
//!   made with it; the old token is refused from then on; a connection made with the
//!   other key survives.
//! - A method call to a device that just went away waits up to its
//!   `connectTimeoutInSeconds` (404103 only after it), and reaches the device when it
//!   comes back within it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hub_tests::Hub;
use hub_tests::mqtt::{self, RawClient, azure_username, sas};
use reqwest::StatusCode;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use serde_json::{Value, json};
use tokio::net::TcpStream;

struct Api {
    hub: Hub,
    token: String,
}

impl Api {
    async fn start(dir: &std::path::Path) -> Result<Self> {
        let hub = Hub::start(dir).await?;
        let token = hub.owner_token().await?;
        Ok(Self { hub, token })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.hub.url())
    }

    fn mqtt(&self) -> Result<std::net::SocketAddr> {
        self.hub.endpoint("mqtt").context("no mqtt endpoint")
    }

    async fn device(&self, id: &str) -> Result<Value> {
        let response = self
            .hub
            .http()
            .get(self.url(&format!("/devices/{id}")))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("GET /devices/{id}: {}", response.status());
        }
        Ok(response.json().await?)
    }

    async fn put_device(&self, id: &str, body: Value) -> Result<Value> {
        let device = self.device(id).await?;
        let etag = device["etag"].as_str().context("no etag")?.to_string();
        let response = self
            .hub
            .http()
            .put(self.url(&format!("/devices/{id}")))
            .bearer_auth(&self.token)
            .header("If-Match", format!("\"{etag}\""))
            .json(&body)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("PUT /devices/{id}: {}", response.status());
        }
        Ok(response.json().await?)
    }

    async fn invoke(&self, id: &str, body: Value) -> Result<(StatusCode, Value)> {
        let response = self
            .hub
            .http()
            .post(self.url(&format!("/twins/{id}/methods")))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        Ok((response.status(), response.json().await?))
    }

    /// Connects `id` with a SAS token signed with `key`; returns the CONNACK code and
    /// the client.
    async fn connect_sas(
        &self,
        id: &str,
        token: &str,
    ) -> Result<(ConnectReturnCode, RawClient<TcpStream>)> {
        let mut client = mqtt::tcp(self.mqtt()?).await?;
        let ack = client
            .connect(
                id,
                Some(&azure_username("localhost", id)),
                Some(token),
                false,
            )
            .await?;
        Ok((ack.code, client))
    }
}

/// Waits for the hub to close `client`; returns how long that took.
async fn closed_within<S>(client: &mut RawClient<S>) -> Result<Duration>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let started = Instant::now();
    client.expect_closed().await?;
    Ok(started.elapsed())
}

#[tokio::test]
async fn rotating_a_key_closes_only_the_connections_made_with_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::start(dir.path()).await?;
    api.hub.create_device(&api.token, "rotated").await?;
    api.hub.create_device(&api.token, "keeper").await?;
    let rotated = api.device("rotated").await?;
    let keeper = api.device("keeper").await?;
    let key = |device: &Value, slot: &str| -> Result<String> {
        Ok(device["authentication"]["symmetricKey"][slot]
            .as_str()
            .context("no key")?
            .to_string())
    };

    // "rotated" connects with its primary key, "keeper" with its secondary key.
    let old_token = sas("localhost", "rotated", &key(&rotated, "primaryKey")?, 3600)?;
    let (code, mut rotated_client) = api.connect_sas("rotated", &old_token).await?;
    assert_eq!(code, ConnectReturnCode::Success);
    let keeper_token = sas("localhost", "keeper", &key(&keeper, "secondaryKey")?, 3600)?;
    let (code, mut keeper_client) = api.connect_sas("keeper", &keeper_token).await?;
    assert_eq!(code, ConnectReturnCode::Success);

    // Rotate both primary keys, keeper's first. The hub judges registry changes in
    // order, so once "rotated" is closed, keeper's rotation has been judged too.
    let new_key = STANDARD.encode([42u8; 32]);
    api.put_device(
        "keeper",
        json!({"authentication": {"type": "sas", "symmetricKey": {"primaryKey": new_key}}}),
    )
    .await?;
    api.put_device(
        "rotated",
        json!({"authentication": {"type": "sas", "symmetricKey": {"primaryKey": new_key}}}),
    )
    .await?;
    let took = closed_within(&mut rotated_client).await?;
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    keeper_client.ping().await?;

    // The old token is refused from now on; the new key connects.
    let (code, mut refused) = api.connect_sas("rotated", &old_token).await?;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    refused.expect_closed().await?;
    let (code, mut fresh) = api
        .connect_sas("rotated", &sas("localhost", "rotated", &new_key, 3600)?)
        .await?;
    assert_eq!(code, ConnectReturnCode::Success);
    fresh.ping().await?;

    // Another authentication type takes the SAS credential away too.
    api.put_device(
        "keeper",
        json!({"authentication": {"type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": "ab".repeat(32)}}}),
    )
    .await?;
    let took = closed_within(&mut keeper_client).await?;
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    api.hub.stop().await?;
    Ok(())
}

#[tokio::test]
async fn changing_a_thumbprint_closes_the_connection_made_with_the_old_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::start(dir.path()).await?;
    let ca_pem = std::fs::read_to_string(api.hub.data_dir().join("certs/ca.pem"))?;
    let elsewhere = certs::Ca::generate("device maker")?;
    let thumbprint = |cert: &certs::CertifiedKey| -> Result<String> {
        let der: rustls::pki_types::CertificateDer<'static> =
            rustls::pki_types::pem::PemObject::from_pem_slice(cert.cert_pem.as_bytes())?;
        Ok(hub::auth::x509::thumbprints(&der).0)
    };
    let old = elsewhere.issue_device("cam")?;
    let spare = elsewhere.issue_device("cam")?;
    let new = elsewhere.issue_device("cam")?;
    let response = api
        .hub
        .http()
        .put(api.url("/devices/cam"))
        .bearer_auth(&api.token)
        .json(
            &json!({"authentication": {"type": "selfSigned", "x509Thumbprint": {
            "primaryThumbprint": thumbprint(&old)?, "secondaryThumbprint": thumbprint(&spare)?}}}),
        )
        .send()
        .await?;
    assert!(response.status().is_success(), "{}", response.status());

    let mqtts = api.hub.endpoint("mqtts").context("no mqtts endpoint")?;
    let connect = |cert: &certs::CertifiedKey| {
        let config = mqtt::tls_config(&ca_pem, Some((&cert.cert_pem, &cert.key_pem)));
        async move {
            let mut client = mqtt::tls(mqtts, config?).await?;
            let ack = client.connect("cam", None, None, false).await?;
            Ok::<_, anyhow::Error>((ack.code, client))
        }
    };
    let (code, mut client) = connect(&old).await?;
    assert_eq!(code, ConnectReturnCode::Success);

    // Only the secondary thumbprint changes: the connection stays.
    api.put_device(
        "cam",
        json!({"authentication": {"type": "selfSigned", "x509Thumbprint": {
            "primaryThumbprint": thumbprint(&old)?, "secondaryThumbprint": thumbprint(&new)?}}}),
    )
    .await?;
    // The primary changes: the connection made with it closes.
    api.put_device(
        "cam",
        json!({"authentication": {"type": "selfSigned", "x509Thumbprint": {
            "primaryThumbprint": thumbprint(&new)?}}}),
    )
    .await?;
    let took = closed_within(&mut client).await?;
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    let (code, mut refused) = connect(&old).await?;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    refused.expect_closed().await?;
    let (code, mut client) = connect(&new).await?;
    assert_eq!(code, ConnectReturnCode::Success);
    client.ping().await?;
    api.hub.stop().await?;
    Ok(())
}

/// Answers the next method request on `client` with 200 and `{"rebooted": true}`.
async fn answer_one_method(client: &mut RawClient<TcpStream>) -> Result<String> {
    loop {
        match client.recv().await? {
            Some(Packet::Publish(request)) => {
                let Some(rest) = request.topic.strip_prefix("$iothub/methods/POST/") else {
                    continue;
                };
                let (name, rid) = rest.split_once("/?$rid=").context("no $rid")?;
                let response = Publish::new(
                    format!("$iothub/methods/res/200/?$rid={rid}"),
                    QoS::AtMostOnce,
                    br#"{"rebooted": true}"#.to_vec(),
                );
                client.send(&Packet::Publish(response)).await?;
                return Ok(name.to_string());
            }
            Some(_) => {}
            None => bail!("the hub closed the device's connection"),
        }
    }
}

#[tokio::test]
async fn a_method_call_waits_for_a_device_that_just_went_away() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::start(dir.path()).await?;
    let key = api.hub.create_device(&api.token, "flaky").await?;
    let mut device = api.hub.connect_device("flaky", &key, false).await?;
    device.subscribe(&["$iothub/methods/POST/#"]).await?;
    device.send(&Packet::Disconnect).await?;
    device.expect_closed().await?;
    // The hub has let the connection go once the registry shows it (polled, with a
    // deadline).
    let deadline = Instant::now() + Duration::from_secs(5);
    while api.device("flaky").await?["connectionState"] != "Disconnected" {
        assert!(Instant::now() < deadline, "still shown connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Nobody comes back: 404103, but only after the connect timeout.
    let started = Instant::now();
    let (status, body) = api
        .invoke(
            "flaky",
            json!({"methodName": "reboot", "payload": {},
                   "responseTimeoutInSeconds": 5, "connectTimeoutInSeconds": 2}),
        )
        .await?;
    let waited = started.elapsed();
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["errorCode"], 404103, "{body}");
    assert!(
        waited >= Duration::from_millis(1900),
        "answered after {waited:?}, before the 2 s connect timeout"
    );

    // The device comes back within the connect timeout: the call reaches it (its
    // persistent session kept the methods subscription).
    let call = {
        let http = api.hub.http().clone();
        let url = api.url("/twins/flaky/methods");
        let token = api.token.clone();
        tokio::spawn(async move {
            let response = http
                .post(url)
                .bearer_auth(token)
                .json(&json!({"methodName": "reboot", "payload": {},
                              "responseTimeoutInSeconds": 10, "connectTimeoutInSeconds": 5}))
                .send()
                .await?;
            Ok::<_, anyhow::Error>((response.status(), response.json::<Value>().await?))
        })
    };
    let mut device = api.hub.connect_device("flaky", &key, false).await?;
    assert_eq!(answer_one_method(&mut device).await?, "reboot");
    let (status, body) = call.await??;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"status": 200, "payload": {"rebooted": true}}));
    api.hub.stop().await?;
    Ok(())
}
