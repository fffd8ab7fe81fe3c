//! Device authentication at the MQTT gateway, with real clients over TCP and TLS:
//! every credential kind connects a registered device, and every bad credential is
//! refused with CONNACK 5 and counted by reason.

use anyhow::Result;
use hub::registry::DeviceId;
use hub_tests::inproc::InProcessHub;
use hub_tests::mqtt::{self, azure_username, sas, unix_now};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use serde_json::json;

const RSA_PRIVATE: &str = include_str!("../fixtures/rsa-device.key");
const RSA_PUBLIC: &str = include_str!("../fixtures/rsa-device.pub");

fn jwt(alg: Algorithm, key: &EncodingKey, sub: &str, iat: u64, exp: u64) -> Result<String> {
    Ok(jsonwebtoken::encode(
        &Header::new(alg),
        &json!({"sub": sub, "iat": iat, "exp": exp, "aud": "localhost"}),
        key,
    )?)
}

async fn refused_over_tcp(
    hub: &InProcessHub,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<()> {
    let mut client = mqtt::tcp(hub.mqtt).await?;
    let ack = client.connect(client_id, username, password, true).await?;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{client_id}");
    assert!(!ack.session_present);
    client.expect_closed().await
}

#[tokio::test]
async fn sas_tokens_with_either_key_connect_and_bad_ones_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = InProcessHub::start(dir.path()).await?;
    let device = hub.create_device("sas-1", json!({})).await?;
    let keys = device.authentication.symmetric_key.clone().expect("keys");
    hub.create_device("sas-2", json!({})).await?;
    hub.create_device("sas-off", json!({"status": "disabled"}))
        .await?;
    let user = azure_username("localhost", "sas-1");

    for key in [&keys.primary_key, &keys.secondary_key] {
        let mut client = mqtt::tcp(hub.mqtt).await?;
        let ack = client
            .connect(
                "sas-1",
                Some(&user),
                Some(&sas("localhost", "sas-1", key, 3600)?),
                true,
            )
            .await?;
        assert_eq!(ack.code, ConnectReturnCode::Success);
        client.ping().await?;
    }
    // Older SDKs omit the `?`; some send just host/id; the hostname is case-insensitive.
    for username in ["localhost/sas-1/api-version=2018-06-30", "localhost/sas-1"] {
        let mut client = mqtt::tcp(hub.mqtt).await?;
        let token = sas("LOCALHOST", "sas-1", &keys.primary_key, 3600)?;
        let ack = client
            .connect("sas-1", Some(username), Some(&token), true)
            .await?;
        assert_eq!(ack.code, ConnectReturnCode::Success, "{username}");
    }

    let other_key =
        InProcessHub::primary_key(&hub.registry.get(&DeviceId::parse("sas-2")?).await?)?;
    let good = sas("localhost", "sas-1", &keys.primary_key, 3600)?;
    let cases: Vec<(&str, String, String)> = vec![
        (
            "wrong key",
            user.clone(),
            sas("localhost", "sas-1", &other_key, 3600)?,
        ),
        (
            "expired",
            user.clone(),
            sas("localhost", "sas-1", &keys.primary_key, -10)?,
        ),
        (
            "sr for another device",
            user.clone(),
            sas("localhost", "sas-2", &keys.primary_key, 3600)?,
        ),
        (
            "sr for another hub",
            user.clone(),
            sas("elsewhere", "sas-1", &keys.primary_key, 3600)?,
        ),
        (
            "username of another device",
            azure_username("localhost", "sas-2"),
            good.clone(),
        ),
        (
            "bare-id username with SAS",
            "sas-1".to_string(),
            good.clone(),
        ),
        (
            "policy key",
            user.clone(),
            format!("{good}&skn=iothubowner"),
        ),
        (
            "garbage",
            user.clone(),
            "SharedAccessSignature nonsense".to_string(),
        ),
    ];
    for (what, username, password) in &cases {
        let mut client = mqtt::tcp(hub.mqtt).await?;
        let ack = client
            .connect("sas-1", Some(username), Some(password), true)
            .await?;
        assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{what}");
        client.expect_closed().await?;
    }
    refused_over_tcp(
        &hub,
        "unknown-device",
        Some(&azure_username("localhost", "unknown-device")),
        Some(&good),
    )
    .await?;
    let off_key =
        InProcessHub::primary_key(&hub.registry.get(&DeviceId::parse("sas-off")?).await?)?;
    refused_over_tcp(
        &hub,
        "sas-off",
        Some(&azure_username("localhost", "sas-off")),
        Some(&sas("localhost", "sas-off", &off_key, 3600)?),
    )
    .await?;
    refused_over_tcp(&hub, "sas-1", None, None).await?;

    let failures = hub.metrics.auth_failures();
    assert!(
        failures.get("expired").copied().unwrap_or(0) >= 1,
        "{failures:?}"
    );
    assert!(
        failures.get("bad_signature").copied().unwrap_or(0) >= 1,
        "{failures:?}"
    );
    assert!(
        failures.get("unknown_device").copied().unwrap_or(0) >= 1,
        "{failures:?}"
    );
    assert!(
        failures.get("disabled").copied().unwrap_or(0) >= 1,
        "{failures:?}"
    );
    hub.stop().await
}

#[tokio::test]
async fn device_jwts_connect_with_hs256_es256_and_rs256() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = InProcessHub::start(dir.path()).await?;
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let sas_device = hub.create_device("jwt-hs", json!({})).await?;
    hub.create_device(
        "jwt-pk",
        json!({"authentication": {"type": "jwt", "publicKeys": [ec.public_key_pem(), RSA_PUBLIC]}}),
    )
    .await?;
    let secret = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        InProcessHub::primary_key(&sas_device)?,
    )?;
    let now = unix_now();
    let hs = EncodingKey::from_secret(&secret);
    let es = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes())?;
    let rs = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes())?;

    let good = [
        (
            "jwt-hs",
            jwt(Algorithm::HS256, &hs, "jwt-hs", now, now + 600)?,
        ),
        (
            "jwt-pk",
            jwt(Algorithm::ES256, &es, "jwt-pk", now, now + 600)?,
        ),
        (
            "jwt-pk",
            jwt(Algorithm::RS256, &rs, "jwt-pk", now, now + 600)?,
        ),
    ];
    for (id, token) in &good {
        // JWT devices may send a bare id as username, or none.
        for username in [Some(*id), None] {
            let mut client = mqtt::tcp(hub.mqtt).await?;
            let ack = client.connect(id, username, Some(token), true).await?;
            assert_eq!(ack.code, ConnectReturnCode::Success, "{id} {username:?}");
        }
    }

    let other_ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let wrong = EncodingKey::from_ec_pem(other_ec.serialize_pem().as_bytes())?;
    let payload = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        json!({"sub": "jwt-hs", "iat": now, "exp": now + 600}).to_string(),
    );
    let bad = [
        (
            "alg none",
            "jwt-hs",
            format!("eyJhbGciOiJub25lIn0.{payload}."),
        ),
        (
            "wrong key",
            "jwt-pk",
            jwt(Algorithm::ES256, &wrong, "jwt-pk", now, now + 600)?,
        ),
        (
            "expired",
            "jwt-pk",
            jwt(Algorithm::ES256, &es, "jwt-pk", now - 7200, now - 3600)?,
        ),
        (
            "sub of another device",
            "jwt-pk",
            jwt(Algorithm::ES256, &es, "jwt-hs", now, now + 600)?,
        ),
        (
            "lifetime over 24 h",
            "jwt-pk",
            jwt(Algorithm::ES256, &es, "jwt-pk", now, now + 48 * 3600)?,
        ),
        (
            "HS256 with another device's key",
            "jwt-pk",
            jwt(Algorithm::HS256, &hs, "jwt-pk", now, now + 600)?,
        ),
    ];
    for (what, id, token) in &bad {
        let mut client = mqtt::tcp(hub.mqtt).await?;
        let ack = client.connect(id, Some(id), Some(token), true).await?;
        assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{what}");
        client.expect_closed().await?;
    }
    hub.stop().await
}

#[tokio::test]
async fn x509_devices_connect_over_tls_with_ca_issued_or_registered_certificates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = InProcessHub::start(dir.path()).await?;
    let ca_pem = hub.ca_pem()?;
    let ca = hub.ca()?;
    hub.create_device(
        "cam-ca",
        json!({"authentication": {"type": "certificateAuthority"}}),
    )
    .await?;
    let own = ca.issue_device("cam-ca")?;

    let elsewhere = certs::Ca::generate("some other CA")?;
    let self_signed = elsewhere.issue_device("cam-thumb")?;
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(self_signed.cert_pem.as_bytes())
        .map(|d: rustls::pki_types::CertificateDer<'static>| d.to_vec())?;
    let (sha256, _) = hub::auth::x509::thumbprints(&der);
    hub.create_device(
        "cam-thumb",
        json!({"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": sha256}}}),
    )
    .await?;

    // CA-issued, CN = id; username may be the Azure form, the bare id, or absent.
    for username in [
        Some(azure_username("localhost", "cam-ca")),
        Some("cam-ca".to_string()),
        None,
    ] {
        let config = mqtt::tls_config(&ca_pem, Some((&own.cert_pem, &own.key_pem)))?;
        let mut client = mqtt::tls(hub.mqtts, config).await?;
        let ack = client
            .connect("cam-ca", username.as_deref(), None, true)
            .await?;
        assert_eq!(ack.code, ConnectReturnCode::Success, "{username:?}");
    }
    // Registered thumbprint.
    let config = mqtt::tls_config(&ca_pem, Some((&self_signed.cert_pem, &self_signed.key_pem)))?;
    let mut client = mqtt::tls(hub.mqtts, config).await?;
    assert_eq!(
        client.connect("cam-thumb", None, None, true).await?.code,
        ConnectReturnCode::Success
    );

    // Refusals: a certificate from another CA; CN of another device; thumbprint mismatch;
    // no certificate at all.
    let foreign = elsewhere.issue_device("cam-ca")?;
    let wrong_cn = ca.issue_device("cam-other")?;
    let unregistered = elsewhere.issue_device("cam-thumb")?;
    for (what, id, cert) in [
        ("another CA", "cam-ca", Some(&foreign)),
        ("CN of another device", "cam-ca", Some(&wrong_cn)),
        ("thumbprint mismatch", "cam-thumb", Some(&unregistered)),
        ("no certificate", "cam-ca", None),
    ] {
        let config = mqtt::tls_config(
            &ca_pem,
            cert.map(|c| (c.cert_pem.as_str(), c.key_pem.as_str())),
        )?;
        let mut client = mqtt::tls(hub.mqtts, config).await?;
        let ack = client.connect(id, None, None, true).await?;
        assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "{what}");
        client.expect_closed().await?;
    }

    // SAS devices connect over TLS too (the Azure SDK's usual path), sending no certificate.
    let device = hub.create_device("sas-tls", json!({})).await?;
    let token = sas(
        "localhost",
        "sas-tls",
        &InProcessHub::primary_key(&device)?,
        600,
    )?;
    let mut client = mqtt::tls(hub.mqtts, mqtt::tls_config(&ca_pem, None)?).await?;
    let ack = client
        .connect(
            "sas-tls",
            Some(&azure_username("localhost", "sas-tls")),
            Some(&token),
            false,
        )
        .await?;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    hub.stop().await
}

#[tokio::test]
async fn rumqttc_connects_publishes_and_is_acknowledged() -> Result<()> {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
    let dir = tempfile::tempdir()?;
    let hub = InProcessHub::start(dir.path()).await?;
    let device = hub.create_device("rumqttc-1", json!({})).await?;
    let token = sas(
        "localhost",
        "rumqttc-1",
        &InProcessHub::primary_key(&device)?,
        600,
    )?;

    let mut options = MqttOptions::new("rumqttc-1", "127.0.0.1", hub.mqtts.port());
    options.set_credentials(azure_username("localhost", "rumqttc-1"), token);
    options.set_clean_session(false);
    let tls = mqtt::tls_config(&hub.ca_pem()?, None)?;
    options.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .publish(
            "devices/rumqttc-1/messages/events/%24.mid=m-1&kind=test",
            QoS::AtLeastOnce,
            false,
            b"{\"t\":21}".to_vec(),
        )
        .await?;
    let acked = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Incoming::PubAck(_)) = eventloop.poll().await? {
                return Ok::<_, anyhow::Error>(());
            }
        }
    })
    .await;
    acked??;
    let telemetry = hub.recorder.telemetry();
    assert_eq!(telemetry.len(), 1);
    assert_eq!(telemetry[0].device_id.as_str(), "rumqttc-1");
    assert_eq!(telemetry[0].properties.get("$.mid"), Some("m-1"));
    assert_eq!(telemetry[0].properties.get("kind"), Some("test"));
    assert_eq!(telemetry[0].body.as_ref(), b"{\"t\":21}");
    assert_eq!(telemetry[0].auth_method, hub::auth::device::AuthMethod::Sas);
    hub.stop().await
}

/// `hub_mqtt_connections_open` from `GET /metrics`.
async fn open_connections(hub: &hub_tests::Hub) -> Result<i64> {
    let text = hub
        .http()
        .get(format!("{}/metrics", hub.url()))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|line| line.strip_prefix("hub_mqtt_connections_open "))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no open-connections gauge in {text}"))
}

#[tokio::test]
async fn a_sas_token_valid_for_ever_is_refused_and_leaves_no_trace() -> Result<()> {
    use base64::Engine;

    let dir = tempfile::tempdir()?;
    let hub = hub_tests::Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let key = hub.create_device(&token, "forever").await?;
    let key_bytes = base64::engine::general_purpose::STANDARD.decode(&key)?;
    let mqtt_addr = hub
        .endpoint("mqtt")
        .ok_or_else(|| anyhow::anyhow!("no mqtt"))?;
    let before = open_connections(&hub).await?;

    // Validly signed with the device's own key: se at (or near) u64::MAX, and ten
    // years away, beyond the default cap of 365 days.
    let far = [u64::MAX, u64::MAX - 1, unix_now() + 10 * 365 * 24 * 3600];
    for se in far {
        let password = hub::auth::sas::sign("localhost", "forever", &key_bytes, se);
        let mut client = mqtt::tcp(mqtt_addr).await?;
        let ack = client
            .connect(
                "forever",
                Some(&azure_username("localhost", "forever")),
                Some(&password),
                false,
            )
            .await?;
        assert_eq!(ack.code, ConnectReturnCode::NotAuthorized, "se={se}");
        client.expect_closed().await?;
    }

    // The hub closed each socket before its task ended: the gauge follows within
    // moments (polled, with a deadline).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while open_connections(&hub).await? != before {
        assert!(
            std::time::Instant::now() < deadline,
            "the open-connections gauge did not return to {before}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let device: serde_json::Value = hub
        .http()
        .get(format!("{}/devices/forever", hub.url()))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(device["connectionState"], "Disconnected", "{device}");
    let metrics = hub
        .http()
        .get(format!("{}/metrics", hub.url()))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("hub_auth_failures_total{reason=\"token_lifetime_too_long\"} 3"),
        "{metrics}"
    );

    // An ordinary token still connects.
    let mut client = hub.connect_device("forever", &key, false).await?;
    client.ping().await?;
    hub.stop().await?;
    Ok(())
}
