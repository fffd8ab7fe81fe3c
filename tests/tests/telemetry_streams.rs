//! Telemetry end to end against the real binary: QoS 1 messages from many devices
//! are readable once, in order per device, with their properties; long-poll reads
//! wait for new messages; a consumer group resumes from its checkpoint after a
//! restart; the WebSocket pushes messages as they commit; retention drops old
//! segments; `hub tail` prints them; bad reads get 4xx with JSON errors.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use hub_tests::mqtt::RawClient;
use hub_tests::{Hub, HubOptions};
use reqwest::StatusCode;
use rumqttc::mqttbytes::v4::Packet;
use serde_json::{Value, json};
use tokio::net::TcpStream;

struct Api {
    hub: Hub,
    token: String,
}

impl Api {
    async fn new(hub: Hub) -> Result<Self> {
        let token = hub.owner_token().await?;
        Ok(Self { hub, token })
    }

    async fn get(&self, path: &str) -> Result<reqwest::Response> {
        Ok(self
            .hub
            .http()
            .get(format!("{}{path}", self.hub.url()))
            .bearer_auth(&self.token)
            .send()
            .await?)
    }

    async fn json(&self, path: &str) -> Result<Value> {
        let response = self.get(path).await?;
        anyhow::ensure!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        Ok(response.json().await?)
    }

    async fn device(&self, id: &str) -> Result<RawClient<TcpStream>> {
        let key = self.hub.create_device(&self.token, id).await?;
        self.hub.connect_device(id, &key, true).await
    }

    /// Every message of every partition, from the earliest offset.
    async fn read_all(&self) -> Result<Vec<Value>> {
        self.hub.read_telemetry(&self.token).await
    }
}

/// Publishes `count` QoS 1 messages with up to 10 in flight; returns when all are acked.
async fn publish_many(client: &mut RawClient<TcpStream>, device: &str, count: usize) -> Result<()> {
    let mut in_flight = 0;
    let mut sent = 0;
    while sent < count || in_flight > 0 {
        while sent < count && in_flight < 10 {
            let topic = format!(
                "devices/{device}/messages/events/%24.mid={device}-{sent}&%24.ct=application%2Fjson&seq={sent}"
            );
            client
                .publish_qos1(
                    &topic,
                    json!({"seq": sent, "device": device})
                        .to_string()
                        .as_bytes(),
                )
                .await?;
            sent += 1;
            in_flight += 1;
        }
        match client.recv().await? {
            Some(Packet::PubAck(_)) => in_flight -= 1,
            other => bail!("expected PUBACK, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_many_devices_are_readable_once_in_order_with_properties() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::new(Hub::start(dir.path()).await?).await?;
    let mut tasks = Vec::new();
    for n in 0..20 {
        let id = format!("sensor-{n:02}");
        let mut client = api.device(&id).await?;
        tasks.push(tokio::spawn(async move {
            publish_many(&mut client, &id, 25).await
        }));
    }
    for task in tasks {
        task.await??;
    }

    let all = api.read_all().await?;
    assert_eq!(all.len(), 500, "every message exactly once");
    let mut per_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for message in &all {
        let device = message["deviceId"]
            .as_str()
            .context("deviceId")?
            .to_string();
        let seq = message["body"]["seq"].as_u64().context("JSON body")?;
        let system = &message["systemProperties"];
        assert_eq!(system["message-id"], json!(format!("{device}-{seq}")));
        assert_eq!(system["content-type"], "application/json");
        assert_eq!(system["iothub-connection-device-id"], json!(device));
        assert!(
            system["iothub-connection-auth-method"]
                .as_str()
                .is_some_and(|m| m.contains("sas"))
        );
        assert!(system["iothub-enqueuedtime"].is_string());
        assert_eq!(message["properties"]["seq"], json!(seq.to_string()));
        assert!(message["enqueuedTime"].is_string());
        per_device.entry(device).or_default().push(seq);
    }
    assert_eq!(per_device.len(), 20);
    for (device, seqs) in per_device {
        assert_eq!(seqs, (0..25).collect::<Vec<_>>(), "{device} in order");
    }

    let info = api.json("/streams/telemetry").await?;
    assert_eq!(info["partitionCount"], 4);
    let stored: i64 = info["partitions"]
        .as_array()
        .context("partitions")?
        .iter()
        .map(|p| {
            p["lastOffset"].as_i64().unwrap_or(-1) - p["firstOffset"].as_i64().unwrap_or(0) + 1
        })
        .sum();
    assert_eq!(stored, 500);

    // /metrics shows the group commit at work: 500 messages in fewer commits.
    let metrics = api
        .hub
        .http()
        .get(format!("{}/metrics", api.hub.url()))
        .send()
        .await?
        .text()
        .await?;
    let sum = |prefix: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()))
            .sum()
    };
    assert_eq!(
        sum("hub_telemetry_messages_committed_total{"),
        500,
        "{metrics}"
    );
    let commits = sum("hub_telemetry_commit_seconds_count{");
    assert!(
        commits > 0 && commits < 500,
        "{commits} commits for 500 messages"
    );
    assert_eq!(sum("hub_telemetry_queue_bytes{"), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_reads_wait_for_the_next_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::new(Hub::start(dir.path()).await?).await?;
    let partition = hub::telemetry::partitioner::Partitioner::new(4).partition("poller");
    let mut client = api.device("poller").await?;
    let url =
        format!("/streams/telemetry/partitions/{partition}/messages?from=latest&waitMs=10000");
    let read = async { api.json(&url).await };
    let publish = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        client
            .publish_acked("devices/poller/messages/events/", b"late")
            .await
    };
    let (page, acked) = tokio::join!(read, publish);
    acked?;
    let page = page?;
    let messages = page["messages"].as_array().context("messages")?;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["deviceId"], "poller");
    assert_eq!(
        messages[0]["body"],
        json!(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            b"late"
        ))
    );

    // Without waitMs an empty partition answers at once.
    let empty = api
        .json(&format!(
            "/streams/telemetry/partitions/{partition}/messages?from=latest"
        ))
        .await?;
    assert_eq!(empty["messages"], json!([]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_resumes_from_its_checkpoint_after_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::new(Hub::start(dir.path()).await?).await?;
    let partition = hub::telemetry::partitioner::Partitioner::new(4).partition("meter");
    let mut client = api.device("meter").await?;
    publish_many(&mut client, "meter", 10).await?;
    drop(client);

    let base = format!("/streams/telemetry/partitions/{partition}/messages?consumerGroup=billing");
    let first = api.json(&format!("{base}&from=checkpoint&max=4")).await?;
    assert_eq!(first["messages"].as_array().map(Vec::len), Some(4));
    let next = first["nextOffset"].as_u64().context("nextOffset")?;
    let put = api
        .hub
        .http()
        .put(format!(
            "{}/streams/telemetry/consumergroups/billing/partitions/{partition}/checkpoint",
            api.hub.url()
        ))
        .bearer_auth(&api.token)
        .json(&json!({ "offset": next }))
        .send()
        .await?;
    assert_eq!(put.status(), StatusCode::OK);

    let Api { hub, token } = api;
    assert!(hub.stop().await?.success());
    let hub = Hub::start(dir.path()).await?;
    let api = Api { hub, token };
    let resumed = api.json(&format!("{base}&max=100")).await?;
    let seqs: Vec<u64> = resumed["messages"]
        .as_array()
        .context("messages")?
        .iter()
        .filter_map(|m| m["body"]["seq"].as_u64())
        .collect();
    assert_eq!(
        seqs,
        (4..10).collect::<Vec<_>>(),
        "continues after the checkpoint"
    );
    // Another group starts from the earliest offset.
    let other = api
        .json(&format!(
            "/streams/telemetry/partitions/{partition}/messages?consumerGroup=audit&max=100"
        ))
        .await?;
    assert_eq!(other["messages"].as_array().map(Vec::len), Some(10));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_pushes_messages_as_they_commit() -> Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = tempfile::tempdir()?;
    let api = Api::new(Hub::start(dir.path()).await?).await?;
    let partition = hub::telemetry::partitioner::Partitioner::new(4).partition("live");
    let mut client = api.device("live").await?;
    let http = api.hub.endpoint("http").context("http")?;
    let mut request =
        format!("ws://{http}/streams/telemetry/partitions/{partition}/ws").into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {}", api.token).parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    // Give the server a moment to start following before publishing is not needed:
    // the socket starts at the end offset it saw at upgrade time.
    for seq in 0..3 {
        client
            .publish_acked(
                "devices/live/messages/events/%24.ct=application%2Fjson",
                json!({ "seq": seq }).to_string().as_bytes(),
            )
            .await?;
    }
    for seq in 0..3 {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .context("no frame in time")?
            .context("socket ended")??;
        let message: Value = serde_json::from_str(frame.to_text()?)?;
        assert_eq!(message["deviceId"], "live");
        assert_eq!(message["body"]["seq"], seq);
    }
    // Without a token the upgrade is refused with the JSON error.
    let refused =
        tokio_tungstenite::connect_async(format!("ws://{http}/streams/telemetry/partitions/0/ws"))
            .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => bail!("expected 401, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_old_segments_and_reads_before_them_get_410() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        "[telemetry]\nsegment_bytes = 4096\nretention_secs = 1\nretention_interval_secs = 1\n",
    )?;
    let config = config.to_string_lossy().into_owned();
    let hub = HubOptions::new(&dir.path().join("data"))
        .args(["--config", config.as_str()])
        .start()
        .await?;
    let api = Api::new(hub).await?;
    let partition = hub::telemetry::partitioner::Partitioner::new(4).partition("chatty");
    let mut client = api.device("chatty").await?;
    for _ in 0..20 {
        client
            .publish_acked("devices/chatty/messages/events/", &[7u8; 1000])
            .await?;
    }
    // Old segments go within a few retention passes (the active one stays).
    let mut first = 0;
    for _ in 0..50 {
        let info = api.json("/streams/telemetry").await?;
        first = info["partitions"][partition as usize]["firstOffset"]
            .as_u64()
            .unwrap_or(0);
        if first > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(first > 0, "old segments were deleted");
    let gone = api
        .get(&format!(
            "/streams/telemetry/partitions/{partition}/messages?from=0"
        ))
        .await?;
    assert_eq!(gone.status(), StatusCode::GONE);
    let body: Value = gone.json().await?;
    assert_eq!(body["errorCode"], 410001);
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("first available offset is {first}"))),
        "{body}"
    );
    // `earliest` starts at the first kept offset (the active segment is never deleted).
    let still = api
        .json(&format!(
            "/streams/telemetry/partitions/{partition}/messages?from=earliest"
        ))
        .await?;
    match still["messages"].as_array().and_then(|m| m.first()) {
        Some(message) => assert_eq!(message["offset"], first),
        None => assert_eq!(still["nextOffset"], first),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reads_are_refused_with_json_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::new(Hub::start(dir.path()).await?).await?;
    for (path, status, code) in [
        ("/streams/telemetry/partitions/9/messages", 400, 400004),
        ("/streams/telemetry/partitions/x/messages", 400, 400004),
        (
            "/streams/telemetry/partitions/0/messages?from=soon",
            400,
            400004,
        ),
        (
            "/streams/telemetry/partitions/0/messages?max=5000",
            400,
            400004,
        ),
        (
            "/streams/telemetry/partitions/0/messages?waitMs=99999",
            400,
            400004,
        ),
        (
            "/streams/telemetry/partitions/0/messages?consumerGroup=a%20b",
            400,
            400004,
        ),
        ("/streams/telemetry/partitions/0/ws", 400, 400004),
    ] {
        let response = api.get(path).await?;
        assert_eq!(response.status().as_u16(), status, "{path}");
        let body: Value = response.json().await?;
        assert_eq!(body["errorCode"], code, "{path}: {body}");
    }
    let reader = api.hub.token("registry:read").await?;
    let forbidden = api
        .hub
        .http()
        .get(format!("{}/streams/telemetry", api.hub.url()))
        .bearer_auth(reader)
        .send()
        .await?;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let beyond = api
        .hub
        .http()
        .put(format!(
            "{}/streams/telemetry/consumergroups/g/partitions/0/checkpoint",
            api.hub.url()
        ))
        .bearer_auth(&api.token)
        .json(&json!({"offset": 99}))
        .send()
        .await?;
    assert_eq!(beyond.status(), StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_tail_prints_one_json_line_per_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::new(Hub::start(dir.path()).await?).await?;
    let mut client = api.device("tailed").await?;
    publish_many(&mut client, "tailed", 3).await?;
    let out = api
        .hub
        .cli(&[
            "tail", "--from", "earliest", "--device", "tailed", "--count", "3",
        ])
        .await?;
    assert!(out.status.success(), "{}", out.stderr);
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 3);
    let mut seqs: Vec<u64> = lines
        .iter()
        .filter_map(|l| l["body"]["seq"].as_u64())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [0, 1, 2]);
    assert!(lines.iter().all(|l| l["deviceId"] == "tailed"));
    Ok(())
}

#[tokio::test]
async fn the_partition_count_of_a_data_dir_cannot_change() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    assert!(hub.stop().await?.success());
    let config = dir.path().join("eight.toml");
    std::fs::write(&config, "[telemetry]\npartitions = 8\n")?;
    let config = config.to_string_lossy().into_owned();
    let out = HubOptions::new(dir.path())
        .args(["--config", config.as_str()])
        .start_expecting_failure()
        .await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("telemetry.partitions is 8"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("created with 4"), "{}", out.stderr);
    Ok(())
}
