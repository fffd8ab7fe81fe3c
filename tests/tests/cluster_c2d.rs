//! Cluster mode (issue 12), cloud-to-device messages: queues, expiry and feedback on a
//! real 3-node NATS JetStream cluster (R3). The store on its own: the per-device cap
//! refuses the 51st message, completion is by sequence and writes one feedback
//! record, JetStream's scheduler makes a message due at its expiry, and a feedback
//! batch locked through one store is offered again after its lock and acknowledged
//! through another. Through two hubs: a message queued through A is delivered by B
//! and completed by the device's PUBACK, the cap holds through either hub, an expired
//! message leaves Expired feedback, a feedback batch locked through A comes back and
//! is acknowledged through B, and queued messages survive a hub restart. And SIGKILLing
//! the queue stream's leader: sends wait through the election and land exactly once.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use hub::commands::c2d::{
    AckMode, C2dMessage, CommandStore, EnqueueError, FeedbackLock, FeedbackStatus, Removed,
};
use hub::config::ClusterConfig;
use hub::registry::DeviceId;
use hub::store::nats::NatsStore;
use hub::store::nats::c2d::NatsCommands;
use hub_tests::mqtt::RawClient;
use hub_tests::nats::NatsCluster;
use hub_tests::{Hub, HubOptions};
use reqwest::StatusCode;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tokio::time::Instant;

const DEPTH: usize = 50;

fn message(id: &str, ttl: time::Duration, ack: AckMode) -> C2dMessage {
    let now = OffsetDateTime::now_utc();
    C2dMessage {
        seq: 0,
        message_id: id.to_string(),
        correlation_id: None,
        content_type: None,
        content_encoding: None,
        properties: vec![("k".into(), "v".into())],
        body: Bytes::from_static(b"{}"),
        enqueued: now,
        expiry: now + ttl,
        ack,
        delivery_count: 0,
        generation_id: String::new(),
    }
}

async fn open_store(cluster: &NatsCluster, lock: Duration) -> Result<NatsCommands> {
    let config = ClusterConfig {
        nats: cluster.urls(),
        ..ClusterConfig::default()
    };
    let nats = NatsStore::connect(&config).await?;
    Ok(NatsCommands::open(&nats, DEPTH, lock).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jetstream_store_caps_completes_expires_and_locks_feedback() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let result = async {
        let lock = Duration::from_secs(2);
        let a = open_store(&cluster, lock).await?;
        let b = open_store(&cluster, lock).await?;
        let device = DeviceId::parse("dev.1:x")?;
        let hour = time::Duration::hours(1);

        // The cap: 50 queue, the 51st is refused (through either store), nothing dropped.
        let mut seqs = Vec::new();
        for n in 0..DEPTH {
            let queued = a
                .enqueue(
                    &device,
                    message(&format!("m{n}"), hour, AckMode::Full),
                    DEPTH,
                )
                .await?;
            seqs.push(queued.seq);
        }
        ensure!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        for store in [&a, &b] {
            match store
                .enqueue(&device, message("over", hour, AckMode::Full), DEPTH)
                .await
            {
                Err(EnqueueError::QueueFull(50)) => {}
                other => bail!("the 51st message: {other:?}"),
            }
        }
        ensure!(b.count(&device).await? == DEPTH);
        ensure!(
            b.counts(&[device.clone(), DeviceId::parse("none")?])
                .await?
                == [DEPTH, 0]
        );

        // Delivery reads after a cursor, in order; delivery counts are shared.
        let page = b.pending(&device, seqs[4], 3).await?;
        let ids: Vec<&str> = page.iter().map(|m| m.message_id.as_str()).collect();
        ensure!(ids == ["m5", "m6", "m7"], "{ids:?}");
        ensure!(a.record_delivery(&device, seqs[5]).await?);
        ensure!(b.record_delivery(&device, seqs[5]).await?);
        ensure!(a.pending(&device, seqs[4], 1).await?[0].delivery_count == 2);
        // Another device's sequence is not this device's message.
        let other = DeviceId::parse("other")?;
        ensure!(!a.record_delivery(&other, seqs[5]).await?);

        // Completion removes by sequence; a second PUBACK (through B) removes nothing.
        let done = a
            .complete(&device, &[seqs[0]], FeedbackStatus::Success)
            .await?;
        ensure!(
            done == Removed {
                messages: 1,
                feedback: 1
            },
            "{done:?}"
        );
        let again = b
            .complete(&device, &[seqs[0]], FeedbackStatus::Success)
            .await?;
        ensure!(again == Removed::default(), "{again:?}");
        ensure!(!a.record_delivery(&device, seqs[0]).await?);
        ensure!(a.count(&device).await? == DEPTH - 1);
        // A freed slot takes a message again.
        a.enqueue(&device, message("m50", hour, AckMode::None), DEPTH)
            .await?;
        let purged = b.purge(&device, FeedbackStatus::Purged).await?;
        ensure!(
            purged
                == Removed {
                    messages: 50,
                    feedback: 49
                },
            "{purged:?}"
        );
        ensure!(a.count(&device).await? == 0);
        let feedback = a.feedback().await?;
        ensure!(feedback.len() == 50, "{}", feedback.len());
        ensure!(feedback[0].1.status_code == FeedbackStatus::Success);
        ensure!(feedback[0].1.original_message_id == "m0");
        ensure!(feedback[1].1.status_code == FeedbackStatus::Purged);
        let keys: Vec<u64> = feedback.iter().map(|(k, _)| *k).collect();
        a.remove_feedback(&keys).await?;
        ensure!(b.feedback().await?.is_empty());

        // Expiry: JetStream makes the message due; a sweep (any store) removes it with
        // Expired feedback, and reads nothing when nothing is due.
        let short = a
            .enqueue(
                &device,
                message("short", time::Duration::seconds(1), AckMode::Negative),
                DEPTH,
            )
            .await?;
        a.enqueue(&device, message("long", hour, AckMode::Full), DEPTH)
            .await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut expired = Removed::default();
        while expired.messages == 0 {
            ensure!(Instant::now() < deadline, "the message never became due");
            let store = if expired == Removed::default() {
                &b
            } else {
                &a
            };
            expired += store.expire(OffsetDateTime::now_utc(), 1000).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ensure!(
            expired
                == Removed {
                    messages: 1,
                    feedback: 1
                },
            "{expired:?}"
        );
        ensure!(a.count(&device).await? == 1);
        ensure!(a.pending(&device, short.seq, 10).await?[0].message_id == "long");
        ensure!(a.expire(OffsetDateTime::now_utc(), 1000).await? == Removed::default());

        // Feedback locks: a batch locked through A is not offered again while locked,
        // comes back after the lock, and only the newest token acknowledges it; B
        // acknowledges A's token.
        let first = match a.lock_feedback(100, lock).await? {
            FeedbackLock::Locked { token, records } => {
                ensure!(records.len() == 1, "{records:?}");
                ensure!(records[0].status_code == FeedbackStatus::Expired);
                ensure!(records[0].original_message_id == "short");
                token
            }
            other => bail!("nothing locked: {other:?}"),
        };
        ensure!(
            matches!(
                b.lock_feedback(100, lock).await?,
                FeedbackLock::Empty { .. }
            ),
            "offered twice while locked"
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        let second = loop {
            ensure!(Instant::now() < deadline, "the batch never came back");
            if let FeedbackLock::Locked { token, records } = b.lock_feedback(100, lock).await? {
                ensure!(records.len() == 1, "{records:?}");
                break token;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        ensure!(
            !b.acknowledge_feedback(&first).await?,
            "an expired lock acknowledged"
        );
        ensure!(!b.acknowledge_feedback("nonsense").await?);
        ensure!(a.acknowledge_feedback(&second).await?);
        ensure!(
            !a.acknowledge_feedback(&second).await?,
            "acknowledged twice"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !a.feedback().await?.is_empty() {
            ensure!(Instant::now() < deadline, "acknowledged feedback stays");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A deleted device's queue goes without feedback.
        ensure!(b.count(&device).await? == 1);
        a.drop_queue(&device).await?;
        ensure!(b.count(&device).await? == 0);
        ensure!(b.pending(&device, 0, 50).await?.is_empty());

        // And the acknowledged batch is not offered again after the lock time.
        tokio::time::sleep(lock + Duration::from_millis(500)).await;
        ensure!(matches!(
            a.lock_feedback(100, lock).await?,
            FeedbackLock::Empty { .. }
        ));
        Ok(())
    }
    .await;
    cluster.with_logs(result).context("store test")
}

/// A hub on `cluster` whose feedback locks last `lock_secs`.
async fn cluster_hub(dir: &std::path::Path, cluster: &NatsCluster, lock_secs: u64) -> Result<Hub> {
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        // A small telemetry reservation: JetStream refuses a stream whose byte limit
        // exceeds the disk it may use, and these tests do not need 10 GiB.
        format!(
            "[commands]\nfeedback_lock_secs = {lock_secs}\n[telemetry]\nretention_bytes = 268435456\n"
        ),
    )?;
    let config = config.to_string_lossy().to_string();
    HubOptions::new(dir)
        .args([
            "--cluster",
            cluster.cluster_url().as_str(),
            "--config",
            &config,
        ])
        .start()
        .await
}

/// A hub and its owner token.
struct Api {
    hub: Hub,
    token: String,
}

impl Api {
    async fn start(dir: &std::path::Path, cluster: &NatsCluster, lock_secs: u64) -> Result<Self> {
        let hub = cluster_hub(dir, cluster, lock_secs).await?;
        let token = hub.owner_token().await?;
        Ok(Self { hub, token })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.hub.url())
    }

    async fn send(&self, id: &str, body: Value) -> Result<reqwest::Response> {
        Ok(self
            .hub
            .http()
            .post(self.url(&format!("/devices/{id}/messages/deviceBound")))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?)
    }

    async fn queue_length(&self, id: &str) -> Result<u64> {
        let device: Value = self
            .hub
            .http()
            .get(self.url(&format!("/devices/{id}")))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        device["cloudToDeviceMessageCount"]
            .as_u64()
            .with_context(|| format!("no cloudToDeviceMessageCount in {device}"))
    }

    async fn feedback(&self, wait_ms: u64) -> Result<Option<Value>> {
        let response = self
            .hub
            .http()
            .get(self.url(&format!("/messages/serviceBound/feedback?waitMs={wait_ms}")))
            .bearer_auth(&self.token)
            .send()
            .await?;
        match response.status() {
            StatusCode::NO_CONTENT => Ok(None),
            StatusCode::OK => Ok(Some(response.json().await?)),
            other => bail!("feedback: {other}: {}", response.text().await?),
        }
    }

    async fn acknowledge(&self, token: &str) -> Result<StatusCode> {
        Ok(self
            .hub
            .http()
            .delete(self.url(&format!("/messages/serviceBound/feedback/{token}")))
            .bearer_auth(&self.token)
            .send()
            .await?
            .status())
    }
}

fn lock_token(batch: &Value) -> Result<String> {
    batch["lockToken"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no lockToken in {batch}"))
}

/// Polls `length` until it is `want` (bounded).
async fn wait_for_length(api: &Api, id: &str, want: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let length = api.queue_length(id).await?;
        if length == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "queue length of {id} stays {length}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn next_publish(client: &mut RawClient<TcpStream>) -> Result<Publish> {
    match tokio::time::timeout(Duration::from_secs(10), client.recv()).await {
        Ok(Ok(Some(Packet::Publish(publish)))) => Ok(publish),
        Ok(other) => bail!("expected a PUBLISH, got {other:?}"),
        Err(_) => bail!("no PUBLISH within 10 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_queued_through_one_hub_is_delivered_and_fed_back_through_another() -> Result<()>
{
    let cluster = NatsCluster::start(3).await?;
    let result = async {
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let a = Api::start(dir_a.path(), &cluster, 3).await?;
        let b = Api::start(dir_b.path(), &cluster, 3).await?;
        let key = a.hub.create_device(&a.token, "lamp").await?;

        // Queued through A while the device is offline; B delivers it when the device
        // connects there, and the device's PUBACK on B completes it.
        let sent = a
            .send(
                "lamp",
                json!({"body": "on", "messageId": "m-1", "ack": "full"}),
            )
            .await?;
        ensure!(sent.status() == StatusCode::ACCEPTED, "{}", sent.status());
        wait_for_length(&b, "lamp", 1).await?;
        let mut device = b.hub.connect_device("lamp", &key, true).await?;
        device
            .subscribe(&["devices/lamp/messages/devicebound/#"])
            .await?;
        let delivered = next_publish(&mut device)
            .await
            .with_context(|| format!("hub B's log:\n{}", b.hub.stderr()))?;
        ensure!(delivered.payload.as_ref() == b"on");
        ensure!(
            delivered.topic.contains("%24.mid=m-1&"),
            "{}",
            delivered.topic
        );
        device
            .send(&Packet::PubAck(PubAck::new(delivered.pkid)))
            .await?;
        wait_for_length(&a, "lamp", 0).await?;
        wait_for_length(&b, "lamp", 0).await?;

        // Its Success feedback, locked through A and not acknowledged, is not offered
        // while locked, comes back after the lock (3 s), and is acknowledged through B;
        // A's expired token no longer acknowledges anything.
        let locked = a.feedback(10_000).await?.context("feedback through A")?;
        ensure!(locked["records"][0]["statusCode"] == "Success", "{locked}");
        ensure!(
            locked["records"][0]["originalMessageId"] == "m-1",
            "{locked}"
        );
        ensure!(locked["records"][0]["deviceId"] == "lamp", "{locked}");
        let first = lock_token(&locked)?;
        ensure!(b.feedback(0).await?.is_none(), "offered twice while locked");
        let again = b
            .feedback(15_000)
            .await?
            .context("the batch never came back")?;
        ensure!(again["records"][0]["originalMessageId"] == "m-1", "{again}");
        let second = lock_token(&again)?;
        ensure!(a.acknowledge(&first).await? == StatusCode::BAD_REQUEST);
        ensure!(b.acknowledge(&second).await? == StatusCode::NO_CONTENT);
        ensure!(
            a.feedback(0).await?.is_none(),
            "acknowledged feedback is gone"
        );

        // The queue holds 50, sent through either hub; the 51st is refused with
        // 403004 through both, and nothing queued is dropped for it.
        drop(device);
        for n in 0..50 {
            let api = if n % 2 == 0 { &a } else { &b };
            let response = api
                .send(
                    "lamp",
                    json!({"body": format!("m{n}"), "messageId": format!("q{n}")}),
                )
                .await?;
            ensure!(
                response.status() == StatusCode::ACCEPTED,
                "message {n}: {}",
                response.status()
            );
        }
        for api in [&a, &b] {
            let full = api.send("lamp", json!({"body": "one too many"})).await?;
            ensure!(full.status() == StatusCode::FORBIDDEN, "{}", full.status());
            ensure!(full.json::<Value>().await?["errorCode"] == 403004);
        }
        ensure!(a.queue_length("lamp").await? == 50);
        ensure!(b.queue_length("lamp").await? == 50);
        let mut device = a.hub.connect_device("lamp", &key, true).await?;
        device
            .subscribe(&["devices/lamp/messages/devicebound/#"])
            .await?;
        let oldest = next_publish(&mut device).await?;
        ensure!(oldest.payload.as_ref() == b"m0", "{:?}", oldest.payload);
        Ok(())
    }
    .await;
    cluster.with_logs(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_leave_feedback_and_queues_outlive_a_hub_restart() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let result = async {
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let a = Api::start(dir_a.path(), &cluster, 60).await?;
        let b = Api::start(dir_b.path(), &cluster, 60).await?;
        let key = a.hub.create_device(&a.token, "sleepy").await?;

        // Expires while the device is offline: Expired feedback, readable through B.
        let sent = a
            .send(
                "sleepy",
                json!({"body": "soon gone", "messageId": "short", "ttlSeconds": 1, "ack": "negative"}),
            )
            .await?;
        ensure!(sent.status() == StatusCode::ACCEPTED, "{}", sent.status());
        let batch = b.feedback(15_000).await?.context("no expiry feedback")?;
        ensure!(batch["records"][0]["statusCode"] == "Expired", "{batch}");
        ensure!(batch["records"][0]["originalMessageId"] == "short", "{batch}");
        ensure!(b.acknowledge(&lock_token(&batch)?).await? == StatusCode::NO_CONTENT);
        wait_for_length(&a, "sleepy", 0).await?;

        // Queued messages survive a restart of the hub they were sent through, and
        // the restarted hub delivers them in order.
        for n in 0..3 {
            let response = a
                .send("sleepy", json!({"body": format!("m{n}"), "ack": "positive"}))
                .await?;
            ensure!(response.status() == StatusCode::ACCEPTED);
        }
        let Api { hub, token } = a;
        ensure!(hub.stop().await?.success());
        ensure!(b.queue_length("sleepy").await? == 3);
        let a = Api {
            hub: cluster_hub(dir_a.path(), &cluster, 60).await?,
            token,
        };
        ensure!(a.queue_length("sleepy").await? == 3);
        let mut device = a.hub.connect_device("sleepy", &key, true).await?;
        device
            .subscribe(&["devices/sleepy/messages/devicebound/#"])
            .await?;
        for n in 0..3 {
            let message = next_publish(&mut device).await?;
            ensure!(message.payload.as_ref() == format!("m{n}").as_bytes());
            device
                .send(&Packet::PubAck(PubAck::new(message.pkid)))
                .await?;
        }
        wait_for_length(&b, "sleepy", 0).await?;
        let mut records = 0;
        while let Some(batch) = b.feedback(2_000).await? {
            for record in batch["records"].as_array().context("records")? {
                ensure!(record["statusCode"] == "Success", "{record}");
                records += 1;
            }
            ensure!(b.acknowledge(&lock_token(&batch)?).await? == StatusCode::NO_CONTENT);
            if records == 3 {
                break;
            }
        }
        ensure!(records == 3, "{records} Success records");
        Ok(())
    }
    .await;
    cluster.with_logs(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queueing_and_completing_retry_through_the_loss_of_the_queue_leader() -> Result<()> {
    let mut cluster = NatsCluster::start(3).await?;
    let result = async {
        let store = open_store(&cluster, Duration::from_secs(60)).await?;
        let device = DeviceId::parse("survivor")?;
        let hour = time::Duration::hours(1);
        let mut seqs = Vec::new();
        for n in 0..5 {
            let queued = store
                .enqueue(
                    &device,
                    message(&format!("m{n}"), hour, AckMode::Positive),
                    DEPTH,
                )
                .await?;
            seqs.push(queued.seq);
        }
        let leader = cluster.wait_stream_leader("c2d").await?;
        cluster.kill(leader).await?;
        // Every send waits through the election and lands exactly once.
        let started = Instant::now();
        for n in 5..10 {
            let queued = store
                .enqueue(
                    &device,
                    message(&format!("m{n}"), hour, AckMode::Positive),
                    DEPTH,
                )
                .await
                .with_context(|| format!("message {n} after the leader was killed"))?;
            seqs.push(queued.seq);
        }
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "sends stalled {:?}",
            started.elapsed()
        );
        ensure!(store.count(&device).await? == 10);
        let ids: Vec<String> = store
            .pending(&device, 0, 50)
            .await?
            .into_iter()
            .map(|m| m.message_id)
            .collect();
        let want: Vec<String> = (0..10).map(|n| format!("m{n}")).collect();
        ensure!(ids == want, "{ids:?}");
        let done = store
            .complete(&device, &seqs[..3], FeedbackStatus::Success)
            .await?;
        ensure!(
            done == Removed {
                messages: 3,
                feedback: 3
            },
            "{done:?}"
        );
        ensure!(store.count(&device).await? == 7);
        // The killed node comes back and catches up.
        cluster.restart(leader).await?;
        ensure!(store.feedback().await?.len() == 3);
        Ok(())
    }
    .await;
    cluster.with_logs(result)
}
