//! Cluster mode (issue 13), several hub nodes: hubs started with `--cluster` on one
//! real 3-node NATS JetStream cluster route direct methods and C2D notices to the node
//! holding a device's connection, push desired patches to it wherever it is, hand a
//! device's session over when it moves to another node (closing the old connection),
//! and list themselves in `GET /cluster`. With HAProxy in TCP mode in front of three
//! nodes, SIGKILLing one moves its devices to the others within 10 s, with no
//! acknowledged telemetry lost, their C2D delivered and methods answered again.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use hub_tests::haproxy::HaProxy;
use hub_tests::mqtt::{self, RawClient};
use hub_tests::nats::NatsCluster;
use hub_tests::{Hub, HubOptions};
use reqwest::StatusCode;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A test hub keeps its telemetry stream small: JetStream reserves a stream's maximum
/// bytes on every node's disk.
fn config_file(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("hub-test.toml");
    std::fs::write(&path, "[telemetry]\nretention_bytes = 268435456\n")?;
    Ok(path)
}

/// A hub node and its owner token.
struct Node {
    hub: Hub,
    token: String,
}

impl Node {
    async fn start(root: &Path, name: &str, cluster: &NatsCluster) -> Result<Self> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let config = config_file(root)?;
        let hub = HubOptions::new(&dir)
            .args([
                "--cluster",
                cluster.cluster_url().as_str(),
                "--config",
                config.to_str().context("config path")?,
            ])
            .start()
            .await?;
        let token = hub.owner_token().await?;
        Ok(Self { hub, token })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.hub.url())
    }

    fn mqtt(&self) -> Result<SocketAddr> {
        self.hub.endpoint("mqtt").context("no mqtt endpoint")
    }

    /// Waits (bounded) until this node's registry shows device `id` created elsewhere.
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
            ensure!(Instant::now() < deadline, "device {id} unknown to this hub");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn invoke(&self, id: &str, method: &str, connect_timeout: u64) -> Result<Value> {
        let response = self
            .hub
            .http()
            .post(self.url(&format!("/twins/{id}/methods")))
            .bearer_auth(&self.token)
            .json(&json!({
                "methodName": method,
                "payload": {"asked": method},
                "responseTimeoutInSeconds": 10,
                "connectTimeoutInSeconds": connect_timeout,
            }))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        ensure!(
            status == StatusCode::OK,
            "method {method} on {id}: {status} {body}"
        );
        Ok(body)
    }

    async fn send_c2d(&self, id: &str, body: &str) -> Result<()> {
        let response = self
            .hub
            .http()
            .post(self.url(&format!("/devices/{id}/messages/deviceBound")))
            .bearer_auth(&self.token)
            .json(&json!({ "body": body }))
            .send()
            .await?;
        ensure!(
            response.status().is_success(),
            "C2D to {id}: {}",
            response.status()
        );
        Ok(())
    }

    async fn cluster_status(&self) -> Result<Value> {
        let response = self
            .hub
            .http()
            .get(self.url("/cluster"))
            .bearer_auth(&self.token)
            .send()
            .await?;
        ensure!(
            response.status() == StatusCode::OK,
            "GET /cluster: {}",
            response.status()
        );
        Ok(response.json().await?)
    }
}

/// Connects `id` to `addr` (a node or the load balancer); returns the client and
/// whether the hub had a session.
async fn connect(
    addr: SocketAddr,
    id: &str,
    key: &str,
    clean_session: bool,
) -> Result<(RawClient<TcpStream>, bool)> {
    let mut client = mqtt::tcp(addr).await?;
    let token = mqtt::sas("localhost", id, key, 600)?;
    let ack = client
        .connect(
            id,
            Some(&mqtt::azure_username("localhost", id)),
            Some(&token),
            clean_session,
        )
        .await?;
    ensure!(
        ack.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success,
        "{id} refused: {:?}",
        ack.code
    );
    Ok((client, ack.session_present))
}

const FILTERS: [&str; 3] = [
    "$iothub/methods/POST/#",
    "devices/{id}/messages/devicebound/#",
    "$iothub/twin/PATCH/properties/desired/#",
];

async fn subscribe_all(device: &mut RawClient<TcpStream>, id: &str) -> Result<()> {
    let filters: Vec<String> = FILTERS.iter().map(|f| f.replace("{id}", id)).collect();
    let refs: Vec<&str> = filters.iter().map(String::as_str).collect();
    device.subscribe(&refs).await?;
    Ok(())
}

/// The next PUBLISH whose topic starts with `prefix` (acknowledging QoS 1 ones when
/// `ack`), within 10 s.
async fn next_publish(
    device: &mut RawClient<TcpStream>,
    prefix: &str,
    ack: bool,
) -> Result<Publish> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match device.recv().await? {
                Some(Packet::Publish(publish)) => {
                    if ack && publish.qos == QoS::AtLeastOnce {
                        device
                            .send(&Packet::PubAck(PubAck::new(publish.pkid)))
                            .await?;
                    }
                    if publish.topic.starts_with(prefix) {
                        return Ok(publish);
                    }
                }
                Some(_) => {}
                None => bail!("connection closed while waiting for {prefix}"),
            }
        }
    })
    .await
    .with_context(|| format!("no {prefix} publish within 10 s"))?
}

/// Answers the next method request with 200 and `{"answered": name}`; returns the name.
async fn answer_method(device: &mut RawClient<TcpStream>) -> Result<String> {
    let request = next_publish(device, "$iothub/methods/POST/", true).await?;
    let rest = &request.topic["$iothub/methods/POST/".len()..];
    let (name, query) = rest.split_once('/').context("method topic")?;
    let rid = query
        .rsplit_once("$rid=")
        .map(|(_, rid)| rid.to_string())
        .context("no $rid")?;
    let answer = Publish::new(
        format!("$iothub/methods/res/200/?$rid={rid}"),
        QoS::AtMostOnce,
        serde_json::to_vec(&json!({ "answered": name }))?,
    );
    device.send(&Packet::Publish(answer)).await?;
    Ok(name.to_string())
}

/// Calls `method` on `id` through `node` while `device` answers; returns the call's
/// duration.
async fn call_through(
    node: &Arc<Node>,
    device: &mut RawClient<TcpStream>,
    id: &str,
    method: &str,
) -> Result<Duration> {
    let started = Instant::now();
    let call = {
        let (node, id, method) = (Arc::clone(node), id.to_string(), method.to_string());
        tokio::spawn(async move { node.invoke(&id, &method, 5).await })
    };
    let answered = answer_method(device).await?;
    ensure!(
        answered == method,
        "the device got {answered}, not {method}"
    );
    let body = call.await??;
    let elapsed = started.elapsed();
    ensure!(
        body["status"] == 200 && body["payload"]["answered"] == method,
        "{body}"
    );
    Ok(elapsed)
}

async fn two_nodes(dir: &Path) -> Result<(NatsCluster, Arc<Node>, Arc<Node>)> {
    let cluster = NatsCluster::start(3).await?;
    let a = Node::start(dir, "a", &cluster).await?;
    let b = Node::start(dir, "b", &cluster).await?;
    Ok((cluster, Arc::new(a), Arc::new(b)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn methods_c2d_and_desired_patches_reach_a_device_on_another_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cluster, a, b) = two_nodes(dir.path()).await?;
    let result = async {
        let id = "roamer-1";
        let key = a.hub.create_device(&a.token, id).await?;
        b.knows(id).await?;
        let (mut device, _) = connect(a.mqtt()?, id, &key, true).await?;
        subscribe_all(&mut device, id).await?;

        // A method invoked on B reaches the device on A (the first call may wait for
        // the presence write; the rest measure the route).
        call_through(&b, &mut device, id, "warmup").await?;
        let mut latencies = Vec::new();
        for i in 0..20 {
            latencies.push(call_through(&b, &mut device, id, &format!("m{i}")).await?);
        }
        latencies.sort();
        eprintln!(
            "method latency across nodes (B -> device on A): p50 {:?}, max {:?}",
            latencies[latencies.len() / 2],
            latencies[latencies.len() - 1]
        );

        // C2D sent through B reaches the device on A at once (without a new subscribe).
        let started = Instant::now();
        b.send_c2d(id, "hello from B").await?;
        let message = next_publish(
            &mut device,
            &format!("devices/{id}/messages/devicebound/"),
            true,
        )
        .await?;
        ensure!(message.payload.as_ref() == b"hello from B");
        let c2d_latency = started.elapsed();
        eprintln!("C2D across nodes: delivered in {c2d_latency:?}");
        ensure!(
            c2d_latency < Duration::from_secs(2),
            "C2D took {c2d_latency:?}"
        );

        // A desired patch made through B reaches the device on A.
        let patched = b
            .hub
            .http()
            .patch(b.url(&format!("/twins/{id}")))
            .bearer_auth(&b.token)
            .json(&json!({"properties": {"desired": {"interval": 42}}}))
            .send()
            .await?;
        ensure!(patched.status().is_success(), "PATCH: {}", patched.status());
        let push =
            next_publish(&mut device, "$iothub/twin/PATCH/properties/desired/", true).await?;
        let body: Value = serde_json::from_slice(&push.payload)?;
        ensure!(body["interval"] == 42, "{body}");

        // `GET /cluster` lists both nodes and where the device is.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = b.cluster_status().await?;
            let nodes = status["hub_nodes"].as_array().cloned().unwrap_or_default();
            let on_a = nodes
                .iter()
                .find(|n| n["mqtt"] == a.mqtt().map(|m| m.to_string()).unwrap_or_default());
            if nodes.len() == 2 && on_a.is_some_and(|n| n["devices"] == 1) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "hub nodes in GET /cluster: {status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The nodes share the owner key and the CA: A's token works on B, and both
        // data directories hold the same CA (its key private).
        let with_a_token = b
            .hub
            .http()
            .get(b.url("/cluster"))
            .bearer_auth(&a.token)
            .send()
            .await?;
        ensure!(
            with_a_token.status() == StatusCode::OK,
            "A's token on B: {}",
            with_a_token.status()
        );
        let ca = |node: &Node| std::fs::read_to_string(node.hub.data_dir().join("certs/ca.pem"));
        ensure!(ca(&a)? == ca(&b)?, "the nodes have different CAs");
        for node in [&a, &b] {
            for file in ["service.key", "certs/ca.key"] {
                let mode = std::fs::metadata(node.hub.data_dir().join(file))?
                    .permissions()
                    .mode()
                    & 0o777;
                ensure!(mode == 0o600, "{file} has mode {mode:o}");
            }
        }

        // A call made on B before the device connects (to A) waits for it within the
        // connect timeout.
        let late = "late-1";
        let late_key = a.hub.create_device(&a.token, late).await?;
        b.knows(late).await?;
        let call = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.invoke(late, "wake", 10).await })
        };
        // Not a synchronisation: the call must be under way (and find no device)
        // before the device connects, or the scenario would not be tested.
        tokio::time::sleep(Duration::from_millis(500)).await;
        ensure!(
            !call.is_finished(),
            "the call ended before the device connected"
        );
        let (mut late_device, _) = connect(a.mqtt()?, late, &late_key, true).await?;
        subscribe_all(&mut late_device, late).await?;
        ensure!(answer_method(&mut late_device).await? == "wake");
        let body = call.await??;
        ensure!(body["status"] == 200, "{body}");

        let table = b.hub.cli(&["cluster", "status"]).await?;
        ensure!(
            table.stdout.contains(&a.mqtt()?.to_string())
                && table.stdout.contains(&b.mqtt()?.to_string()),
            "hub cluster status:\n{}{}",
            table.stdout,
            table.stderr
        );
        Ok(())
    }
    .await;
    let result = result.with_context(|| format!("A:\n{}\nB:\n{}", a.hub.stderr(), b.hub.stderr()));
    cluster.with_logs(result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_moving_to_another_node_keeps_its_session_and_leaves_the_first() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cluster, a, b) = two_nodes(dir.path()).await?;
    let result = async {
        let id = "mover-1";
        let key = a.hub.create_device(&a.token, id).await?;
        b.knows(id).await?;
        let (mut on_a, _) = connect(a.mqtt()?, id, &key, false).await?;
        subscribe_all(&mut on_a, id).await?;
        // A message reaches the device on A but is not acknowledged: still queued.
        a.send_c2d(id, "unacked").await?;
        let first = next_publish(
            &mut on_a,
            &format!("devices/{id}/messages/devicebound/"),
            false,
        )
        .await?;
        ensure!(first.payload.as_ref() == b"unacked");

        // The device connects to B: its session is there, A closes its connection,
        // and B delivers the unacknowledged message again without a new subscribe.
        let started = Instant::now();
        let (mut on_b, session_present) = connect(b.mqtt()?, id, &key, false).await?;
        ensure!(session_present, "B has no session for the device");
        tokio::time::timeout(Duration::from_secs(10), on_a.expect_closed())
            .await
            .context("A kept the old connection open for 10 s")??;
        eprintln!(
            "takeover across nodes: A closed the old connection after {:?}",
            started.elapsed()
        );
        let again = next_publish(
            &mut on_b,
            &format!("devices/{id}/messages/devicebound/"),
            true,
        )
        .await?;
        ensure!(again.payload.as_ref() == b"unacked", "{again:?}");

        // Subscriptions restored on B: a method and a C2D sent through A reach it.
        call_through(&a, &mut on_b, id, "after-move").await?;
        a.send_c2d(id, "after move").await?;
        let moved = next_publish(
            &mut on_b,
            &format!("devices/{id}/messages/devicebound/"),
            true,
        )
        .await?;
        ensure!(moved.payload.as_ref() == b"after move");
        on_b.ping().await?;
        Ok(())
    }
    .await;
    let result = result.with_context(|| format!("A:\n{}\nB:\n{}", a.hub.stderr(), b.hub.stderr()));
    cluster.with_logs(result)
}

/// What one simulated device did, for the failure test's checks.
#[derive(Debug, Default)]
struct DeviceLog {
    /// Telemetry numbers the hub acknowledged.
    acked: BTreeSet<u64>,
    /// When each connection was made.
    connected: Vec<Instant>,
    /// When each connection was lost.
    lost: Vec<Instant>,
    /// C2D bodies received.
    c2d: Vec<String>,
    /// Methods answered.
    methods: Vec<String>,
}

/// A device that publishes numbered QoS 1 telemetry through `addr` (one in flight),
/// answers methods, takes C2D, and reconnects with backoff (100 ms doubling to 1 s)
/// when its connection is lost, resending what was not acknowledged.
async fn run_device(
    addr: SocketAddr,
    id: String,
    key: String,
    log: Arc<Mutex<DeviceLog>>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let topic = format!("devices/{id}/messages/events/%24.ct=application%2Fjson");
    let mut next = 0u64;
    let mut pause = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) {
        let (mut client, session) = match connect(addr, &id, &key, false).await {
            Ok(connected) => connected,
            Err(_) => {
                // Backoff between attempts, as the device SDK does.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        pause = Duration::from_millis(100);
        if !session && subscribe_all(&mut client, &id).await.is_err() {
            continue;
        }
        lock(&log).connected.push(Instant::now());
        let outcome: Result<()> = async {
            let mut inflight: Option<u16> = None;
            let mut ticks = tokio::time::interval(Duration::from_millis(50));
            while !stop.load(Ordering::Relaxed) {
                tokio::select! {
                    _ = ticks.tick(), if inflight.is_none() => {
                        let body = serde_json::to_vec(&json!({ "n": next }))?;
                        inflight = Some(client.publish_qos1(&topic, &body).await?);
                    }
                    packet = client.recv() => match packet? {
                        Some(Packet::PubAck(ack)) if Some(ack.pkid) == inflight => {
                            lock(&log).acked.insert(next);
                            next += 1;
                            inflight = None;
                        }
                        Some(Packet::Publish(publish)) => {
                            if publish.qos == QoS::AtLeastOnce {
                                client.send(&Packet::PubAck(PubAck::new(publish.pkid))).await?;
                            }
                            if let Some(rest) = publish.topic.strip_prefix("$iothub/methods/POST/") {
                                let (name, query) = rest.split_once('/').context("method topic")?;
                                let rid = query.rsplit_once("$rid=").map(|(_, r)| r).context("rid")?;
                                let answer = Publish::new(
                                    format!("$iothub/methods/res/200/?$rid={rid}"),
                                    QoS::AtMostOnce,
                                    serde_json::to_vec(&json!({ "answered": name }))?,
                                );
                                client.send(&Packet::Publish(answer)).await?;
                                lock(&log).methods.push(name.to_string());
                            } else if publish.topic.contains("/messages/devicebound/") {
                                lock(&log).c2d.push(String::from_utf8_lossy(&publish.payload).into_owned());
                            }
                        }
                        Some(_) => {}
                        None => bail!("closed"),
                    },
                }
            }
            Ok(())
        }
        .await;
        if outcome.is_err() {
            lock(&log).lost.push(Instant::now());
        }
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_a_hub_node_moves_its_devices_to_the_others() -> Result<()> {
    const DEVICES: usize = 6;
    let dir = tempfile::tempdir()?;
    let cluster = NatsCluster::start(3).await?;
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(Some(Arc::new(
            Node::start(dir.path(), name, &cluster).await?,
        )));
    }
    let node = |nodes: &[Option<Arc<Node>>], i: usize| nodes[i].clone().context("node gone");
    let mqtt_addrs: Vec<SocketAddr> = nodes
        .iter()
        .flatten()
        .map(|n| n.mqtt())
        .collect::<Result<_>>()?;
    let proxy = HaProxy::start(dir.path(), &mqtt_addrs).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let result: Result<()> = async {
        let first = node(&nodes, 0)?;
        let mut devices = Vec::new();
        for i in 0..DEVICES {
            let id = format!("fleet-{i}");
            let key = first.hub.create_device(&first.token, &id).await?;
            for other in nodes.iter().flatten() {
                other.knows(&id).await?;
            }
            let log = Arc::new(Mutex::new(DeviceLog::default()));
            let task = tokio::spawn(run_device(
                proxy.addr(),
                id.clone(),
                key,
                Arc::clone(&log),
                Arc::clone(&stop),
            ));
            devices.push((id, log, task));
        }
        // Every device publishes through the load balancer.
        let deadline = Instant::now() + Duration::from_secs(20);
        while devices.iter().any(|(_, log, _)| lock(log).acked.len() < 5) {
            ensure!(
                Instant::now() < deadline,
                "devices did not start publishing"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The victim: the node with the most devices, as the nodes report it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let victim = loop {
            let status = first.cluster_status().await?;
            let hubs = status["hub_nodes"].as_array().cloned().unwrap_or_default();
            let counted: u64 = hubs.iter().filter_map(|h| h["devices"].as_u64()).sum();
            if hubs.len() == 3 && counted == DEVICES as u64 {
                let busiest = hubs
                    .iter()
                    .max_by_key(|h| h["devices"].as_u64().unwrap_or(0))
                    .context("no hub nodes")?;
                let addr = busiest["mqtt"].as_str().context("mqtt")?.to_string();
                break mqtt_addrs
                    .iter()
                    .position(|a| a.to_string() == addr)
                    .context("unknown node")?;
            }
            ensure!(
                Instant::now() < deadline,
                "GET /cluster never counted every device: {status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let survivor = node(&nodes, (victim + 1) % 3)?;
        let pid = node(&nodes, victim)?.hub.pid().context("victim pid")?;
        let killed_at = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid)?),
            nix::sys::signal::Signal::SIGKILL,
        )?;

        // Its devices come back through the load balancer within 10 s.
        let deadline = killed_at + Duration::from_secs(15);
        let moved = loop {
            let mut moved = Vec::new();
            let mut waiting = false;
            for (id, log, _) in &devices {
                let log = lock(log);
                if log.lost.iter().any(|t| *t >= killed_at) {
                    match log.connected.iter().find(|t| **t >= killed_at) {
                        Some(at) => moved.push((id.clone(), *at - killed_at)),
                        None => waiting = true,
                    }
                }
            }
            if !waiting && !moved.is_empty() {
                break moved;
            }
            ensure!(
                Instant::now() < deadline,
                "devices not back 15 s after the kill: {moved:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let slowest = moved.iter().map(|(_, d)| *d).max().unwrap_or_default();
        eprintln!(
            "hub node killed: {} devices reconnected, slowest after {slowest:?}",
            moved.len()
        );
        ensure!(
            slowest < Duration::from_secs(10),
            "reconnect took {slowest:?}: {moved:?}"
        );

        // Their C2D is delivered and methods are answered again, through a survivor.
        for (id, _, _) in &devices {
            survivor.send_c2d(id, &format!("after-kill-{id}")).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (id, log, _) in &devices {
            while !lock(log).c2d.contains(&format!("after-kill-{id}")) {
                ensure!(Instant::now() < deadline, "{id} never got its C2D");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for (id, _, _) in &devices {
            let body = survivor.invoke(id, "ping", 10).await?;
            ensure!(body["status"] == 200, "{id}: {body}");
        }

        // Nothing acknowledged was lost.
        stop.store(true, Ordering::Relaxed);
        for (_, _, task) in devices.iter_mut() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let stored = survivor.hub.read_telemetry(&survivor.token).await?;
        let mut lost_total = 0;
        for (id, log, _) in &devices {
            let have: BTreeSet<u64> = stored
                .iter()
                .filter(|m| m["deviceId"] == id.as_str())
                .filter_map(|m| m["body"]["n"].as_u64())
                .collect();
            let log = lock(log);
            let lost: Vec<&u64> = log.acked.difference(&have).collect();
            lost_total += lost.len();
            ensure!(lost.is_empty(), "{id} lost acknowledged messages {lost:?}");
        }
        let acked: usize = devices.iter().map(|(_, l, _)| lock(l).acked.len()).sum();
        eprintln!("{acked} acknowledged messages, {lost_total} lost");
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let logs: String = nodes
        .iter()
        .flatten()
        .map(|n| n.hub.stderr())
        .collect::<Vec<_>>()
        .join("\n----\n");
    let _ = proxy.stop().await;
    cluster.with_logs(result.with_context(|| format!("hub logs:\n{logs}")))
}
