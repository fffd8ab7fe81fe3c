//! The Event Hub-compatible endpoint with Azure's own Event Hubs SDK (issue 24): the
//! unmodified npm package `@azure/event-hubs` 6.0.4 `EventHubConsumerClient`, with
//! the connection string `hub connection-string --event-hub` prints, over AMQP/TLS on
//! 127.0.0.N:5671, lists the partition ids and receives telemetry sent by a device on
//! Azure's Node device SDK from the earliest position, from a sequence number
//! (inclusive and exclusive) and from the latest, with `iothub-connection-device-id`,
//! Azure's other annotations and the device's application properties. The script is
//! `tests/compat/azure_event_hubs.js`.
//!
//! Needs node and npm, and the SDKs in `target/azure-node` (`hub_tests::azure`).

use std::time::Duration;

use anyhow::{Context, Result};
use hub_tests::azure::{run_node_script, start_hub_on_loopback};

/// How long the whole script may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_hubs_consumer_reads_telemetry_over_amqp() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // 220+: other tests bind 127.0.100+ … 200+.
    let (hub, host) = start_hub_on_loopback(dir.path(), 220, false).await?;
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
            "from_latest"
        ]
    );
    let status = hub.stop().await?;
    assert!(status.success(), "the hub stops cleanly: {status}");
    Ok(())
}
