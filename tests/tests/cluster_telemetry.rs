//! Cluster mode (issue 12), telemetry: hubs started with `--cluster` keep telemetry
//! (a stream per partition, issue 28) and consumer-group checkpoints in a real 3-node
//! NATS JetStream cluster (R3). Telemetry sent through hub A is read through hub B;
//! checkpoints survive a hub restart; the partitions' stream leaders are spread over
//! the nodes; and SIGKILLing a NATS node while 20 devices publish QoS 1 loses no
//! acknowledged message: a partition's publishing resumes within 2 s when the node
//! did not lead its stream and within 10 s when it did, and the node catches up on
//! restart.

use std::collections::{BTreeMap, BTreeSet};
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

/// Telemetry partitions (the default).
const PARTITIONS: u32 = 4;

/// The stream of a telemetry partition (DESIGN section 4).
fn stream(partition: u32) -> String {
    format!("telemetry-{partition}")
}

fn partition_of(device: &str) -> u32 {
    hub::telemetry::partitioner::Partitioner::new(PARTITIONS).partition(device)
}

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

        // `hub cluster status` names the NATS nodes and each partition stream's
        // leader and replicas; the leaders are spread over the three nodes.
        let out = b.cli(&["cluster", "status", "--json"]).await?;
        ensure!(out.status.success(), "cluster status: {}", out.stderr);
        let status: Value = serde_json::from_str(&out.stdout)?;
        ensure!(
            status["nats_nodes"] == json!(["n0", "n1", "n2"]),
            "{status}"
        );
        let mut leaders = BTreeSet::new();
        for partition in 0..PARTITIONS {
            let telemetry = status["streams"]
                .as_array()
                .context("streams")?
                .iter()
                .find(|s| s["name"] == stream(partition))
                .with_context(|| format!("the stream of partition {partition}: {status}"))?;
            ensure!(
                telemetry["replicas"] == 3
                    && telemetry["leader"].is_string()
                    && telemetry["peers"].as_array().map(Vec::len) == Some(3),
                "{telemetry}"
            );
            leaders.insert(telemetry["leader"].to_string());
        }
        ensure!(
            leaders.len() == 3,
            "leaders spread over the nodes: {leaders:?}"
        );
        ensure!(
            !status["streams"]
                .as_array()
                .context("streams")?
                .iter()
                .any(|s| s["name"] == "telemetry"),
            "no shared stream in a new cluster: {status}"
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
    /// When each PUBACK arrived, by the device's partition.
    ack_times: BTreeMap<u32, Vec<Instant>>,
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
        published
            .ack_times
            .entry(partition_of(&id))
            .or_default()
            .push(Instant::now());
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

    // The partition of the first device, watched through its stream: killing a
    // node that does not lead that stream barely pauses its publishing; killing the
    // stream's leader stalls it until a new one is elected.
    let watched = partition_of("pump-00");
    let stalls = cluster
        .kill_follower_then_leader(&stream(watched), || {
            published
                .lock()
                .map(|p| p.ack_times.get(&watched).cloned().unwrap_or_default())
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
        "partition {watched}: stall after killing a follower of its stream: {follower_gap:?}; after killing its stream's leader: {leader_gap:?} (first PUBACK {:?} after the kill)",
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

    // The killed node comes back and catches up: its copies of the partitions'
    // streams hold every stored message.
    cluster.restart(leader).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut messages = 0;
        for partition in 0..PARTITIONS {
            let copy = cluster.stream_detail(leader, &stream(partition)).await?;
            messages += copy
                .as_ref()
                .and_then(|d| d["state"]["messages"].as_u64())
                .unwrap_or(0);
        }
        if messages == stored.len() as u64 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the restarted node holds {messages} of {} messages",
            stored.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// A cluster created before issue 28 has the one stream `telemetry` (subjects
/// `telemetry.*`): a newer hub keeps writing and reading it. Once the operator removes
/// it, the next start creates a stream per partition, starting after the highest
/// consumer-group checkpoint so that a group that had read everything goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_the_shared_stream_keeps_it_until_it_is_removed() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let result = async {
        let client = async_nats::connect(cluster.urls().as_slice()).await?;
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "telemetry".to_string(),
            subjects: vec!["telemetry.*".to_string()],
            num_replicas: 3,
            storage: async_nats::jetstream::stream::StorageType::File,
            max_bytes: 268_435_456,
            ..Default::default()
        })
        .await?;
        let dir = tempfile::tempdir()?;
        let hub = cluster_hub(dir.path(), &cluster).await?;
        let token = hub.owner_token().await?;
        let key = hub.create_device(&token, "old-meter").await?;
        let mut device = hub.connect_device("old-meter", &key, true).await?;
        for n in 0..10 {
            device
                .publish_acked(
                    "devices/old-meter/messages/events/",
                    format!("{n}").as_bytes(),
                )
                .await?;
        }
        drop(device);
        let messages = hub.read_telemetry(&token).await?;
        ensure!(messages.len() == 10, "{messages:?}");
        let shared = js.get_stream("telemetry").await?.get_info().await?;
        ensure!(shared.state.messages == 10, "{:?}", shared.state);
        ensure!(
            js.get_stream(stream(0)).await.is_err(),
            "no partition streams beside the shared one"
        );

        // A group has read everything; the operator removes the shared stream.
        let p = partition_of("old-meter");
        let last = messages
            .last()
            .and_then(|m| m["offset"].as_u64())
            .context("offset")?;
        let put = hub
            .http()
            .put(format!(
                "{}/streams/telemetry/consumergroups/billing/partitions/{p}/checkpoint",
                hub.url()
            ))
            .bearer_auth(&token)
            .json(&json!({ "offset": last + 1 }))
            .send()
            .await?;
        ensure!(put.status().is_success(), "checkpoint: {}", put.status());
        hub.stop().await?;
        js.delete_stream("telemetry").await?;

        let hub = cluster_hub(dir.path(), &cluster).await?;
        let token = hub.owner_token().await?;
        for partition in 0..PARTITIONS {
            js.get_stream(stream(partition))
                .await
                .with_context(|| format!("the stream of partition {partition}"))?;
        }
        let read = |path: String| {
            let (http, url, token) = (hub.http().clone(), hub.url(), token.clone());
            async move {
                let response = http
                    .get(format!("{url}{path}"))
                    .bearer_auth(&token)
                    .send()
                    .await?;
                ensure!(
                    response.status().is_success(),
                    "{path}: {}",
                    response.status()
                );
                anyhow::Ok(response.json::<Value>().await?)
            }
        };
        let page = read(format!(
            "/streams/telemetry/partitions/{p}/messages?consumerGroup=billing"
        ))
        .await?;
        ensure!(
            page["messages"] == json!([]) && page["nextOffset"] == last + 1,
            "the group goes on where it was: {page}"
        );
        let mut device = hub.connect_device("old-meter", &key, true).await?;
        device
            .publish_acked("devices/old-meter/messages/events/", b"after")
            .await?;
        let page = read(format!(
            "/streams/telemetry/partitions/{p}/messages?consumerGroup=billing"
        ))
        .await?;
        let got = page["messages"].as_array().context("messages")?;
        ensure!(
            got.len() == 1 && got[0]["offset"] == last + 1,
            "the first new message follows the group's checkpoint: {page}"
        );
        // Later starts keep the streams as they were created.
        drop(device);
        hub.stop().await?;
        let hub = cluster_hub(dir.path(), &cluster).await?;
        let token = hub.owner_token().await?;
        let messages = hub
            .get_json(
                &token,
                &format!(
                    "/streams/telemetry/partitions/{p}/messages?from={}",
                    last + 1
                ),
            )
            .await?;
        ensure!(
            messages["messages"].as_array().map(Vec::len) == Some(1),
            "after another restart: {messages}"
        );
        Ok(())
    }
    .await;
    cluster.with_logs(result)
}
