//! Cluster mode (issue 12), cloud-to-device messages: queues, expiry and feedback on a
//! real 3-node NATS JetStream cluster (R3). The store on its own: the per-device cap
//! refuses the 51st message, completion is by sequence and writes one feedback
//! record, JetStream's scheduler makes a message due at its expiry, and a feedback
//! batch locked through one store is offered again after its lock and acknowledged
//! through another. Through two hubs: a message queued through A is delivered by B
//! and completed by the device's PUBACK, the cap holds through either hub, an expired
//! message leaves Expired feedback, a feedback batch locked through A comes back and
//! is acknowledged through B, and queued messages survive a hub restart.

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
use hub_tests::nats::NatsCluster;
use time::OffsetDateTime;
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
        // And it is not offered again after the lock time.
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
