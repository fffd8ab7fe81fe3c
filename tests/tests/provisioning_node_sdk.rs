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

/// Azure's Node provisioning service SDK (`azure-iot-provisioning-service`) with the
/// connection string `hub connection-string --provisioning` prints: creates a
/// symmetric-key enrollment group (keys generated), reads it, lists the groups with
/// a query, deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_node_provisioning_service_sdk_creates_lists_and_deletes_a_group() -> Result<()> {
    let modules = azure_node_modules().await?;
    let dir = tempfile::tempdir()?;
    // 230+: between the other loopback tests' ranges.
    let (hub, host) = start_hub_on_loopback(dir.path(), 230, true).await?;
    let output = hub
        .cli(&["connection-string", "--provisioning", "--hostname", &host])
        .await?;
    assert!(output.status.success(), "{}", output.stderr);
    let connection_string = output.stdout.trim().to_string();
    assert!(
        connection_string.starts_with(&format!(
            "HostName={host};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey="
        )),
        "{connection_string}"
    );
    let child = Command::new("node")
        .arg(workspace().join("tests/compat/azure_provisioning_service.js"))
        .args([connection_string.as_str(), "node-group"])
        .env("NODE_PATH", &modules)
        .env("NODE_EXTRA_CA_CERTS", dir.path().join("certs/ca.pem"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start node with Azure's provisioning service SDK")?;
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .context("the Node service SDK did not finish in 60 s")??;
    let events: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let find = |kind: &str| {
        events
            .iter()
            .find(|e| e["event"] == kind)
            .with_context(|| format!("no {kind} event in {events:?}"))
    };
    let created = find("created")?;
    assert_eq!(created["id"], "node-group", "{events:?}");
    assert_eq!(created["has_key"], true);
    assert_eq!(find("got")?["status"], "enabled");
    assert_eq!(find("listed")?["ids"], json!(["node-group"]));
    find("deleted")?;
    assert_eq!(find("listed_after")?["ids"], json!([]));

    // The policy's signature does not reach the registry routes.
    let token = hub.token("provisioning:read").await?;
    let response = hub
        .http()
        .get(format!("{}/devices", hub.url()))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 403);
    assert!(hub.stop().await?.success());
    Ok(())
}
