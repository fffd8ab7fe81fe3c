//! The NATS cluster harness ([`hub_tests::nats`]) does what the cluster-mode failure
//! tests rely on: three real nodes form a JetStream cluster that takes an R3 file
//! stream; killing the stream's leader stalls acknowledged publishes only until a new
//! leader is elected (the stall is measured and printed), killing a node that leads
//! nothing barely stalls them, and a restarted node catches up on everything it missed.
//! A dropped cluster leaves no server running.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use async_nats::jetstream::{self, message::PublishMessage, stream};
use hub_tests::nats::NatsCluster;
use tokio::time::Instant;

const STREAM: &str = "HARNESS";
/// How long one publish waits for its JetStream ack before it is retried.
const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on the stall after a kill (DESIGN §4 measured ~4–6 s for a leader).
const MAX_STALL: Duration = Duration::from_secs(15);

/// Publishes `id` until JetStream acks it (the message id makes retries idempotent);
/// returns its stream sequence.
async fn publish_acked(js: &jetstream::Context, id: &str, deadline: Instant) -> Result<u64> {
    loop {
        let attempt = async {
            js.send_publish(
                "harness.events",
                PublishMessage::build()
                    .payload(id.to_string().into())
                    .message_id(id),
            )
            .await?
            .await
        };
        match attempt.await {
            Ok(ack) => return Ok(ack.sequence),
            Err(_) if Instant::now() < deadline => {
                // No leader yet ("no responders", ack timeouts): retry the same message
                // at a modest pace rather than spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => bail!("publish {id} not acked before the deadline: {err}"),
        }
    }
}

/// Publishes `count` messages `{prefix}-{k}` in order, each acked before the next.
async fn publish_batch(
    js: &jetstream::Context,
    prefix: &str,
    count: usize,
    acked: &mut BTreeSet<String>,
) -> Result<()> {
    for k in 0..count {
        let id = format!("{prefix}-{k}");
        publish_acked(js, &id, Instant::now() + MAX_STALL).await?;
        acked.insert(id);
    }
    Ok(())
}

/// Kills node `victim`, then publishes until the first ack; returns the stall.
async fn kill_and_measure(
    cluster: &mut NatsCluster,
    js: &jetstream::Context,
    victim: usize,
    prefix: &str,
    acked: &mut BTreeSet<String>,
) -> Result<Duration> {
    cluster.kill(victim).await?;
    let killed = Instant::now();
    let id = format!("{prefix}-first");
    publish_acked(js, &id, killed + MAX_STALL).await?;
    let stall = killed.elapsed();
    acked.insert(id);
    Ok(stall)
}

/// Waits until node `i`'s own replica of the stream holds `messages` messages up to
/// `last_seq` (read from its monitoring endpoint, so it is that node's copy).
async fn wait_caught_up(
    cluster: &NatsCluster,
    i: usize,
    messages: u64,
    last_seq: u64,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let detail = cluster.stream_detail(i, STREAM).await?;
        let state = detail.as_ref().map(|d| &d["state"]);
        let have = (
            state.and_then(|s| s["messages"].as_u64()),
            state.and_then(|s| s["last_seq"].as_u64()),
        );
        if have == (Some(messages), Some(last_seq)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} holds {have:?} (messages, last_seq) of {STREAM}, expected ({messages}, {last_seq})",
                cluster.name(i)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn leader_failover(cluster: &mut NatsCluster) -> Result<()> {
    let client = async_nats::connect(cluster.urls().as_slice())
        .await
        .context("cannot connect to the cluster")?;
    let mut js = jetstream::new(client);
    js.set_timeout(ACK_TIMEOUT);
    let mut stream = js
        .create_stream(stream::Config {
            name: STREAM.to_string(),
            subjects: vec!["harness.>".to_string()],
            num_replicas: 3,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .context("cannot create the R3 stream")?;
    let info = stream.info().await?;
    ensure!(info.config.num_replicas == 3, "stream is not R3: {info:?}");

    let mut acked = BTreeSet::new();
    publish_batch(&js, "before", 50, &mut acked).await?;

    // Kill the stream's leader: publishes stall until the survivors elect a new one.
    let leader = cluster.wait_stream_leader(STREAM).await?;
    let leader_stall = kill_and_measure(cluster, &js, leader, "leaderless", &mut acked).await?;
    println!(
        "killed stream leader {}: acked publishes stalled {leader_stall:?}",
        cluster.name(leader)
    );
    let new_leader = cluster.wait_stream_leader(STREAM).await?;
    ensure!(new_leader != leader, "the killed node still leads");
    // Written while the old leader is down: it must fetch these after its restart.
    publish_batch(&js, "during", 50, &mut acked).await?;

    cluster.restart(leader).await?;
    publish_batch(&js, "after", 20, &mut acked).await?;

    // A node that leads nothing: its loss should barely be felt.
    let leader_now = cluster.wait_stream_leader(STREAM).await?;
    let follower = (0..cluster.len())
        .find(|&i| i != leader_now)
        .context("no follower")?;
    let follower_stall = kill_and_measure(cluster, &js, follower, "follower", &mut acked).await?;
    println!(
        "killed follower {}: acked publishes stalled {follower_stall:?}",
        cluster.name(follower)
    );
    cluster.restart(follower).await?;

    // Every acked message is in the stream exactly once, and each restarted node's own
    // replica caught up with all of it.
    let info = stream.info().await?.clone();
    let (messages, last_seq) = (info.state.messages, info.state.last_sequence);
    ensure!(
        messages == acked.len() as u64,
        "stream holds {messages} messages, {} were acked",
        acked.len()
    );
    let mut stored = BTreeSet::new();
    for seq in info.state.first_sequence..=last_seq {
        let message = stream
            .get_raw_message(seq)
            .await
            .with_context(|| format!("cannot read sequence {seq}"))?;
        stored.insert(String::from_utf8_lossy(&message.payload).into_owned());
    }
    ensure!(stored == acked, "stored and acked messages differ");
    for node in [leader, follower] {
        wait_caught_up(cluster, node, messages, last_seq).await?;
    }
    ensure!(
        leader_stall < MAX_STALL && follower_stall < MAX_STALL,
        "stalls out of bound"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_survives_losing_its_leader_and_the_node_catches_up() -> Result<()> {
    let started = Instant::now();
    let mut cluster = NatsCluster::start(3).await?;
    println!("3-node cluster ready in {:?}", started.elapsed());
    let result = tokio::time::timeout(Duration::from_secs(50), leader_failover(&mut cluster))
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the failover scenario took over 50 s")));
    cluster.with_logs(result)?;
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_cluster_leaves_no_server_behind() -> Result<()> {
    let cluster = NatsCluster::start(1).await?;
    let client_addr = cluster.url(0).replace("nats://", "");
    let dir = cluster.dir().to_path_buf();
    ensure!(cluster.urls().len() == 1 && cluster.cluster_url() == cluster.url(0));
    let client = async_nats::connect(cluster.url(0)).await?;
    client.flush().await?;
    drop(client);
    drop(cluster);
    ensure!(!dir.exists(), "{} not removed", dir.display());
    // SIGKILL was sent on drop; the port closes as soon as the process is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(&client_addr).await.is_ok() {
        ensure!(
            Instant::now() < deadline,
            "nats-server still listens on {client_addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
