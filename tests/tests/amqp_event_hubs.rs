//! The Event Hub-compatible endpoint with Azure's own Event Hubs SDK (issue 24): the
//! unmodified npm package `@azure/event-hubs` 6.0.4 `EventHubConsumerClient`, with
//! the connection string `hub connection-string --event-hub` prints, over AMQP/TLS on
//! 127.0.0.N:5671, lists the partition ids and receives telemetry sent by a device on
//! Azure's Node device SDK from the earliest position, from a sequence number
//! (inclusive and exclusive) and from the latest, with `iothub-connection-device-id`,
//! Azure's other annotations and the device's application properties; and over
//! WebSockets (127.0.0.N:443, `/$servicebus/websocket`). The script is
//! `tests/compat/azure_event_hubs.js`. Python's `azure-eventhub` 5.15 reads the same
//! over the plain listener (`tests/compat/azure_eventhub.py`).
//!
//! Needs node and npm, and the SDKs in `target/azure-node`; Python 3 with
//! `azure-eventhub` in `target/azure-venv` (`hub_tests::azure`).

use std::time::Duration;

use anyhow::{Context, Result};
use hub_tests::azure::{run_node_script, run_python_script, start_hub_on_loopback};
use hub_tests::{HubOptions, mqtt};

/// How long the whole script may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_hubs_consumer_reads_telemetry_over_amqp() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // 220+: other tests bind 127.0.100+ … 200+.
    let (hub, host) = start_hub_on_loopback(dir.path(), 220, true).await?;
    let token = hub.owner_token().await?;
    let key = hub.create_device(&token, "eh-dev").await?;
    let device_cs = format!("HostName={host};DeviceId=eh-dev;SharedAccessKey={key}");
    let out = hub
        .cli(&[
            "connection-string",
            "--hostname",
            &host,
            "--policy",
            "service",
            "--event-hub",
        ])
        .await?;
    anyhow::ensure!(out.status.success(), "connection-string: {}", out.stderr);
    let eh_cs = out.stdout.trim().to_string();
    anyhow::ensure!(
        eh_cs.starts_with(&format!(
            "Endpoint=sb://{host}/;SharedAccessKeyName=service;"
        )) && eh_cs.contains(";EntityPath=iothub"),
        "the Event Hub-compatible connection string: {eh_cs}"
    );

    let steps = run_node_script(
        "azure_event_hubs.js",
        &[&eh_cs, &device_cs],
        &dir.path().join("certs/ca.pem"),
        SCRIPT_TIMEOUT,
    )
    .await
    .with_context(|| format!("hub stderr:\n{}", hub.stderr()))?;
    assert_eq!(
        steps,
        [
            "device_sent",
            "partition_ids",
            "from_earliest",
            "from_sequence_number",
            "from_latest",
            "websocket"
        ]
    );
    let status = hub.stop().await?;
    assert!(status.success(), "the hub stops cleanly: {status}");
    Ok(())
}

/// Python's `azure-eventhub` (pyamqp) over the plain `--amqp` listener with
/// `UseDevelopmentEmulator=true`: partition ids and properties, from the earliest,
/// from a sequence number, from an offset string (how it resumes), from the latest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_azure_eventhub_reads_telemetry_over_plain_amqp() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // The Python SDK signs for `sb://127.0.0.1:PORT/…`: the hub is named by that address.
    let hub = HubOptions::new(dir.path())
        .args(["--hostname", "127.0.0.1", "--amqp", "127.0.0.1:0"])
        .start()
        .await?;
    let amqp = hub.endpoint("amqp").context("hub ready has amqp=")?;
    let mqtt_addr = hub.endpoint("mqtt").context("mqtt")?;
    let token = hub.owner_token().await?;
    let key = hub.create_device(&token, "py-dev").await?;
    let password = mqtt::sas("127.0.0.1", "py-dev", &key, 3600)?;
    let username = mqtt::azure_username("127.0.0.1", "py-dev");
    let mut device = mqtt::tcp(mqtt_addr).await?;
    let ack = device
        .connect("py-dev", Some(&username), Some(&password), true)
        .await?;
    anyhow::ensure!(
        ack.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success,
        "device connect: {:?}",
        ack.code
    );
    for n in 1..=3 {
        device
            .publish_acked(
                &format!("devices/py-dev/messages/events/n={n}&kind=py"),
                format!("{{\"n\":{n}}}").as_bytes(),
            )
            .await?;
    }
    drop(device);

    let out = hub
        .cli(&[
            "connection-string",
            "--hostname",
            "127.0.0.1",
            "--policy",
            "service",
            "--event-hub",
        ])
        .await?;
    anyhow::ensure!(out.status.success(), "connection-string: {}", out.stderr);
    let eh_cs = out.stdout.trim().replace(
        "Endpoint=sb://127.0.0.1/",
        &format!("Endpoint=sb://{amqp}/"),
    ) + ";UseDevelopmentEmulator=true";
    let steps = run_python_script(
        "azure_eventhub.py",
        &[
            &eh_cs,
            "py-dev",
            &mqtt_addr.ip().to_string(),
            &mqtt_addr.port().to_string(),
            &username,
            &password,
        ],
        SCRIPT_TIMEOUT,
    )
    .await
    .with_context(|| format!("hub stderr:\n{}", hub.stderr()))?;
    assert_eq!(
        steps,
        [
            "partition_ids",
            "from_earliest",
            "from_sequence_number",
            "from_latest"
        ]
    );
    let status = hub.stop().await?;
    assert!(status.success(), "the hub stops cleanly: {status}");
    Ok(())
}
