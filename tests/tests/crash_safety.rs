//! Crash safety: the hub is killed with SIGKILL while devices publish QoS 1; after a
//! restart on the same data dir, every message whose PUBACK a device received is
//! readable. Nothing acknowledged is lost. Damaged segment indexes and records found
//! after the restart lose only the damaged records.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hub_tests::mqtt::{self, azure_username, sas};
use hub_tests::{Hub, HubOptions};
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

/// Starts 8 devices publishing until the hub is killed; returns the ids of the
/// messages acknowledged before the SIGKILL.
async fn publish_then_kill(hub: Hub) -> Result<HashSet<String>> {
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
    Ok(acked)
}

/// The message ids of every readable message of every partition.
async fn stored_ids(hub: &Hub) -> Result<HashSet<String>> {
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
    Ok(stored)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_survives_a_sigkill() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let acked = publish_then_kill(Hub::start(dir.path()).await?).await?;

    let hub = Hub::start(dir.path()).await?;
    let stored = stored_ids(&hub).await?;
    let lost: Vec<&String> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    Ok(())
}

/// The sorted segment files (`.log`) of one partition directory.
fn segment_files(partition: &Path) -> Result<Vec<PathBuf>> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(partition)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    logs.retain(|path| path.extension().is_some_and(|e| e == "log"));
    logs.sort();
    Ok(logs)
}

/// Flips a bit in the body of the first record of `segment` and returns that
/// message's id (read from the record's metadata, which stays intact).
fn damage_first_record(segment: &Path) -> Result<String> {
    let mut bytes = std::fs::read(segment)?;
    let len = u32::from_le_bytes(bytes[0..4].try_into()?) as usize;
    let payload = 24..24 + len;
    let meta = &bytes[payload.clone()];
    // The device id (`crash-N`) comes first; the message id is `crash-N-M`.
    let id = (0..meta.len())
        .filter(|&at| meta[at..].starts_with(b"crash-"))
        .filter_map(|at| {
            let end = at + meta[at..].iter().position(|&b| b == b'"')?;
            String::from_utf8(meta[at..end].to_vec()).ok()
        })
        .find(|token| token.matches('-').count() == 2)
        .context("a message id in the record")?;
    bytes[payload.end - 1] ^= 0x01;
    std::fs::write(segment, bytes)?;
    Ok(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_segment_indexes_and_records_after_a_sigkill_lose_only_the_damaged_records()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, "[telemetry]\nsegment_bytes = 4096\n")?;
    let config = config.to_string_lossy().into_owned();
    let data = dir.path().join("data");
    let start = || {
        HubOptions::new(&data)
            .args(["--config", config.as_str()])
            .start()
    };
    let acked = publish_then_kill(start().await?).await?;

    // In every partition with sealed segments: the first segment's index gets a
    // flipped bit and its first record too (the walk that replaces the index must
    // find it), the second index is torn, the third deleted; and the fourth segment
    // keeps its index but loses a record (bit rot after sealing: the read that
    // meets it must skip it).
    let mut damaged = HashSet::new();
    let mut partitions_damaged = 0;
    for partition in 0..4 {
        let logs = segment_files(&data.join(format!("telemetry/p{partition}")))?;
        if logs.len() < 5 {
            continue;
        }
        partitions_damaged += 1;
        let index = |n: usize| logs[n].with_extension("idx");
        let mut bytes = std::fs::read(index(0))?;
        bytes[30] ^= 0x08;
        std::fs::write(index(0), bytes)?;
        damaged.insert(damage_first_record(&logs[0])?);
        let bytes = std::fs::read(index(1))?;
        std::fs::write(index(1), &bytes[..bytes.len() / 2])?;
        std::fs::remove_file(index(2))?;
        damaged.insert(damage_first_record(&logs[3])?);
    }
    assert!(partitions_damaged > 0, "some partition has sealed segments");

    let hub = start().await?;
    let stored = stored_ids(&hub).await?;
    let lost: HashSet<&String> = acked.difference(&stored).collect();
    assert!(
        lost.iter().all(|id| damaged.contains(*id)),
        "acknowledged messages lost beyond the {} damaged records: {:?}",
        damaged.len(),
        lost.iter()
            .filter(|id| !damaged.contains(**id))
            .take(5)
            .collect::<Vec<_>>()
    );
    assert!(
        damaged.iter().all(|id| !stored.contains(id)),
        "a damaged record was served"
    );
    let log = hub.stderr();
    assert!(log.contains("not using a segment's index"), "{log}");
    assert!(
        log.contains("skipping a damaged record found by a read"),
        "{log}"
    );
    // Every sealed segment has a usable index again for the next start.
    for partition in 0..4 {
        let logs = segment_files(&data.join(format!("telemetry/p{partition}")))?;
        for sealed in logs.iter().rev().skip(1) {
            assert!(
                sealed.with_extension("idx").exists(),
                "{}",
                sealed.display()
            );
        }
    }
    Ok(())
}
