//! The C2D queue depth and TTLs and the twin size limits come from the configuration
//! (`[commands] queue_depth, default_ttl_secs, max_ttl_secs`, `[twins]
//! max_properties_bytes, max_tags_bytes`) and the running hub applies them: a queue
//! of 3 refuses the fourth message, a TTL beyond the configured maximum is refused,
//! a message without TTL expires after the configured default, a 40 KiB reported
//! patch passes a 64 KiB limit and a larger one is refused, and tags are capped.

use anyhow::{Context, Result, bail};
use hub_tests::HubOptions;
use hub_tests::mqtt::RawClient;
use reqwest::StatusCode;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::net::TcpStream;

/// Sends `body` on `topic` and waits for the twin answer with `rid`.
async fn twin_request(
    client: &mut RawClient<TcpStream>,
    topic: &str,
    body: &[u8],
    rid: &str,
) -> Result<(String, Value)> {
    client
        .send(&Packet::Publish(Publish::new(
            topic,
            QoS::AtMostOnce,
            body.to_vec(),
        )))
        .await?;
    loop {
        match client.recv().await? {
            Some(Packet::Publish(reply))
                if reply.topic.starts_with("$iothub/twin/res/")
                    && reply.topic.contains(&format!("$rid={rid}")) =>
            {
                let body = if reply.payload.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&reply.payload)?
                };
                return Ok((reply.topic, body));
            }
            Some(_) => {}
            None => bail!("connection closed while waiting for the twin answer"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c2d_and_twin_limits_follow_the_configuration() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        "[commands]\nqueue_depth = 3\ndefault_ttl_secs = 120\nmax_ttl_secs = 600\n\
         [twins]\nmax_properties_bytes = 65536\nmax_tags_bytes = 2048\n",
    )?;
    let config = config.to_string_lossy().into_owned();
    let hub = HubOptions::new(&dir.path().join("data"))
        .args(["--config", config.as_str()])
        .start()
        .await?;
    let token = hub.owner_token().await?;
    let key = hub.create_device(&token, "meter").await?;
    let send = |body: Value| {
        hub.http()
            .post(format!("{}/devices/meter/messages/deviceBound", hub.url()))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };

    // TTLs: beyond the configured maximum is refused; the default is the configured one.
    let refused = send(json!({"body": "x", "ttlSeconds": 601})).await?;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let sent_at = OffsetDateTime::now_utc();
    for i in 0..3 {
        let sent = send(json!({"body": format!("m{i}"), "messageId": format!("m{i}")})).await?;
        assert_eq!(sent.status(), StatusCode::ACCEPTED, "message {i}");
    }
    // The configured queue depth, not Azure's 50.
    let full = send(json!({"body": "one too many"})).await?;
    assert_eq!(full.status(), StatusCode::FORBIDDEN);
    assert_eq!(full.json::<Value>().await?["errorCode"], 403004);

    let mut device = hub.connect_device("meter", &key, true).await?;
    device
        .subscribe(&["devices/meter/messages/devicebound/#"])
        .await?;
    let first = match device.recv().await? {
        Some(Packet::Publish(publish)) => publish,
        other => bail!("expected a C2D message, got {other:?}"),
    };
    let bag = hub::properties::PropertyBag::parse(
        first
            .topic
            .strip_prefix("devices/meter/messages/devicebound/")
            .context("devicebound topic")?,
    )?;
    let expiry = OffsetDateTime::parse(bag.get("$.exp").context("$.exp")?, &Rfc3339)?;
    let ttl = (expiry - sent_at).whole_seconds();
    assert!((110..=130).contains(&ttl), "default TTL 120 s, got {ttl} s");

    // Reported properties up to the configured 64 KiB pass; beyond are refused.
    let patch = json!({ "blob": "x".repeat(40 * 1024) }).to_string();
    let (topic, _) = twin_request(
        &mut device,
        "$iothub/twin/PATCH/properties/reported/?$rid=1",
        patch.as_bytes(),
        "1",
    )
    .await?;
    assert!(topic.starts_with("$iothub/twin/res/204/"), "{topic}");
    let patch = json!({ "more": "x".repeat(30 * 1024) }).to_string();
    let (topic, body) = twin_request(
        &mut device,
        "$iothub/twin/PATCH/properties/reported/?$rid=2",
        patch.as_bytes(),
        "2",
    )
    .await?;
    assert_eq!(topic, "$iothub/twin/res/400/?$rid=2");
    assert_eq!(body["errorCode"], 400004, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("65536")),
        "{body}"
    );

    // Tags: the configured 2 KiB, below Azure's 8 KiB.
    let tags = hub
        .http()
        .patch(format!("{}/twins/meter", hub.url()))
        .bearer_auth(&token)
        .json(&json!({"tags": {"note": "x".repeat(3 * 1024)}}))
        .send()
        .await?;
    assert_eq!(tags.status(), StatusCode::BAD_REQUEST);
    assert!(hub.stop().await?.success());
    Ok(())
}
