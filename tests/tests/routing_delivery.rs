//! Delivery guarantees, end to end with a real hub and a real HTTP receiver process:
//! a receiver answering 503 for 5 s then recovering gets every message, each
//! device's in order; a `kill -9` of the hub mid-delivery loses nothing acknowledged
//! (redeliveries after the restart are allowed and counted); a message refused past
//! `routing.retry_for_secs` goes to the `dead-letters` stream.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Result, ensure};
use hub_tests::webhook::{Received, Receiver, put_routing};
use hub_tests::{Hub, HubOptions};
use serde_json::{Value, json};

const JSON: &str = "$.ct=application%2Fjson&$.ce=utf-8";

fn config_json(url: &str) -> Value {
    json!({
        "endpoints": { "webhooks": [{ "name": "sink", "url": url }] },
        "routes": [{
            "name": "all", "source": "DeviceMessages", "condition": "true",
            "endpointNames": ["sink"], "isEnabled": true
        }]
    })
}

/// Publishes `per_device` QoS 1 messages `{"device", "seq"}` from each device, each
/// acknowledged before the next.
async fn publish(hub: &Hub, token: &str, devices: &[&str], per_device: u32) -> Result<()> {
    let mut clients = Vec::new();
    for id in devices {
        let key = hub.create_device(token, id).await?;
        clients.push((id.to_string(), hub.connect_device(id, &key, true).await?));
    }
    for seq in 0..per_device {
        for (id, client) in &mut clients {
            let topic = format!("devices/{id}/messages/events/{JSON}");
            let body = json!({ "device": id, "seq": seq }).to_string();
            client.publish_acked(&topic, body.as_bytes()).await?;
        }
    }
    Ok(())
}

/// Each device's sequence numbers in the order of their first arrival, and how many
/// arrivals were redeliveries.
fn per_device(received: &Received) -> (BTreeMap<String, Vec<u64>>, usize) {
    let mut seen = BTreeSet::new();
    let mut order: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut duplicates = 0;
    for (_, event) in &received.events {
        let body = &event["data"]["body"];
        let device = body["device"].as_str().unwrap_or_default().to_string();
        let seq = body["seq"].as_u64().unwrap_or(u64::MAX);
        if seen.insert((device.clone(), seq)) {
            order.entry(device).or_default().push(seq);
        } else {
            duplicates += 1;
        }
    }
    (order, duplicates)
}

fn distinct(received: &Received) -> usize {
    per_device(received).0.values().map(Vec::len).sum()
}

#[tokio::test]
async fn a_receiver_failing_for_five_seconds_gets_everything_each_device_in_order() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = HubOptions::new(dir.path()).start().await?;
    let token = hub.owner_token().await?;
    let receiver = Receiver::start(Duration::from_secs(5)).await?;
    put_routing(&hub, &token, &config_json(&receiver.url(""))).await?;
    let devices = ["r-a", "r-b", "r-c", "r-d"];
    let started = std::time::Instant::now();
    publish(&hub, &token, &devices, 25).await?;
    // Publishing is not held up by the failing receiver.
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "ingest waited for the endpoint: {:?}",
        started.elapsed()
    );
    let received = receiver
        .wait_for(Duration::from_secs(60), |r| distinct(r) >= 100)
        .await?;
    ensure!(received.refused > 0, "the receiver never refused anything");
    let (order, duplicates) = per_device(&received);
    for device in devices {
        assert_eq!(
            order[device],
            (0..25).collect::<Vec<u64>>(),
            "{device} out of order"
        );
    }
    eprintln!(
        "refused {} posts, {duplicates} duplicate deliveries",
        received.refused
    );
    let metrics = hub.metrics().await?;
    let retries = metrics
        .lines()
        .find(|l| l.starts_with("hub_routing_retries_total{endpoint=\"sink\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    ensure!(retries > 0, "no retries counted:\n{metrics}");
    Ok(())
}

#[tokio::test]
async fn a_kill_9_mid_delivery_loses_nothing_acknowledged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = HubOptions::new(dir.path()).start().await?;
    let token = hub.owner_token().await?;
    let receiver = Receiver::start(Duration::ZERO).await?;
    // Slow answers keep delivery going while the hub is killed.
    receiver.control(0.0, 503, 15).await?;
    put_routing(&hub, &token, &config_json(&receiver.url(""))).await?;
    let devices = ["k-a", "k-b", "k-c"];
    publish(&hub, &token, &devices, 100).await?;
    let before = receiver
        .wait_for(Duration::from_secs(30), |r| distinct(r) >= 40)
        .await?;
    hub.kill().await?;
    let delivered_before = distinct(&before);
    ensure!(
        delivered_before < 300,
        "everything was delivered before the kill"
    );
    receiver.control(0.0, 503, 0).await?;
    let hub = HubOptions::new(dir.path()).start().await?;
    let received = receiver
        .wait_for(Duration::from_secs(60), |r| distinct(r) >= 300)
        .await?;
    let (order, duplicates) = per_device(&received);
    for device in devices {
        assert_eq!(
            order[device],
            (0..100).collect::<Vec<u64>>(),
            "{device} lost or reordered messages"
        );
    }
    eprintln!(
        "kill -9 after {delivered_before} of 300 delivered: {duplicates} redelivered after the restart"
    );
    hub.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_message_refused_past_retry_for_goes_to_the_dead_letter_stream() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        "[routing]\nretry_for_secs = 2\nmax_backoff_secs = 1\n",
    )?;
    let hub = HubOptions::new(&dir.path().join("data"))
        .args(["--config", config.to_str().unwrap_or_default()])
        .start()
        .await?;
    let token = hub.owner_token().await?;
    // Refuses for an hour: every attempt fails.
    let receiver = Receiver::start(Duration::from_secs(3600)).await?;
    put_routing(&hub, &token, &config_json(&receiver.url(""))).await?;
    publish(&hub, &token, &["dl-a"], 3).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let dead = hub_tests::webhook::read_stream(&hub, &token, "dead-letters").await?;
        if dead.len() >= 3 || tokio::time::Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let seqs: Vec<u64> = dead
        .iter()
        .map(|m| m["body"]["seq"].as_u64().unwrap_or(u64::MAX))
        .collect();
    assert_eq!(seqs, vec![0, 1, 2], "{dead:?}");
    assert_eq!(dead[0]["properties"]["deadLetterEndpoint"], "sink");
    assert!(
        dead[0]["properties"]["deadLetterReason"]
            .as_str()
            .unwrap_or_default()
            .contains("503")
    );
    assert_eq!(dead[0]["deviceId"], "dl-a");
    let metrics = hub.metrics().await?;
    assert!(
        metrics.contains("hub_routing_dead_lettered_total{endpoint=\"sink\"} 3"),
        "{metrics}"
    );
    assert_eq!(receiver.received().await?.events.len(), 0);
    Ok(())
}
