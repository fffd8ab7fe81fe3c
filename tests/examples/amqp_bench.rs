//! AMQP endpoint throughput beside the REST API, in one run against one hub (issue 24,
//! docs/BENCHMARKS.md): C2D sends/s over AMQP (one connection, one link, up to 200
//! unsettled) and over REST (`POST …/messages/deviceBound`, 32 requests in flight); then
//! telemetry reads of the same stream, msgs/s: one AMQP partition receiver per
//! partition from the earliest, and the REST read (`GET …/messages?from=&max=1000`,
//! one reader per partition).
//!
//! `HUB_BIN=target/release/hub cargo run --release -p hub-tests --example amqp_bench`
//! (sizes: `C2D_DEVICES` × 50 messages, `TELEMETRY` messages; defaults 100 and 20000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fe2o3_amqp::link::SendError;
use fe2o3_amqp::link::delivery::{Delivery, DeliveryFut};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::messaging::{Body, Outcome};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Receiver, Sendable, Sender};
use hub_tests::amqp::{data, key, message, open, put_token, token};
use hub_tests::{HubOptions, mqtt};
use rumqttc::mqttbytes::v4::Packet;
use serde_json::Value as Json;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let devices = env("C2D_DEVICES", 100);
    let telemetry = env("TELEMETRY", 20_000);
    let dir = tempfile::tempdir()?;
    let hub = HubOptions::new(dir.path())
        .args(["--amqp", "127.0.0.1:0"])
        .start()
        .await?;
    let addr = hub.endpoint("amqp").context("amqp")?;
    let owner = hub.owner_token().await?;
    let mut keys = Vec::new();
    for d in 0..devices {
        keys.push(hub.create_device(&owner, &format!("bench-{d}")).await?);
    }
    let service = key(dir.path(), "service")?;
    let sas = token("localhost", "service", &service, 3600)?;
    let per_device = 50;
    let total = devices * per_device;

    // C2D over AMQP.
    let (mut connection, mut session) = open(addr, Some(SaslProfile::Anonymous)).await?;
    ensure!(put_token(&mut session, "localhost", &sas).await? == 200);
    let mut sender = Sender::attach(&mut session, "bench", "/messages/devicebound").await?;
    let start = Instant::now();
    let mut pending: std::collections::VecDeque<DeliveryFut<Result<Outcome, SendError>>> =
        Default::default();
    let mut accepted = 0;
    for n in 0..per_device {
        for d in 0..devices {
            let m = message(
                Some(&format!("/devices/bench-{d}/messages/devicebound")),
                &[("n", &n.to_string())],
                data(b"{\"cmd\":\"blink\"}"),
                None,
            );
            let fut = sender
                .send_batchable(Sendable::builder().message(m).settled(false).build())
                .await?;
            pending.push_back(fut);
            if pending.len() >= 200
                && let Some(oldest) = pending.pop_front()
                && matches!(oldest.await, Ok(Outcome::Accepted(_)))
            {
                accepted += 1;
            }
        }
    }
    for fut in pending {
        if matches!(fut.await, Ok(Outcome::Accepted(_))) {
            accepted += 1;
        }
    }
    let amqp_c2d = start.elapsed();
    ensure!(accepted == total, "{accepted} of {total} accepted");
    let _ = sender.close().await;

    // The same over REST, after emptying the queues.
    let http = reqwest::Client::new();
    for d in 0..devices {
        http.delete(format!("{}/devices/bench-{d}/commands", hub.url()))
            .bearer_auth(&owner)
            .send()
            .await?
            .error_for_status()?;
    }
    let semaphore = Arc::new(tokio::sync::Semaphore::new(32));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..per_device {
        for d in 0..devices {
            let permit = Arc::clone(&semaphore).acquire_owned().await?;
            let (http, url, owner) = (http.clone(), hub.url(), owner.clone());
            tasks.spawn(async move {
                let status = http
                    .post(format!("{url}/devices/bench-{d}/messages/deviceBound"))
                    .bearer_auth(&owner)
                    .json(&serde_json::json!({"body": {"cmd": "blink"}, "properties": {"n": n.to_string()}}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                drop(permit);
                status
            });
        }
    }
    let mut rest_ok = 0;
    while let Some(done) = tasks.join_next().await {
        if matches!(done, Ok(Ok(202))) {
            rest_ok += 1;
        }
    }
    let rest_c2d = start.elapsed();
    ensure!(rest_ok == total, "{rest_ok} of {total} REST sends accepted");

    // Telemetry: 20 devices publish, 100 in flight each.
    let senders = 20.min(devices);
    let mut publishers = tokio::task::JoinSet::new();
    for (d, key) in keys.iter().take(senders).enumerate() {
        let id = format!("bench-{d}");
        let password = mqtt::sas("localhost", &id, key, 3600)?;
        let mut client = mqtt::tcp(hub.endpoint("mqtt").context("mqtt")?).await?;
        client
            .connect(
                &id,
                Some(&mqtt::azure_username("localhost", &id)),
                Some(&password),
                true,
            )
            .await?;
        let count = telemetry / senders;
        publishers.spawn(async move {
            let topic = format!("devices/{id}/messages/events/k=v");
            let mut sent = 0;
            while sent < count {
                let batch = 100.min(count - sent);
                for _ in 0..batch {
                    client
                        .publish_qos1(&topic, b"{\"temperature\":21.5}")
                        .await?;
                }
                let mut acked = 0;
                while acked < batch {
                    if let Some(Packet::PubAck(_)) = client.recv().await? {
                        acked += 1;
                    }
                }
                sent += batch;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = publishers.join_next().await {
        done??;
    }
    let stored = senders * (telemetry / senders);
    let partitions = 4u32;

    // AMQP: one receiver per partition from the earliest, until all are read.
    let start = Instant::now();
    let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut readers = tokio::task::JoinSet::new();
    for p in 0..partitions {
        let sas = sas.clone();
        let read = Arc::clone(&read);
        readers.spawn(async move {
            let (mut connection, mut session) = open(addr, Some(SaslProfile::Anonymous)).await?;
            ensure!(put_token(&mut session, "localhost", &sas).await? == 200);
            let mut receiver = Receiver::attach(
                &mut session,
                format!("r{p}"),
                format!("localhost/ConsumerGroups/$Default/Partitions/{p}"),
            )
            .await?;
            let deadline = Instant::now() + Duration::from_secs(120);
            while read.load(std::sync::atomic::Ordering::Relaxed) < stored
                && Instant::now() < deadline
            {
                if let Ok(delivery) =
                    tokio::time::timeout(Duration::from_millis(100), receiver.recv::<Body<Value>>())
                        .await
                {
                    let delivery: Delivery<Body<Value>> = delivery?;
                    receiver.accept(&delivery).await?;
                    read.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let done = Instant::now();
            let _ = receiver.close().await;
            let _ = session.end().await;
            let _ = connection.close().await;
            anyhow::Ok(done)
        });
    }
    let mut last = start;
    while let Some(done) = readers.join_next().await {
        last = last.max(done??);
    }
    let amqp_read = read.load(std::sync::atomic::Ordering::Relaxed);
    let amqp_read_time = last - start;
    ensure!(amqp_read == stored, "AMQP read {amqp_read} of {stored}");

    // REST: one reader per partition, pages of 1000.
    let start = Instant::now();
    let mut readers = tokio::task::JoinSet::new();
    for p in 0..partitions {
        let (http, url, owner) = (http.clone(), hub.url(), owner.clone());
        readers.spawn(async move {
            let mut from = "earliest".to_string();
            let mut n = 0usize;
            loop {
                let page: Json = http
                    .get(format!(
                        "{url}/streams/telemetry/partitions/{p}/messages?from={from}&max=1000"
                    ))
                    .bearer_auth(&owner)
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                let got = page["messages"].as_array().map_or(0, Vec::len);
                if got == 0 {
                    return anyhow::Ok(n);
                }
                n += got;
                from = page["nextOffset"].to_string();
            }
        });
    }
    let mut rest_read = 0;
    while let Some(done) = readers.join_next().await {
        rest_read += done??;
    }
    let rest_read_time = start.elapsed();
    ensure!(rest_read == stored, "REST read {rest_read} of {stored}");

    let rate = |n: usize, t: Duration| n as f64 / t.as_secs_f64();
    println!("| path | messages | seconds | msgs/s |");
    println!("|---|---|---|---|");
    println!(
        "| C2D over AMQP (1 link, ≤ 200 unsettled) | {total} | {:.2} | {:.0} |",
        amqp_c2d.as_secs_f64(),
        rate(total, amqp_c2d)
    );
    println!(
        "| C2D over REST (32 requests in flight) | {total} | {:.2} | {:.0} |",
        rest_c2d.as_secs_f64(),
        rate(total, rest_c2d)
    );
    println!(
        "| telemetry read over AMQP (1 receiver per partition, {partitions}) | {stored} | {:.2} | {:.0} |",
        amqp_read_time.as_secs_f64(),
        rate(stored, amqp_read_time)
    );
    println!(
        "| telemetry read over REST (1 reader per partition, pages of 1000) | {stored} | {:.2} | {:.0} |",
        rest_read_time.as_secs_f64(),
        rate(stored, rest_read_time)
    );
    let _ = session.end().await;
    let _ = connection.close().await;
    hub.stop().await?;
    Ok(())
}
