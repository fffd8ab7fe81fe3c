//! `mqtt_publish_bench`: QoS 1 telemetry throughput and publish→PUBACK latency
//! against a broker (the hub or Mosquitto), over raw TCP on rumqttc's packet codec.
//! N devices each keep K messages in flight for a fixed time; the report gives
//! messages/s, the latency distribution (HDR histogram), and the CPU used by this
//! load source and, with `--server-pid`, by the server.
//!
//! ```text
//! mqtt_publish_bench --addr 127.0.0.1:1883 [--sas-file FILE] [--devices 100] \
//!     [--in-flight 10] [--payload 256] [--secs 10] [--warmup-secs 2] [--server-pid PID] [--twin]
//! ```
//!
//! With `--twin` each request is a reported-properties patch
//! (`$iothub/twin/PATCH/properties/reported/?$rid=N`, a small JSON body) and it
//! completes when the hub's `$iothub/twin/res/204/?$rid=N…` answer arrives.
//!
//! With `--sas-file` (lines `device_id<TAB>username<TAB>password`, as written by
//! `mqtt_connect_bench provision`) device `i` connects with line `i` and publishes to
//! its Azure telemetry topic; without it, clients `bench-{i}` connect anonymously and
//! publish to `bench/{i}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: SocketAddr,
    sas_file: Option<String>,
    devices: usize,
    in_flight: usize,
    payload: usize,
    secs: u64,
    warmup_secs: u64,
    server_pid: Option<u32>,
    twin: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        addr: "127.0.0.1:1883".parse()?,
        sas_file: None,
        devices: 100,
        in_flight: 10,
        payload: 256,
        secs: 10,
        warmup_secs: 2,
        server_pid: None,
        twin: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => args.addr = value()?.parse()?,
            "--sas-file" => args.sas_file = Some(value()?),
            "--devices" => args.devices = value()?.parse()?,
            "--in-flight" => args.in_flight = value()?.parse()?,
            "--payload" => args.payload = value()?.parse()?,
            "--secs" => args.secs = value()?.parse()?,
            "--warmup-secs" => args.warmup_secs = value()?.parse()?,
            "--server-pid" => args.server_pid = Some(value()?.parse()?),
            "--twin" => args.twin = true,
            other => bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        args.in_flight >= 1 && args.in_flight < 60000,
        "--in-flight must be 1..60000"
    );
    Ok(args)
}

/// (client id, username, password, topic) of one device.
type Identity = (String, Option<String>, Option<String>, String);

/// The identity of every device.
fn identities(args: &Args) -> Result<Vec<Identity>> {
    match &args.sas_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
            let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
            anyhow::ensure!(
                lines.len() >= args.devices,
                "{path} has {} devices, need {}",
                lines.len(),
                args.devices
            );
            lines[..args.devices]
                .iter()
                .map(|line| {
                    let mut fields = line.split('\t');
                    let id = fields.next().context("device id")?.to_string();
                    let username = fields.next().context("username")?.to_string();
                    let password = fields.next().context("password")?.to_string();
                    let topic = format!("devices/{id}/messages/events/");
                    Ok((id, Some(username), Some(password), topic))
                })
                .collect()
        }
        None => Ok((0..args.devices)
            .map(|i| (format!("bench-{i}"), None, None, format!("bench/{i}")))
            .collect()),
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
fn process_cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).context("utime")?.parse::<f64>()?
        + fields.get(12).context("stime")?.parse::<f64>()?;
    // /proc reports in USER_HZ, 100 on Linux.
    Ok(ticks / 100.0)
}

fn own_cpu_secs() -> Result<f64> {
    process_cpu_secs(std::process::id())
}

struct Shared {
    recording: AtomicBool,
    stop: AtomicBool,
    acked: AtomicU64,
}

async fn device(
    addr: SocketAddr,
    identity: Identity,
    args: (usize, usize, bool),
    shared: Arc<Shared>,
) -> Result<Histogram<u64>> {
    let (client_id, username, password, topic) = identity;
    let (in_flight, payload_len, twin) = args;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut connect = rumqttc::mqttbytes::v4::Connect::new(client_id.clone());
    connect.keep_alive = 60;
    if let (Some(u), Some(p)) = (username, password) {
        connect.login = Some(rumqttc::mqttbytes::v4::Login::new(u, p));
    }
    let mut out = BytesMut::new();
    Packet::Connect(connect).write(&mut out, usize::MAX)?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut sent_at: Vec<Option<Instant>> = vec![None; 65536];
    let connack = loop {
        match Packet::read(&mut buf, 1 << 20) {
            Ok(packet) => break packet,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                if stream.read_buf(&mut buf).await? == 0 {
                    bail!("{client_id}: closed before CONNACK");
                }
            }
            Err(err) => bail!("{client_id}: {err}"),
        }
    };
    match connack {
        Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {}
        other => bail!("{client_id}: refused: {other:?}"),
    }
    let payload = vec![0x5au8; payload_len];
    let mut next_pkid: u16 = 1;
    let mut outstanding = 0usize;
    loop {
        out.clear();
        while outstanding < in_flight && !shared.stop.load(Ordering::Relaxed) {
            let pkid = next_pkid;
            next_pkid = if next_pkid == u16::MAX {
                1
            } else {
                next_pkid + 1
            };
            let publish = if twin {
                let body = format!("{{\"counter\":{pkid},\"client\":\"bench\"}}");
                Publish::new(
                    format!("$iothub/twin/PATCH/properties/reported/?$rid={pkid}"),
                    QoS::AtMostOnce,
                    body.into_bytes(),
                )
            } else {
                let mut publish = Publish::new(topic.clone(), QoS::AtLeastOnce, payload.clone());
                publish.pkid = pkid;
                publish
            };
            Packet::Publish(publish).write(&mut out, usize::MAX)?;
            sent_at[pkid as usize] = Some(Instant::now());
            outstanding += 1;
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
        }
        if outstanding == 0 {
            break;
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("{client_id}: connection closed by the server");
        }
        loop {
            let completed = match Packet::read(&mut buf, 1 << 20) {
                Ok(Packet::PubAck(ack)) if !twin => Some(ack.pkid),
                Ok(Packet::Publish(reply)) if twin => {
                    if !reply.topic.starts_with("$iothub/twin/res/204/") {
                        bail!("{client_id}: twin patch refused: {}", reply.topic);
                    }
                    reply
                        .topic
                        .split(['?', '&'])
                        .find_map(|field| field.strip_prefix("$rid="))
                        .and_then(|rid| rid.parse::<u16>().ok())
                }
                Ok(_) => None,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(err) => bail!("{client_id}: {err}"),
            };
            if let Some(id) = completed {
                {
                    if let Some(at) = sent_at[id as usize].take() {
                        outstanding -= 1;
                        if shared.recording.load(Ordering::Relaxed) {
                            histogram.record(at.elapsed().as_micros().max(1) as u64)?;
                            shared.acked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
    Ok(histogram)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let identities = identities(&args)?;
    let shared = Arc::new(Shared {
        recording: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        acked: AtomicU64::new(0),
    });
    let mut tasks = Vec::new();
    for identity in identities {
        tasks.push(tokio::spawn(device(
            args.addr,
            identity,
            (args.in_flight, args.payload, args.twin),
            Arc::clone(&shared),
        )));
    }
    tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
    let server_cpu_start = args.server_pid.map(process_cpu_secs).transpose()?;
    let own_cpu_start = own_cpu_secs()?;
    let started = Instant::now();
    shared.recording.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    shared.recording.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let acked = shared.acked.load(Ordering::Relaxed);
    let own_cpu = own_cpu_secs()? - own_cpu_start;
    let server_cpu = match (args.server_pid, server_cpu_start) {
        (Some(pid), Some(start)) => Some(process_cpu_secs(pid)? - start),
        _ => None,
    };
    shared.stop.store(true, Ordering::Relaxed);
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(Ok(histogram))) => total.add(&histogram)?,
            Ok(Ok(Err(err))) => eprintln!("device failed: {err:#}"),
            Ok(Err(err)) => eprintln!("device task failed: {err}"),
            Err(_) => eprintln!("device did not finish"),
        }
    }
    let rate = acked as f64 / elapsed;
    let ms = |q: f64| total.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "devices={} in_flight={} payload={}B secs={:.1} acked={} msgs_per_sec={:.0}",
        args.devices, args.in_flight, args.payload, elapsed, acked, rate
    );
    println!(
        "publish_to_puback_ms p50={:.2} p90={:.2} p99={:.2} p99.9={:.2} max={:.2}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        total.max() as f64 / 1000.0
    );
    println!(
        "load_source_cpu_cores={:.2} load_source_msgs_per_core_sec={:.0}",
        own_cpu / elapsed,
        rate / (own_cpu / elapsed).max(0.001)
    );
    if let Some(cpu) = server_cpu {
        println!(
            "server_cpu_cores={:.2} server_msgs_per_core_sec={:.0}",
            cpu / elapsed,
            rate / (cpu / elapsed).max(0.001)
        );
    }
    Ok(())
}
