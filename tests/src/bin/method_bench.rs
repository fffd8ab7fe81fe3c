//! `method_bench`: direct-method round trips through the REST API and MQTT, and
//! cloud-to-device enqueue→delivery latency, against a running hub. Devices are raw
//! MQTT connections on rumqttc's codec that answer every method at once and record
//! when each C2D message arrives.
//!
//! ```text
//! method_bench --http http://127.0.0.1:18080 --token TOKEN --mqtt 127.0.0.1:11883 \
//!     --sas-file bench.sas [--devices 100] [--sequential 1000] [--rounds 10] [--c2d 1000]
//! ```
//!
//! The SAS file is `mqtt_connect_bench provision`'s (`id<TAB>username<TAB>password`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Login, Packet, PubAck, Publish, Subscribe, SubscribeFilter,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

struct Args {
    http: String,
    token: String,
    mqtt: SocketAddr,
    sas_file: String,
    devices: usize,
    sequential: usize,
    rounds: usize,
    c2d: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        http: "http://127.0.0.1:8080".into(),
        token: String::new(),
        mqtt: "127.0.0.1:1883".parse()?,
        sas_file: String::new(),
        devices: 100,
        sequential: 1000,
        rounds: 10,
        c2d: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--http" => args.http = value()?,
            "--token" => args.token = value()?,
            "--mqtt" => args.mqtt = value()?.parse()?,
            "--sas-file" => args.sas_file = value()?,
            "--devices" => args.devices = value()?.parse()?,
            "--sequential" => args.sequential = value()?.parse()?,
            "--rounds" => args.rounds = value()?.parse()?,
            "--c2d" => args.c2d = value()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        !args.token.is_empty() && !args.sas_file.is_empty(),
        "--token and --sas-file are required"
    );
    Ok(args)
}

fn write(packet: Packet, out: &mut BytesMut) -> Result<()> {
    packet.write(out, usize::MAX)?;
    Ok(())
}

/// Connects one device, subscribes to methods and C2D, then answers methods and
/// records C2D arrivals forever; returns once subscribed.
async fn device(
    addr: SocketAddr,
    id: String,
    username: String,
    password: String,
    arrivals: Arrivals,
) -> Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut connect = Connect::new(id.clone());
    connect.keep_alive = 120;
    connect.login = Some(Login::new(username, password));
    let mut out = BytesMut::new();
    write(Packet::Connect(connect), &mut out)?;
    let mut subscribe = Subscribe::new_many([
        SubscribeFilter::new("$iothub/methods/POST/#".into(), QoS::AtMostOnce),
        SubscribeFilter::new(
            format!("devices/{id}/messages/devicebound/#"),
            QoS::AtLeastOnce,
        ),
    ]);
    subscribe.pkid = 1;
    write(Packet::Subscribe(subscribe), &mut out)?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            let packet = match Packet::read(&mut buf, 1 << 20) {
                Ok(packet) => packet,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    match stream.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => continue,
                    }
                }
                Err(_) => return,
            };
            let mut out = BytesMut::new();
            match packet {
                Packet::ConnAck(ack) if ack.code != ConnectReturnCode::Success => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(anyhow::anyhow!("refused: {:?}", ack.code)));
                    }
                    return;
                }
                Packet::SubAck(_) => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Ok(()));
                    }
                }
                Packet::Publish(publish) if publish.topic.starts_with("$iothub/methods/POST/") => {
                    let rid = publish
                        .topic
                        .rsplit("$rid=")
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let mut answer = Publish::new(
                        format!("$iothub/methods/res/200/?$rid={rid}"),
                        QoS::AtMostOnce,
                        publish.payload.to_vec(),
                    );
                    answer.pkid = 0;
                    let _ = write(Packet::Publish(answer), &mut out);
                }
                Packet::Publish(publish) => {
                    if let Ok(mut arrivals) = arrivals.lock() {
                        arrivals.insert(
                            String::from_utf8_lossy(&publish.payload).into_owned(),
                            Instant::now(),
                        );
                    }
                    let _ = write(Packet::PubAck(PubAck::new(publish.pkid)), &mut out);
                }
                _ => {}
            }
            if !out.is_empty() && stream.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    ready_rx.await.context("device task ended")?
}

fn report(name: &str, histogram: &Histogram<u64>, wall: Duration) {
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name}: calls={} wall_secs={:.2} per_sec={:.0} p50={:.2} ms p90={:.2} ms p99={:.2} ms max={:.2} ms",
        histogram.len(),
        wall.as_secs_f64(),
        histogram.len() as f64 / wall.as_secs_f64(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        histogram.max() as f64 / 1000.0
    );
}

async fn invoke(http: &reqwest::Client, args: &Args, device: &str, n: usize) -> Result<Duration> {
    let started = Instant::now();
    let response = http
        .post(format!("{}/twins/{device}/methods", args.http))
        .bearer_auth(&args.token)
        .json(&json!({"methodName": "ping", "payload": {"n": n}, "responseTimeoutInSeconds": 10}))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "method call: {}",
        response.status()
    );
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(parse_args()?);
    let text = std::fs::read_to_string(&args.sas_file)?;
    let lines: Vec<Vec<String>> = text
        .lines()
        .take(args.devices)
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect();
    anyhow::ensure!(
        lines.len() == args.devices,
        "not enough devices in {}",
        args.sas_file
    );
    let arrivals: Arrivals = Arc::default();
    let mut ids = Vec::new();
    for line in &lines {
        let [id, username, password] = line.as_slice() else {
            bail!("malformed SAS line")
        };
        device(
            args.mqtt,
            id.clone(),
            username.clone(),
            password.clone(),
            Arc::clone(&arrivals),
        )
        .await?;
        ids.push(id.clone());
    }
    let http = reqwest::Client::new();

    // Warm-up, including one concurrent round so the HTTP client's connection pool
    // holds enough connections before anything is measured.
    for n in 0..50 {
        invoke(&http, &args, &ids[n % ids.len()], n).await?;
    }
    let warm = ids.iter().map(|id| {
        let (http, args, id) = (http.clone(), Arc::clone(&args), id.clone());
        tokio::spawn(async move { invoke(&http, &args, &id, 0).await })
    });
    for call in warm.collect::<Vec<_>>() {
        call.await??;
    }

    let mut sequential = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    for n in 0..args.sequential {
        sequential.record(invoke(&http, &args, &ids[0], n).await?.as_micros() as u64)?;
    }
    report(
        "method sequential (1 device)",
        &sequential,
        started.elapsed(),
    );

    let mut concurrent = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    for round in 0..args.rounds {
        let calls = ids.iter().map(|id| {
            let (http, args, id) = (http.clone(), Arc::clone(&args), id.clone());
            tokio::spawn(async move { invoke(&http, &args, &id, round).await })
        });
        for call in calls.collect::<Vec<_>>() {
            concurrent.record(call.await??.as_micros() as u64)?;
        }
    }
    report(
        &format!("method concurrent ({} in flight)", ids.len()),
        &concurrent,
        started.elapsed(),
    );

    let mut c2d = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    for n in 0..args.c2d {
        let tag = format!("c2d-{n}");
        let sent = Instant::now();
        let response = http
            .post(format!(
                "{}/devices/{}/messages/deviceBound",
                args.http,
                ids[n % ids.len()]
            ))
            .bearer_auth(&args.token)
            .json(&json!({"body": tag}))
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "C2D send: {}",
            response.status()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let arrived = loop {
            if let Some(at) = arrivals.lock().ok().and_then(|a| a.get(&tag).copied()) {
                break at;
            }
            anyhow::ensure!(Instant::now() < deadline, "{tag} never arrived");
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        c2d.record(arrived.duration_since(sent).as_micros() as u64)?;
    }
    report(
        "c2d enqueue->device delivery (sequential)",
        &c2d,
        started.elapsed(),
    );
    Ok(())
}
