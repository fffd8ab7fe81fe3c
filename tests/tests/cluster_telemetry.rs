//! Cluster mode (issue 12), telemetry: hubs started with `--cluster` keep telemetry
//! and consumer-group checkpoints in a real 3-node NATS JetStream cluster (R3).
//! Telemetry sent through hub A is read through hub B; checkpoints survive a hub
//! restart; and SIGKILLing a NATS node while 20 devices publish QoS 1 loses no
//! acknowledged message: publishing resumes within 2 s when the node led nothing and
//! within 10 s when it led the telemetry stream, and the node catches up on restart.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hub_tests::Hub;
use hub_tests::nats::NatsCluster;
use rumqttc::mqttbytes::v4::Packet;
use serde_json::{Value, json};
use tokio::time::Instant;

/// The telemetry stream's name (DESIGN section 4).
const STREAM: &str = "telemetry";

async fn cluster_hub(dir: &std::path::Path, cluster: &NatsCluster) -> Result<Hub> {
    cluster.start_hub(dir).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_sent_through_one_hub_is_read_through_another() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let result = async {
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let a = cluster_hub(dir_a.path(), &cluster).await?;
        let b = cluster_hub(dir_b.path(), &cluster).await?;
        let token_a = a.owner_token().await?;
        let token_b = b.owner_token().await?;
        let key = a.create_device(&token_a, "meter-1").await?;
        let mut device = a.connect_device("meter-1", &key, true).await?;
        for n in 0..50 {
            device
                .publish_acked(
                    "devices/meter-1/messages/events/%24.ct=application%2Fjson&kind=reading",
                    json!({ "n": n }).to_string().as_bytes(),
                )
                .await?;
        }
        let messages = b
            .read_telemetry(&token_b)
            .await
            .with_context(|| format!("hub B's log:\n{}", b.stderr()))?;
        let numbers: Vec<u64> = messages
            .iter()
            .map(|m| m["body"]["n"].as_u64().context("body.n"))
            .collect::<Result<_>>()?;
        ensure!(
            numbers == (0..50).collect::<Vec<u64>>(),
            "read through B, in order: {numbers:?}"
        );
        let first = &messages[0];
        ensure!(first["deviceId"] == "meter-1", "{first}");
        ensure!(first["properties"]["kind"] == "reading", "{first}");
        // Offsets increase along the partition and nextOffset continues after the last.
        let offsets: Vec<u64> = messages
            .iter()
            .filter_map(|m| m["offset"].as_u64())
            .collect();
        ensure!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");

        // A checkpoint set through A is read through B, and outlives A's restart.
        let info: Value = b
            .http()
            .get(format!("{}/streams/telemetry", b.url()))
            .bearer_auth(&token_b)
            .send()
            .await?
            .json()
            .await?;
        let with_data = info["partitions"]
            .as_array()
            .context("partitions")?
            .iter()
            .find(|p| p["lastOffset"].as_i64().unwrap_or(-1) >= 0)
            .context("a partition with data")?;
        let p = with_data["id"].as_u64().context("id")?;
        let middle = offsets[25];
        let put = a
            .http()
            .put(format!(
                "{}/streams/telemetry/consumergroups/billing/partitions/{p}/checkpoint",
                a.url()
            ))
            .bearer_auth(&token_a)
            .json(&json!({ "offset": middle }))
            .send()
            .await?;
        ensure!(put.status().is_success(), "checkpoint: {}", put.status());
        a.stop().await?;
        let a = cluster_hub(dir_a.path(), &cluster).await?;
        for (hub, token) in [(&a, a.owner_token().await?), (&b, token_b.clone())] {
            let page: Value = hub
                .http()
                .get(format!(
                    "{}/streams/telemetry/partitions/{p}/messages?consumerGroup=billing&max=1000",
                    hub.url()
                ))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            let got = page["messages"].as_array().context("messages")?;
            ensure!(
                got.len() == 25 && got[0]["body"]["n"] == 25,
                "from the checkpoint: {page}"
            );
        }

        // `hub cluster status` names the NATS nodes and the telemetry stream's leader
        // and replicas.
        let out = b.cli(&["cluster", "status", "--json"]).await?;
        ensure!(out.status.success(), "cluster status: {}", out.stderr);
        let status: Value = serde_json::from_str(&out.stdout)?;
        ensure!(
            status["nats_nodes"] == json!(["n0", "n1", "n2"]),
            "{status}"
        );
        let telemetry = status["streams"]
            .as_array()
            .context("streams")?
            .iter()
            .find(|s| s["name"] == STREAM)
            .context("the telemetry stream")?;
        ensure!(
            telemetry["replicas"] == 3
                && telemetry["leader"].is_string()
                && telemetry["peers"].as_array().map(Vec::len) == Some(3),
            "{telemetry}"
        );
        let table = b.cli(&["cluster", "status"]).await?;
        ensure!(table.stdout.contains("telemetry"), "{}", table.stdout);

        // Long-poll through B wakes when A stores a message.
        let from = offsets[49] + 1;
        let poll = {
            let (http, url, token) = (b.http().clone(), b.url(), token_b.clone());
            tokio::spawn(async move {
                let page: Value = http
                    .get(format!(
                        "{url}/streams/telemetry/partitions/{p}/messages?from={from}&waitMs=20000"
                    ))
                    .bearer_auth(&token)
                    .send()
                    .await?
                    .json()
                    .await?;
                anyhow::Ok(page)
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(device);
        let mut device = a.connect_device("meter-1", &key, true).await?;
        device
            .publish_acked("devices/meter-1/messages/events/", b"late")
            .await?;
        let page = tokio::time::timeout(Duration::from_secs(15), poll).await???;
        let got = page["messages"].as_array().context("messages")?;
        ensure!(got.len() == 1, "long-poll: {page}");
        ensure!(got[0]["offset"].as_u64() >= Some(from), "{page}");
        Ok(())
    }
    .await;
    cluster.with_logs(result)
}

/// What the publishing devices saw.
#[derive(Default)]
struct Published {
    /// Every acknowledged message id.
    acked: BTreeSet<String>,
    /// When each PUBACK arrived.
    ack_times: Vec<Instant>,
}

/// One device publishing QoS 1 messages one after another until `stop`.
async fn publish_until(
    hub: &Hub,
    id: String,
    key: String,
    stop: Arc<AtomicBool>,
    published: Arc<Mutex<Published>>,
) -> Result<()> {
    let mut client = hub.connect_device(&id, &key, true).await?;
    let topic = format!("devices/{id}/messages/events/");
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let body = format!("{id}/{n}");
        let pkid = client.publish_qos1(&topic, body.as_bytes()).await?;
        // A PUBACK may wait out a leader election: up to three receive timeouts.
        let mut waited = 0;
        loop {
            match client.recv().await {
                Ok(Some(Packet::PubAck(ack))) if ack.pkid == pkid => break,
                Ok(Some(other)) => bail!("{id}: expected PUBACK, got {other:?}"),
                Ok(None) => bail!("{id}: the hub closed the connection"),
                Err(err) if waited < 3 => {
                    waited += 1;
                    tracing_note(&id, &err);
                }
                Err(err) => return Err(err.context(format!("{id}: no PUBACK"))),
            }
        }
        let mut published = published.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        published.acked.insert(body);
        published.ack_times.push(Instant::now());
        n += 1;
    }
    Ok(())
}

fn tracing_note(id: &str, err: &anyhow::Error) {
    eprintln!("{id}: still waiting for a PUBACK ({err})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_nats_node_loses_no_acknowledged_telemetry() -> Result<()> {
    let mut cluster = NatsCluster::start(3).await?;
    let result = losing_a_node(&mut cluster).await;
    cluster.with_logs(result)
}

async fn losing_a_node(cluster: &mut NatsCluster) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Arc::new(cluster_hub(dir.path(), cluster).await?);
    let token = hub.owner_token().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(Mutex::new(Published::default()));
    let mut devices = Vec::new();
    for i in 0..20 {
        let id = format!("pump-{i:02}");
        let key = hub.create_device(&token, &id).await?;
        let (hub, stop, published) = (Arc::clone(&hub), Arc::clone(&stop), Arc::clone(&published));
        devices.push(tokio::spawn(async move {
            publish_until(&hub, id, key, stop, published).await
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A follower: publishing barely pauses. The telemetry stream's leader: publishing
    // stalls until a new one is elected.
    let stalls = cluster
        .kill_follower_then_leader(STREAM, || {
            published
                .lock()
                .map(|p| p.ack_times.clone())
                .unwrap_or_default()
        })
        .await?;
    let (follower_gap, leader_gap, leader) =
        (stalls.follower_pause, stalls.leader_pause, stalls.leader);
    stop.store(true, Ordering::Relaxed);
    for device in devices {
        device.await??;
    }
    eprintln!(
        "stall after killing a follower: {follower_gap:?}; after killing the telemetry stream's leader: {leader_gap:?} (first PUBACK {:?} after the kill)",
        stalls.first_ack_after_leader_kill
    );

    // Nothing acknowledged is lost.
    let acked = published
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .acked
        .clone();
    let stored: Vec<String> = hub
        .read_telemetry(&token)
        .await
        .with_context(|| format!("the hub's log:\n{}", hub.stderr()))?
        .iter()
        .filter_map(|m| {
            let bytes = STANDARD.decode(m["body"].as_str()?).ok()?;
            String::from_utf8(bytes).ok()
        })
        .collect();
    let stored_set: BTreeSet<String> = stored.iter().cloned().collect();
    let lost: Vec<&String> = acked.difference(&stored_set).collect();
    ensure!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    ensure!(
        stored.len() == stored_set.len(),
        "{} duplicates stored",
        stored.len() - stored_set.len()
    );
    ensure!(
        follower_gap < Duration::from_secs(2),
        "publishing paused {follower_gap:?} when a follower died; the hub's log:\n{}",
        hub.stderr()
    );
    ensure!(
        leader_gap < Duration::from_secs(10),
        "publishing paused {leader_gap:?} when the stream leader died"
    );

    // The killed node comes back and catches up.
    cluster.restart(leader).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let copy = cluster.stream_detail(leader, STREAM).await?;
        let messages = copy.as_ref().and_then(|d| d["state"]["messages"].as_u64());
        if messages == Some(stored.len() as u64) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the restarted node holds {messages:?} of {} messages",
            stored.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
