//! Cluster mode (issue 12), registry and sessions: two hubs started with `--cluster`
//! on a real 3-node NATS JetStream cluster share one device registry (KV bucket
//! `hub-registry`, etags = KV revisions) and one session store (`hub-sessions`).
//! A device written through hub A is read, listed and guarded by its etag through
//! hub B; of two concurrent updates with the same If-Match exactly one wins;
//! disabling a device (or rotating its key) through B closes its connection on A
//! within a second; a device created through A authenticates on B; a persistent MQTT
//! session follows its device to another hub and outlives a hub restart; the
//! registry's change feed outlives the loss of the bucket's leader.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hub_tests::Hub;
use hub_tests::mqtt::{self, RawClient};
use hub_tests::nats::NatsCluster;
use reqwest::StatusCode;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, PubAck};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;

async fn cluster_hub(dir: &std::path::Path, cluster: &NatsCluster) -> Result<Hub> {
    cluster.start_hub(dir).await
}

/// A hub with its owner token.
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

    /// `GET /devices/{id}`: the body and the ETag header (unquoted).
    async fn get(&self, id: &str) -> Result<(Value, String)> {
        let response = self
            .hub
            .http()
            .get(self.url(&format!("/devices/{id}")))
            .bearer_auth(&self.token)
            .send()
            .await?;
        ensure!(
            response.status() == StatusCode::OK,
            "GET {id}: {}",
            response.status()
        );
        let etag = response
            .headers()
            .get("etag")
            .context("no ETag header")?
            .to_str()?
            .trim_matches('"')
            .to_string();
        let body: Value = response.json().await?;
        ensure!(
            body["etag"] == etag.as_str(),
            "body etag differs from the header: {body}"
        );
        Ok((body, etag))
    }

    /// `PUT /devices/{id}` with `If-Match: "etag"` (`*` bare): the status and the body.
    async fn update(&self, id: &str, etag: &str, body: Value) -> Result<(StatusCode, Value)> {
        let response = self
            .hub
            .http()
            .put(self.url(&format!("/devices/{id}")))
            .bearer_auth(&self.token)
            .header(
                "If-Match",
                if etag == "*" {
                    etag.to_string()
                } else {
                    format!("\"{etag}\"")
                },
            )
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Every device id in `GET /devices`, following continuations, with its etag.
    async fn list(&self) -> Result<Vec<(String, String)>> {
        let mut all = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut request = self
                .hub
                .http()
                .get(self.url("/devices"))
                .bearer_auth(&self.token)
                .header("x-ms-max-item-count", "2");
            if let Some(token) = &continuation {
                request = request.header("x-ms-continuation", token);
            }
            let response = request.send().await?;
            ensure!(
                response.status() == StatusCode::OK,
                "list: {}",
                response.status()
            );
            continuation = response
                .headers()
                .get("x-ms-continuation")
                .map(|v| v.to_str().map(str::to_string))
                .transpose()?;
            let page: Vec<Value> = response.json().await?;
            for device in page {
                all.push((
                    device["deviceId"].as_str().context("deviceId")?.to_string(),
                    device["etag"].as_str().context("etag")?.to_string(),
                ));
            }
            if continuation.is_none() {
                return Ok(all);
            }
        }
    }
}

/// Sends CONNECT for `id` with a SAS token signed with `key`; the client and CONNACK.
async fn connect(
    hub: &Hub,
    id: &str,
    key: &str,
    clean_session: bool,
) -> Result<(RawClient<TcpStream>, ConnAck)> {
    let mut client = mqtt::tcp(hub.endpoint("mqtt").context("no mqtt endpoint")?).await?;
    let token = mqtt::sas("localhost", id, key, 600)?;
    let ack = client
        .connect(
            id,
            Some(&mqtt::azure_username("localhost", id)),
            Some(&token),
            clean_session,
        )
        .await?;
    Ok((client, ack))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_written_through_one_hub_is_read_listed_and_guarded_through_another() -> Result<()>
{
    let cluster = NatsCluster::start(3).await?;
    let result = async {
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let a = Api::start(dir_a.path(), &cluster).await?;
        let b = Api::start(dir_b.path(), &cluster).await?;
        for id in ["dev-3", "dev-1", "dev.2"] {
            a.hub.create_device(&a.token, id).await?;
        }

        // Read and listed through B, in id order, with A's etags.
        let (through_a, etag) = a.get("dev-1").await?;
        let (through_b, etag_b) = b.get("dev-1").await?;
        ensure!(etag == etag_b, "etag through A {etag}, through B {etag_b}");
        ensure!(
            through_a["authentication"] == through_b["authentication"],
            "{through_a} vs {through_b}"
        );
        let listed = b.list().await?;
        let ids: Vec<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
        ensure!(
            ids == ["dev-1", "dev-3", "dev.2"],
            "listed through B: {listed:?}"
        );
        ensure!(
            listed[0].1 == etag,
            "listed etag {listed:?}, GET etag {etag}"
        );

        // An update through A makes A's first etag stale on B too.
        let (status, updated) = a
            .update("dev-1", &etag, json!({"statusReason": "through A"}))
            .await?;
        ensure!(
            status == StatusCode::OK,
            "update through A: {status} {updated}"
        );
        let fresh = updated["etag"].as_str().context("etag")?.to_string();
        ensure!(fresh != etag, "the etag did not change");
        let (status, body) = b
            .update("dev-1", &etag, json!({"statusReason": "stale"}))
            .await?;
        ensure!(
            status == StatusCode::PRECONDITION_FAILED,
            "stale etag through B: {status} {body}"
        );
        let (status, body) = b
            .update("dev-1", &fresh, json!({"statusReason": "through B"}))
            .await?;
        ensure!(
            status == StatusCode::OK,
            "current etag through B: {status} {body}"
        );
        let (through_a, _) = a.get("dev-1").await?;
        ensure!(through_a["statusReason"] == "through B", "{through_a}");

        // Two updates with the same If-Match, one through each hub: exactly one wins.
        for round in 0..5 {
            let (_, etag) = a.get("dev-3").await?;
            let (first, second) = tokio::join!(
                a.update(
                    "dev-3",
                    &etag,
                    json!({"statusReason": format!("A {round}")})
                ),
                b.update(
                    "dev-3",
                    &etag,
                    json!({"statusReason": format!("B {round}")})
                ),
            );
            let (first, second) = (first?, second?);
            let mut statuses = [first.0, second.0];
            statuses.sort();
            ensure!(
                statuses == [StatusCode::OK, StatusCode::PRECONDITION_FAILED],
                "round {round}: A {first:?}, B {second:?}"
            );
            let winner = if first.0 == StatusCode::OK {
                first.1
            } else {
                second.1
            };
            let (stored, _) = b.get("dev-3").await?;
            ensure!(
                stored["statusReason"] == winner["statusReason"],
                "round {round}: stored {stored}, winner {winner}"
            );
        }
        Ok(())
    }
    .await;
    cluster.with_logs(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_a_device_through_one_hub_closes_its_connection_on_another() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let result = async {
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let a = Api::start(dir_a.path(), &cluster).await?;
        let b = Api::start(dir_b.path(), &cluster).await?;
        let key = a.hub.create_device(&a.token, "lamp").await?;

        // Created through A, authenticated by B against the shared registry.
        let (mut on_b, ack) = connect(&b.hub, "lamp", &key, true).await?;
        ensure!(ack.code == ConnectReturnCode::Success, "B refused: {ack:?}");
        on_b.ping().await?;
        drop(on_b);
        let (mut on_a, ack) = connect(&a.hub, "lamp", &key, true).await?;
        ensure!(ack.code == ConnectReturnCode::Success, "A refused: {ack:?}");
        on_a.ping().await?;

        let (_, etag) = b.get("lamp").await?;
        let (status, body) = b
            .update("lamp", &etag, json!({"status": "disabled"}))
            .await?;
        ensure!(
            status == StatusCode::OK,
            "disable through B: {status} {body}"
        );
        let disabled_at = Instant::now();
        tokio::time::timeout(Duration::from_secs(1), on_a.expect_closed())
            .await
            .with_context(|| {
                format!(
                    "A kept the connection of a device disabled through B; A's log:\n{}",
                    a.hub.stderr()
                )
            })??;
        let took = disabled_at.elapsed();
        ensure!(took < Duration::from_secs(1), "closed after {took:?}");

        // Refused on reconnect, by both hubs.
        for hub in [&a.hub, &b.hub] {
            let (_, ack) = connect(hub, "lamp", &key, true).await?;
            ensure!(
                ack.code != ConnectReturnCode::Success,
                "a disabled device was accepted: {ack:?}"
            );
        }

        // Rotating the key a connection on A was made with, through B, closes it too.
        let old_key = a.hub.create_device(&a.token, "fan").await?;
        let (mut on_a, ack) = connect(&a.hub, "fan", &old_key, true).await?;
        ensure!(ack.code == ConnectReturnCode::Success, "A refused: {ack:?}");
        let new_key = STANDARD.encode([7u8; 32]);
        let (status, body) = b
            .update(
                "fan",
                "*",
                json!({"authentication": {"symmetricKey": {"primaryKey": new_key}}}),
            )
            .await?;
        ensure!(
            status == StatusCode::OK,
            "rotate through B: {status} {body}"
        );
        tokio::time::timeout(Duration::from_secs(1), on_a.expect_closed())
            .await
            .context("A kept a connection whose key was rotated away through B")??;
        let (_, ack) = connect(&a.hub, "fan", &old_key, true).await?;
        ensure!(
            ack.code != ConnectReturnCode::Success,
            "old key accepted: {ack:?}"
        );
        let (mut on_a, ack) = connect(&a.hub, "fan", &new_key, true).await?;
        ensure!(
            ack.code == ConnectReturnCode::Success,
            "new key refused: {ack:?}"
        );
        on_a.ping().await?;
        Ok(())
    }
    .await;
    cluster.with_logs(result)
}

/// Receives the next desired-properties patch, acknowledging it.
async fn expect_desired_patch(client: &mut RawClient<TcpStream>) -> Result<Value> {
    loop {
        match client.recv().await? {
            Some(Packet::Publish(push))
                if push
                    .topic
                    .starts_with("$iothub/twin/PATCH/properties/desired/") =>
            {
                if push.qos == QoS::AtLeastOnce {
                    client.send(&Packet::PubAck(PubAck::new(push.pkid))).await?;
                }
                return Ok(serde_json::from_slice(&push.payload)?);
            }
            Some(Packet::PingResp) => {}
            other => bail!("expected a desired patch, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_follows_its_device_and_outlives_a_hub_restart() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let result = async {
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let a = Api::start(dir_a.path(), &cluster).await?;
        let b = Api::start(dir_b.path(), &cluster).await?;
        let key = a.hub.create_device(&a.token, "thermo").await?;

        let (mut client, ack) = connect(&a.hub, "thermo", &key, false).await?;
        ensure!(
            ack.code == ConnectReturnCode::Success && !ack.session_present,
            "first CleanSession=0 connect: {ack:?}"
        );
        client
            .subscribe(&["$iothub/twin/PATCH/properties/desired/#"])
            .await?;
        drop(client);

        // Hub A restarts; the session is in NATS, not in A's data dir.
        a.hub.stop().await?;
        let a = Api::start(dir_a.path(), &cluster).await?;
        let (client, ack) = connect(&a.hub, "thermo", &key, false).await?;
        ensure!(
            ack.code == ConnectReturnCode::Success && ack.session_present,
            "after A's restart: {ack:?}"
        );
        drop(client);

        // The device moves to B: session present, and B delivers to the restored
        // subscription without a new SUBSCRIBE.
        let (mut client, ack) = connect(&b.hub, "thermo", &key, false).await?;
        ensure!(
            ack.code == ConnectReturnCode::Success && ack.session_present,
            "reconnect to B: {ack:?}"
        );
        let response = b
            .hub
            .http()
            .patch(b.url("/twins/thermo"))
            .bearer_auth(&b.token)
            .json(&json!({"properties": {"desired": {"target": 21}}}))
            .send()
            .await?;
        ensure!(
            response.status() == StatusCode::OK,
            "twin patch through B: {}",
            response.status()
        );
        let patch = expect_desired_patch(&mut client).await?;
        ensure!(patch["target"] == 21, "{patch}");
        drop(client);

        // CleanSession=1 ends the session everywhere.
        let (client, ack) = connect(&b.hub, "thermo", &key, true).await?;
        ensure!(ack.code == ConnectReturnCode::Success, "{ack:?}");
        drop(client);
        let (_, ack) = connect(&a.hub, "thermo", &key, false).await?;
        ensure!(
            ack.code == ConnectReturnCode::Success && !ack.session_present,
            "after a clean session: {ack:?}"
        );
        Ok(())
    }
    .await;
    cluster.with_logs(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_feed_outlives_the_loss_of_the_buckets_leader() -> Result<()> {
    let mut cluster = NatsCluster::start(3).await?;
    let result = async {
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let a = Api::start(dir_a.path(), &cluster).await?;
        let b = Api::start(dir_b.path(), &cluster).await?;
        let key = a.hub.create_device(&a.token, "valve").await?;
        let (mut on_a, ack) = connect(&a.hub, "valve", &key, true).await?;
        ensure!(ack.code == ConnectReturnCode::Success, "{ack:?}");

        let leader = cluster.wait_stream_leader("KV_hub-registry").await?;
        cluster.kill(leader).await?;
        let killed = Instant::now();

        // B's write retries through the election; A's feed (its consumer may have
        // lived on the killed node) resumes and delivers it.
        let (status, body) = b
            .update("valve", "*", json!({"status": "disabled"}))
            .await?;
        ensure!(
            status == StatusCode::OK,
            "disable through B: {status} {body}"
        );
        // Each read waits a few seconds at most: read again until the deadline.
        let deadline = killed + Duration::from_secs(15);
        while on_a.expect_closed().await.is_err() {
            ensure!(
                Instant::now() < deadline,
                "A kept the connection {:?} after the kill; A's log:\n{}",
                killed.elapsed(),
                a.hub.stderr()
            );
        }
        eprintln!(
            "closed on A {:?} after killing the registry's leader",
            killed.elapsed()
        );

        // Later writes through B keep reaching A's listing.
        b.hub.create_device(&b.token, "valve-2").await?;
        let listed = a.list().await?;
        ensure!(
            listed.iter().any(|(id, _)| id == "valve-2"),
            "listed through A: {listed:?}"
        );
        Ok(())
    }
    .await;
    cluster.with_logs(result)
}
