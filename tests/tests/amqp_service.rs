//! The AMQP 1.0 service endpoint with Azure's own Node.js service SDK (issue 24):
//! the unmodified npm package `azure-iothub` 1.16.6, over its default `Amqp` transport
//! on 127.0.0.N:5671 with a connection string from `hub connection-string`, sends
//! cloud-to-device messages to a device on Azure's Node device SDK, which receives
//! them with their properties; the feedback receiver gets `Success`; a send to an
//! unknown device fails with DeviceNotFoundError and the client goes on sending. The
//! same again over `AmqpWs` (AMQP over WebSockets on 127.0.0.N:443).
//! The script is `tests/compat/azure_amqp_service.js`.
//!
//! Needs node and npm, and the SDKs in `target/azure-node` (`hub_tests::azure`).

use std::time::Duration;

use anyhow::{Context, Result};
use hub_tests::Hub;
use hub_tests::azure::{run_node_script, start_hub_on_loopback};
use serde_json::Value;

/// How long the whole script may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

async fn connection_string(hub: &Hub, host: &str, policy: &str) -> Result<String> {
    let out = hub
        .cli(&["connection-string", "--hostname", host, "--policy", policy])
        .await?;
    anyhow::ensure!(out.status.success(), "connection-string: {}", out.stderr);
    Ok(out.stdout.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_iothub_sends_c2d_over_amqp_and_reads_feedback() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // 200+: other tests bind 127.0.100+ … 180+.
    let (hub, host) = start_hub_on_loopback(dir.path(), 200, true).await?;
    let amqps = hub.endpoint("amqps").context("hub ready has amqps=")?;
    assert_eq!(amqps.to_string(), format!("{host}:5671"));
    let endpoints: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("endpoints.json"))?)?;
    assert_eq!(endpoints["amqps"], Value::String(amqps.to_string()));

    let token = hub.owner_token().await?;
    let key = hub.create_device(&token, "amqp-dev").await?;
    let device_cs = format!("HostName={host};DeviceId=amqp-dev;SharedAccessKey={key}");
    let service_cs = connection_string(&hub, &host, "service").await?;

    // `Amqp` on 5671, then `AmqpWs` on 443 (`/$iothub/websocket`, which MQTT over
    // WebSockets shares).
    for transport in ["Amqp", "AmqpWs"] {
        let steps = run_node_script(
            "azure_amqp_service.js",
            &[&service_cs, &device_cs, transport],
            &dir.path().join("certs/ca.pem"),
            SCRIPT_TIMEOUT,
        )
        .await
        .with_context(|| format!("{transport}; hub stderr:\n{}", hub.stderr()))?;
        assert_eq!(
            steps,
            [
                "device_open",
                "service_open",
                "send",
                "device_receives",
                "feedback",
                "unknown_device",
                "send_after_refusal"
            ],
            "{transport}"
        );
    }
    let status = hub.stop().await?;
    assert!(status.success(), "the hub stops cleanly: {status}");
    Ok(())
}
