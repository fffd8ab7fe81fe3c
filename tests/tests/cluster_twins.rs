//! Cluster mode (issue 12), twins: hubs started with `--cluster` keep device twins
//! in the replicated KV bucket `hub-twins` of a real 3-node NATS JetStream cluster.
//! A twin written through hub A reads the same (version, etag, history) through hub
//! B; a device on B gets the desired patches made through A; concurrent patches
//! through both hubs lose nothing; twins outlive a hub restart; and SIGKILLing a NATS
//! node while patches go on loses no acknowledged patch, with writes stalling less
//! than 2 s (a follower) or 10 s (the bucket's leader).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use hub_tests::Hub;
use hub_tests::mqtt::RawClient;
use hub_tests::nats::NatsCluster;
use reqwest::StatusCode;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The stream behind the twins bucket.
const STREAM: &str = "KV_hub-twins";

async fn cluster_hub(dir: &std::path::Path, cluster: &NatsCluster) -> Result<Hub> {
    cluster.start_hub(dir).await
}

/// A hub and its owner token.
struct Api {
    hub: Hub,
    token: String,
}

impl Api {
    async fn start(dir: &std::path::Path, cluster: &NatsCluster) -> Result<Self> {
        let hub = cluster_hub(dir, cluster).await?;
        let token = hub.owner_token().await?;
        Ok(Self { hub, token })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.hub.url())
    }

    async fn twin(&self, id: &str) -> Result<Value> {
        let response = self
            .hub
            .http()
            .get(self.url(&format!("/twins/{id}")))
            .bearer_auth(&self.token)
            .send()
            .await?;
        ensure!(
            response.status() == StatusCode::OK,
            "GET twin {id}: {}",
            response.status()
        );
        Ok(response.json().await?)
    }

    async fn patch(&self, id: &str, body: &Value, etag: Option<&str>) -> Result<reqwest::Response> {
        let mut request = self
            .hub
            .http()
            .patch(self.url(&format!("/twins/{id}")))
            .bearer_auth(&self.token)
            .json(body);
        if let Some(etag) = etag {
            request = request.header("If-Match", etag);
        }
        Ok(request.send().await?)
    }

    /// Waits (bounded) until this hub's registry shows device `id`, created through
    /// another hub (the registry is shared; each hub follows it).
    async fn knows(&self, id: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .hub
                .http()
                .get(self.url(&format!("/devices/{id}")))
                .bearer_auth(&self.token)
                .send()
                .await?;
            if found.status() == StatusCode::OK {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "device {id} unknown to this hub: {}",
                found.status()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits for the next desired-property push, acknowledging it.
async fn next_desired(device: &mut RawClient<TcpStream>) -> Result<(String, Value)> {
    loop {
        match device.recv().await? {
            Some(Packet::Publish(push)) => {
                if push.qos == QoS::AtLeastOnce {
                    device.send(&Packet::PubAck(PubAck::new(push.pkid))).await?;
                }
                if push
                    .topic
                    .starts_with("$iothub/twin/PATCH/properties/desired/")
                {
                    return Ok((push.topic, serde_json::from_slice(&push.payload)?));
                }
            }
            Some(_) => {}
            None => bail!("the hub closed the device connection"),
        }
    }
}

/// Sends a twin request over MQTT and returns the answer's topic.
async fn twin_request(
    device: &mut RawClient<TcpStream>,
    topic: &str,
    body: &[u8],
) -> Result<String> {
    let mut publish = Publish::new(topic, QoS::AtMostOnce, body.to_vec());
    publish.pkid = 0;
    device.send(&Packet::Publish(publish)).await?;
    loop {
        match device.recv().await? {
            Some(Packet::Publish(reply)) if reply.topic.starts_with("$iothub/twin/res/") => {
                return Ok(reply.topic);
            }
            Some(Packet::Publish(other)) if other.qos == QoS::AtLeastOnce => {
                device
                    .send(&Packet::PubAck(PubAck::new(other.pkid)))
                    .await?;
            }
            Some(_) => {}
            None => bail!("the hub closed the device connection"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twin_written_through_one_hub_is_the_same_twin_through_another() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let result = async {
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let a = Api::start(dir_a.path(), &cluster).await?;
        let b = Api::start(dir_b.path(), &cluster).await?;
        let key = a.hub.create_device(&a.token, "thermo").await?;
        // Through B at once: the device behind a twin is read from the store, not
        // from B's registry feed, which may not have delivered the creation yet.
        let early = b.twin("thermo").await?;
        ensure!(early["deviceId"] == "thermo", "{early}");
        b.knows("thermo").await?;

        // A device connected to B subscribes to desired patches.
        let mut device = b.hub.connect_device("thermo", &key, true).await?;
        device
            .subscribe(&[
                "$iothub/twin/PATCH/properties/desired/#",
                "$iothub/twin/res/#",
            ])
            .await?;

        let patched = a
            .patch(
                "thermo",
                &json!({"properties": {"desired": {"target": 21}}, "tags": {"room": "kitchen"}}),
                None,
            )
            .await?;
        ensure!(
            patched.status() == StatusCode::OK,
            "PATCH through A: {}",
            patched.status()
        );
        let through_a: Value = patched.json().await?;
        let through_b = b.twin("thermo").await?;
        for field in ["version", "etag", "tags", "properties"] {
            ensure!(
                through_a[field] == through_b[field],
                "{field} differs: A {through_a} B {through_b}"
            );
        }
        ensure!(
            through_b["properties"]["desired"]["$version"] == 2,
            "{through_b}"
        );

        // B's device gets the patch made through A.
        let (topic, body) =
            tokio::time::timeout(Duration::from_secs(10), next_desired(&mut device))
                .await
                .context("no desired patch reached the device on B")??;
        ensure!(
            topic == "$iothub/twin/PATCH/properties/desired/?$version=2",
            "{topic}"
        );
        ensure!(body == json!({"target": 21, "$version": 2}), "{body}");

        // An etag read through A is a valid If-Match through B (and a stale one is not).
        let etag = format!("\"{}\"", through_a["etag"].as_str().context("etag")?);
        let next = b
            .patch(
                "thermo",
                &json!({"properties": {"desired": {"mode": "eco"}}}),
                Some(&etag),
            )
            .await?;
        ensure!(
            next.status() == StatusCode::OK,
            "If-Match through B: {}",
            next.status()
        );
        let stale = a
            .patch("thermo", &json!({"tags": {"room": "attic"}}), Some(&etag))
            .await?;
        ensure!(
            stale.status() == StatusCode::PRECONDITION_FAILED,
            "stale If-Match through A: {}",
            stale.status()
        );
        let (topic, body) =
            tokio::time::timeout(Duration::from_secs(10), next_desired(&mut device))
                .await
                .context("no second desired patch")??;
        ensure!(
            topic == "$iothub/twin/PATCH/properties/desired/?$version=3",
            "{topic}"
        );
        ensure!(body == json!({"mode": "eco", "$version": 3}), "{body}");
        drop(device);

        // Reported properties patched by a device on A are visible through B.
        let mut on_a = a.hub.connect_device("thermo", &key, true).await?;
        on_a.subscribe(&["$iothub/twin/res/#"]).await?;
        let topic = twin_request(
            &mut on_a,
            "$iothub/twin/PATCH/properties/reported/?$rid=r1",
            br#"{"temperature": 20.5}"#,
        )
        .await?;
        ensure!(
            topic.starts_with("$iothub/twin/res/204/?$rid=r1"),
            "{topic}"
        );
        let through_b = b.twin("thermo").await?;
        ensure!(
            through_b["properties"]["reported"]["temperature"] == 20.5
                && through_b["properties"]["reported"]["$version"] == 2
                && through_b["version"] == 4,
            "{through_b}"
        );
        drop(on_a);

        // A restarted hub has every twin.
        a.hub.stop().await?;
        let a = Api::start(dir_a.path(), &cluster).await?;
        let after = a.twin("thermo").await?;
        ensure!(
            after["version"] == 4 && after["etag"] == through_b["etag"],
            "{after}"
        );
        ensure!(
            after["properties"] == through_b["properties"] && after["tags"] == through_b["tags"],
            "{after}"
        );
        Ok(())
    }
    .await;
    cluster.with_logs(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_patches_through_two_hubs_lose_none() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let result = async {
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let a = Arc::new(Api::start(dir_a.path(), &cluster).await?);
        let b = Arc::new(Api::start(dir_b.path(), &cluster).await?);
        a.hub.create_device(&a.token, "busy").await?;
        b.knows("busy").await?;
        let initial = a.twin("busy").await?["version"]
            .as_u64()
            .context("version")?;

        let mut writers = Vec::new();
        for (name, api) in [("a", &a), ("b", &b)] {
            for n in 0..50 {
                let api = Arc::clone(api);
                writers.push(tokio::spawn(async move {
                    let body = json!({"properties": {"desired": {format!("{name}{n}"): n}}});
                    let response = api.patch("busy", &body, None).await?;
                    ensure!(
                        response.status() == StatusCode::OK,
                        "{name}{n}: {}",
                        response.status()
                    );
                    anyhow::Ok(())
                }));
            }
        }
        for writer in writers {
            writer.await??;
        }
        for api in [&a, &b] {
            let twin = api.twin("busy").await?;
            let desired = twin["properties"]["desired"]
                .as_object()
                .context("desired")?;
            let keys = desired.keys().filter(|k| !k.starts_with('$')).count();
            ensure!(keys == 100, "{keys} of 100 keys: {twin}");
            ensure!(twin["version"].as_u64() == Some(initial + 100), "{twin}");
            ensure!(
                twin["properties"]["desired"]["$version"].as_u64() == Some(101),
                "{twin}"
            );
        }
        Ok(())
    }
    .await;
    cluster.with_logs(result)
}

/// What the writers saw.
#[derive(Default)]
struct Written {
    /// Every acknowledged (200) patch's key.
    acked: BTreeSet<String>,
    /// When each acknowledgement arrived.
    ack_times: Vec<Instant>,
}

/// One writer patching its own twin, one key per patch, until `stop`. A patch that
/// fails (the hub gave up retrying) is not acknowledged and is simply not counted.
async fn patch_until(
    api: Arc<Api>,
    id: String,
    stop: Arc<AtomicBool>,
    written: Arc<Mutex<Written>>,
) -> Result<()> {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("k{n}");
        let body = json!({"properties": {"desired": {key.clone(): n}}});
        let response =
            tokio::time::timeout(Duration::from_secs(60), api.patch(&id, &body, None)).await;
        if let Ok(Ok(response)) = response
            && response.status() == StatusCode::OK
        {
            let mut written = written.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            written.acked.insert(format!("{id}/{key}"));
            written.ack_times.push(Instant::now());
        }
        n += 1;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_nats_node_loses_no_acknowledged_twin_patch() -> Result<()> {
    let mut cluster = NatsCluster::start(3).await?;
    let result = losing_a_node(&mut cluster).await;
    cluster.with_logs(result)
}

async fn losing_a_node(cluster: &mut NatsCluster) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Arc::new(Api::start(dir.path(), cluster).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(Mutex::new(Written::default()));
    let ids: Vec<String> = (0..8).map(|i| format!("valve-{i}")).collect();
    let mut writers = Vec::new();
    for id in &ids {
        api.hub.create_device(&api.token, id).await?;
        let (api, stop, written) = (Arc::clone(&api), Arc::clone(&stop), Arc::clone(&written));
        let id = id.clone();
        writers.push(tokio::spawn(patch_until(api, id, stop, written)));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A node that does not lead the bucket: writes barely pause.
    let stalls = cluster
        .kill_follower_then_leader(STREAM, || {
            written
                .lock()
                .map(|w| w.ack_times.clone())
                .unwrap_or_default()
        })
        .await?;
    let (follower_gap, leader_gap) = (stalls.follower_pause, stalls.leader_pause);
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await??;
    }
    let acked = written
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .acked
        .clone();
    eprintln!(
        "twin writes: {} acknowledged; stall after killing a follower: {follower_gap:?}; after killing the bucket's leader: {leader_gap:?} (first answer {:?} after the kill)",
        acked.len(),
        stalls.first_ack_after_leader_kill
    );

    // Every acknowledged patch is in its twin; a restarted hub reads them from NATS.
    let hub_dir = api.hub.data_dir().to_path_buf();
    let Ok(api) = Arc::try_unwrap(api) else {
        bail!("a writer still holds the hub");
    };
    api.hub.stop().await?;
    let api = Api::start(&hub_dir, cluster).await?;
    let mut stored = BTreeSet::new();
    for id in &ids {
        let twin = api.twin(id).await?;
        let desired = twin["properties"]["desired"]
            .as_object()
            .context("desired")?;
        stored.extend(
            desired
                .keys()
                .filter(|k| !k.starts_with('$'))
                .map(|k| format!("{id}/{k}")),
        );
    }
    let lost: Vec<&String> = acked.difference(&stored).collect();
    ensure!(
        lost.is_empty(),
        "{} of {} acknowledged patches lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
    ensure!(
        follower_gap < Duration::from_secs(2),
        "twin writes paused {follower_gap:?} when a follower died"
    );
    ensure!(
        leader_gap < Duration::from_secs(10),
        "twin writes paused {leader_gap:?} when the bucket's leader died"
    );
    Ok(())
}
