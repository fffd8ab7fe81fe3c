//! Provisioning with Azure's own Node.js SDKs, unmodified: `azure-iot-provisioning-device`
//! with a symmetric-key individual enrollment registers over each of its transports —
//! `Mqtt` (TLS on 8883), `MqttWs` (MQTT over WebSocket on the HTTPS listener) and
//! `Http` (the HTTPS device routes) — then `azure-iot-device` connects with the
//! assigned hub and device id, sees the enrollment's initial twin and sends telemetry
//! that is read back.
//!
//! Needs node, npm and the pinned packages (`hub_tests::azure::NODE_SDK_PACKAGES`,
//! installed into `target/azure-node` when missing).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hub_tests::azure::{azure_node_modules, start_hub_on_loopback, workspace};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_node_provisioning_sdk_registers_over_mqtt_mqtt_ws_and_http() -> Result<()> {
    let modules = azure_node_modules().await?;
    let dir = tempfile::tempdir()?;
    // 240+: other loopback tests bind 100+, 120+, 140+, 160+, 180+, 200+ and 220+.
    let (hub, host) = start_hub_on_loopback(dir.path(), 240, true).await?;
    let scope = hub.cli(&["dps", "scope"]).await?.stdout.trim().to_string();
    let token = hub
        .token("registry:read,service:connect,provisioning:write")
        .await?;

    for (index, transport) in ["Mqtt", "MqttWs", "Http"].into_iter().enumerate() {
        let id = format!("node-{}", transport.to_lowercase());
        let key = STANDARD.encode([index as u8 + 1; 32]);
        let response = hub
            .http()
            .put(format!(
                "{}/enrollments/{id}?api-version=2021-10-01",
                hub.url()
            ))
            .bearer_auth(&token)
            .json(&json!({
                "registrationId": id,
                "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}},
                "initialTwin": {"properties": {"desired": {"transport": transport}}}
            }))
            .send()
            .await?;
        assert_eq!(
            response.status().as_u16(),
            200,
            "{}",
            response.text().await?
        );

        let mut child = Command::new("node")
            .arg(workspace().join("tests/compat/azure_provision.js"))
            .args([
                host.as_str(),
                scope.as_str(),
                id.as_str(),
                key.as_str(),
                transport,
            ])
            .env("NODE_PATH", &modules)
            .env("NODE_EXTRA_CA_CERTS", dir.path().join("certs/ca.pem"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start node with Azure's provisioning SDK")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut events = Vec::new();
        tokio::time::timeout(Duration::from_secs(90), async {
            while let Some(line) = lines.next_line().await? {
                events.push(
                    serde_json::from_str::<Value>(&line)
                        .with_context(|| format!("node said {line:?}"))?,
                );
            }
            anyhow::Ok(())
        })
        .await
        .with_context(|| format!("{transport}: the Node device did not finish in 90 s"))??;
        let _ = child.wait().await;
        let find = |kind: &str| {
            events
                .iter()
                .find(|e| e["event"] == kind)
                .with_context(|| format!("{transport}: no {kind} event in {events:?}"))
        };
        let registered = find("registered")?;
        assert_eq!(registered["status"], "assigned", "{transport}: {events:?}");
        assert_eq!(registered["device_id"], id.as_str());
        assert_eq!(registered["assigned_hub"], host.as_str());
        assert_eq!(find("twin")?["desired"]["transport"], transport);
        find("sent")?;
        let telemetry = hub.read_telemetry(&token).await?;
        assert!(
            telemetry.iter().any(|m| m["systemProperties"]["message-id"]
                == format!("dps-{id}").as_str()
                && m["deviceId"] == id.as_str()),
            "{transport}: the telemetry of {id} in {telemetry:?}"
        );
    }
    assert!(hub.stop().await?.success());
    Ok(())
}
