//! The Rust device SDK against the real hub over TLS: telemetry acknowledged only when
//! durable and readable from the stream; twin read, reported patch and desired
//! updates; method calls answered; C2D messages completed; and a hub restart in the
//! middle of a telemetry stream, after which the client has reconnected by itself and
//! no acknowledged message is lost.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use device_sdk::{ClientOptions, Credentials, DesiredUpdate, DeviceClient, DeviceEvents, Message};
use hub_tests::{Hub, HubOptions};
use serde_json::{Value, json};

async fn create(hub: &Hub, token: &str, id: &str) -> Result<String> {
    hub.create_device(token, id).await
}

fn client(hub: &Hub, id: &str, key: &str) -> Result<(DeviceClient, DeviceEvents)> {
    let ca = std::fs::read_to_string(hub.data_dir().join("certs/ca.pem"))?;
    let port = hub.endpoint("mqtts").context("mqtts")?.port();
    let options = ClientOptions::new(
        "localhost",
        id,
        Credentials::Sas {
            key: key.to_string(),
            ttl: Duration::from_secs(600),
        },
    )
    .with_ca(&ca)
    .with_endpoint("localhost", port);
    Ok(DeviceClient::start(options)?)
}

async fn stored_message_ids(hub: &Hub, token: &str) -> Result<HashSet<String>> {
    Ok(hub
        .read_telemetry(token)
        .await?
        .iter()
        .filter_map(|m| {
            m["systemProperties"]["message-id"]
                .as_str()
                .map(str::to_string)
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_twin_methods_and_messages() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let key = create(&hub, &token, "sdk-1").await?;
    let (device, mut events) = client(&hub, "sdk-1", &key)?;
    device.connected(Duration::from_secs(10)).await?;

    device
        .send_telemetry(
            Message::json(&json!({"temp": 21.5}))?
                .with_id("t-1")
                .with_property("unit", "C"),
        )
        .await?;
    assert!(
        stored_message_ids(&hub, &token).await?.contains("t-1"),
        "acknowledged means stored"
    );

    // After connecting the client reads the twin once by itself.
    let first = tokio::time::timeout(Duration::from_secs(10), events.desired.recv())
        .await?
        .context("desired")?;
    assert!(
        matches!(first, DesiredUpdate::Full(ref d) if d["$version"] == 1),
        "{first:?}"
    );
    let version = device.patch_reported(&json!({"fw": "3.1"})).await?;
    assert_eq!(version, 2);
    let twin = device.get_twin().await?;
    assert_eq!(twin.reported["fw"], "3.1");
    let patched = hub
        .http()
        .patch(format!("{}/twins/sdk-1", hub.url()))
        .bearer_auth(&token)
        .json(&json!({"properties": {"desired": {"interval": 5}}}))
        .send()
        .await?;
    assert!(patched.status().is_success());
    let update = tokio::time::timeout(Duration::from_secs(10), events.desired.recv())
        .await?
        .context("patch")?;
    assert_eq!(
        update,
        DesiredUpdate::Patch(json!({"interval": 5, "$version": 2}))
    );

    // A method call answered by the SDK's handler.
    let mut methods = events.methods;
    tokio::spawn(async move {
        while let Some(call) = methods.recv().await {
            let answer = json!({"echo": call.payload, "name": call.name});
            let _ = call.respond(200, &answer).await;
        }
    });
    let answer: Value = hub
        .http()
        .post(format!("{}/twins/sdk-1/methods", hub.url()))
        .bearer_auth(&token)
        .json(&json!({"methodName": "blink", "payload": {"times": 2}}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        answer,
        json!({"status": 200, "payload": {"echo": {"times": 2}, "name": "blink"}})
    );

    // A C2D message, completed.
    hub.http()
        .post(format!("{}/devices/sdk-1/messages/deviceBound", hub.url()))
        .bearer_auth(&token)
        .json(
            &json!({"body": "hi", "messageId": "c-1", "properties": {"k": "v"}, "ack": "positive"}),
        )
        .send()
        .await?;
    let message = tokio::time::timeout(Duration::from_secs(10), events.messages.recv())
        .await?
        .context("c2d")?;
    assert_eq!(message.body.as_ref(), b"hi");
    assert_eq!(message.message_id(), Some("c-1"));
    assert_eq!(message.property("k"), Some("v"));
    message.complete().await?;
    let feedback: Value = hub
        .http()
        .get(format!(
            "{}/messages/serviceBound/feedback?waitMs=10000",
            hub.url()
        ))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(feedback["records"][0]["statusCode"], "Success");
    device.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_restart_mid_stream_loses_no_acknowledged_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let mqtts = hub.endpoint("mqtts").context("mqtts")?;
    let key = create(&hub, &token, "streamer").await?;
    let (device, _events) = client(&hub, "streamer", &key)?;
    device.connected(Duration::from_secs(10)).await?;

    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut senders = Vec::new();
    for lane in 0..4 {
        let (device, acknowledged) = (device.clone(), Arc::clone(&acknowledged));
        senders.push(tokio::spawn(async move {
            for n in 0..150 {
                let id = format!("s{lane}-{n}");
                if device
                    .send_telemetry(Message::new(vec![0u8; 64]).with_id(id.clone()))
                    .await
                    .is_ok()
                    && let Ok(mut acked) = acknowledged.lock()
                {
                    acked.push(id);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(hub.stop().await?.success());
    let hub = HubOptions::new(dir.path())
        .mqtts(&mqtts.to_string())
        .start()
        .await?;
    for sender in senders {
        tokio::time::timeout(Duration::from_secs(120), sender).await??;
    }
    let acknowledged = acknowledged.lock().map(|a| a.clone()).unwrap_or_default();
    assert!(
        acknowledged.len() >= 550,
        "the client reconnected and kept sending: {} acked",
        acknowledged.len()
    );
    let stored = stored_message_ids(&hub, &token).await?;
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    device.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sas_token_is_renewed_before_it_expires() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let key = create(&hub, &token, "renewer").await?;
    let ca = std::fs::read_to_string(hub.data_dir().join("certs/ca.pem"))?;
    let port = hub.endpoint("mqtts").context("mqtts")?.port();
    let options = ClientOptions::new(
        "localhost",
        "renewer",
        Credentials::Sas {
            key,
            ttl: Duration::from_secs(4),
        },
    )
    .with_ca(&ca)
    .with_endpoint("localhost", port);
    let (device, _events) = DeviceClient::start(options)?;
    device.connected(Duration::from_secs(10)).await?;
    // Past the first token's expiry: the client reconnected with a fresh token at 80 %
    // of its lifetime, so the hub never had to close it for an expired credential.
    tokio::time::sleep(Duration::from_secs(6)).await;
    device
        .send_telemetry(Message::new("still here").with_id("after-renewal"))
        .await?;
    assert!(
        !hub.stderr().contains("CredentialExpired"),
        "the hub closed an expired connection:\n{}",
        hub.stderr()
    );
    let metrics = hub
        .http()
        .get(format!("{}/metrics", hub.url()))
        .send()
        .await?
        .text()
        .await?;
    let accepted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hub_mqtt_connections_accepted_total "))
        .and_then(|v| v.trim().parse().ok())
        .context("accepted counter")?;
    assert!(accepted >= 2, "renewal reconnects: {accepted} connections");
    device.close().await;
    Ok(())
}
