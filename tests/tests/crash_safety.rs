//! Crash safety: the hub is killed with SIGKILL while devices publish QoS 1; after a
//! restart on the same data dir, every message whose PUBACK a device received is
//! readable. Nothing acknowledged is lost.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use hub_tests::Hub;
use hub_tests::mqtt::{self, azure_username, sas};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use serde_json::{Value, json};

/// Publishes with up to 10 in flight until the connection dies; returns the message
/// ids whose PUBACK arrived.
async fn publish_until_killed(
    addr: std::net::SocketAddr,
    id: String,
    key: String,
) -> Result<HashSet<String>> {
    let mut client = mqtt::tcp(addr).await?;
    let ack = client
        .connect(
            &id,
            Some(&azure_username("localhost", &id)),
            Some(&sas("localhost", &id, &key, 600)?),
            true,
        )
        .await?;
    anyhow::ensure!(ack.code == ConnectReturnCode::Success);
    let mut pending: HashMap<u16, String> = HashMap::new();
    let mut acked = HashSet::new();
    let mut seq = 0u64;
    loop {
        while pending.len() < 10 {
            let mid = format!("{id}-{seq}");
            let topic = format!("devices/{id}/messages/events/%24.mid={mid}");
            match client.publish_qos1(&topic, &[0u8; 256]).await {
                Ok(pkid) => {
                    pending.insert(pkid, mid);
                    seq += 1;
                }
                Err(_) => return Ok(acked),
            }
        }
        match client.recv().await {
            Ok(Some(Packet::PubAck(ack))) => {
                if let Some(mid) = pending.remove(&ack.pkid) {
                    acked.insert(mid);
                }
            }
            // Killed: the connection is gone.
            _ => return Ok(acked),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_survives_a_sigkill() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let mqtt_addr = hub.endpoint("mqtt").context("mqtt")?;
    let mut publishers = Vec::new();
    for n in 0..8 {
        let id = format!("crash-{n}");
        let device: Value = hub
            .http()
            .put(format!("{}/devices/{id}", hub.url()))
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
            .await?
            .json()
            .await?;
        let key = device["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .context("key")?
            .to_string();
        publishers.push(tokio::spawn(publish_until_killed(mqtt_addr, id, key)));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    hub.kill().await?;
    let mut acked = HashSet::new();
    for publisher in publishers {
        acked.extend(publisher.await??);
    }
    assert!(
        acked.len() > 100,
        "the devices got going: {} acked",
        acked.len()
    );

    let hub = Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let mut stored = HashSet::new();
    for partition in 0..4 {
        let mut from = 0u64;
        loop {
            let page: Value = hub
                .http()
                .get(format!(
                    "{}/streams/telemetry/partitions/{partition}/messages?from={from}&max=1000",
                    hub.url()
                ))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            let messages = page["messages"].as_array().context("messages")?;
            if messages.is_empty() {
                break;
            }
            for message in messages {
                stored.insert(
                    message["systemProperties"]["message-id"]
                        .as_str()
                        .context("mid")?
                        .to_string(),
                );
            }
            from = page["nextOffset"].as_u64().context("nextOffset")?;
        }
    }
    let lost: Vec<&String> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    Ok(())
}
