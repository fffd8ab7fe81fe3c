//! Compatibility with Azure's own Node.js device SDK: the unmodified npm packages
//! `azure-iot-device` and `azure-iot-device-mqtt` connect to the real hub over MQTT
//! (TLS on 8883) with a connection string, the hub's CA and a Plug and Play model id.
//! The device sends telemetry with system and application properties (read back
//! through the stream API, stamped with `dt-dataschema`), gets and reports its twin,
//! receives a desired patch, sees a refused reported patch as an error, answers a
//! direct method and a Plug and Play component command, and receives a C2D message
//! with its message id, correlation id and properties.
//!
//! Needs node and npm, and the SDK in `target/azure-node` (`$HUB_AZURE_NODE_MODULES`
//! points elsewhere), which `.ci/run` installs and this test installs from the npm
//! registry, pinned, when it is missing (`hub_tests::azure`). If that fails the test
//! fails and says how.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hub_tests::Hub;
use hub_tests::azure::{azure_node_modules, start_hub_on_loopback, workspace};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

struct SdkDevice {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    seen: Vec<Value>,
}

impl SdkDevice {
    async fn command(&mut self, command: Value) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("device stdin")?;
        stdin.write_all(format!("{command}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Waits for an event of `kind` that satisfies `check` (events seen earlier count).
    async fn expect(
        &mut self,
        kind: &str,
        within: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        if let Some(position) = self
            .seen
            .iter()
            .position(|e| e["event"] == kind && check(e))
        {
            return Ok(self.seen.remove(position));
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .with_context(|| {
                    format!(
                        "no {kind} event from the Azure Node SDK device in {within:?}; seen {:?}",
                        self.seen
                    )
                })??
                .context("the Azure Node SDK device exited")?;
            let event: Value =
                serde_json::from_str(&line).with_context(|| format!("device said {line:?}"))?;
            if event["event"] == "error" {
                bail!("the Azure Node SDK device reported an error: {event}");
            }
            if event["event"] == kind && check(&event) {
                return Ok(event);
            }
            self.seen.push(event);
        }
    }
}

struct Service {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Service {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        Ok((
            status,
            if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text)?
            },
        ))
    }
}

/// The device SDK on 8883 (120+) or over `MqttWs` on 443 (160+); other tests bind
/// 127.0.100+.N, 140+.N and 180+.N.
async fn start_hub(dir: &std::path::Path, websockets: bool) -> Result<(Hub, String)> {
    start_hub_on_loopback(dir, if websockets { 160 } else { 120 }, websockets).await
}

const MODEL_ID: &str = "dtmi:com:example:Thermostat;1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_node_device_sdk_works_unmodified_over_mqtt() -> Result<()> {
    node_sdk_scenario(false).await
}

/// The same scenario over `MqttWs`: MQTT over WebSocket on the HTTPS listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_node_device_sdk_works_unmodified_over_mqtt_ws() -> Result<()> {
    node_sdk_scenario(true).await
}

async fn node_sdk_scenario(websockets: bool) -> Result<()> {
    let modules = azure_node_modules().await?;
    let dir = tempfile::tempdir()?;
    let (hub, host) = start_hub(dir.path(), websockets).await?;
    let service = Service {
        http: reqwest::Client::new(),
        url: hub.url(),
        token: hub.owner_token().await?,
    };
    let (status, device) = service
        .call(
            reqwest::Method::PUT,
            "/devices/node-device",
            Some(json!({})),
        )
        .await?;
    assert_eq!(status, 200, "{device}");
    let key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .context("key")?;
    let connection_string = format!("HostName={host};DeviceId=node-device;SharedAccessKey={key}");

    let mut child = Command::new("node")
        .arg(workspace().join("tests/compat/azure_device.js"))
        .arg(&connection_string)
        .arg(dir.path().join("certs/ca.pem"))
        .arg(MODEL_ID)
        .args(websockets.then_some("MqttWs"))
        .env("NODE_PATH", &modules)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start node with the Azure SDK device")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut device = SdkDevice {
        child,
        lines: BufReader::new(stdout).lines(),
        seen: Vec::new(),
    };
    device
        .expect("ready", Duration::from_secs(60), |_| true)
        .await?;

    // Telemetry with system and application properties; `dt-subject` is the SDK's
    // name for the Plug and Play component (`$.sub` on the wire).
    device
        .command(json!({"cmd": "send", "id": "node-msg-1", "correlationId": "corr-1",
            "properties": {"sdk": "azure-iot-device", "path": "a/b&c=d", "dt-subject": "thermostat1"}}))
        .await?;
    device
        .expect("sent", Duration::from_secs(30), |_| true)
        .await?;
    let messages = hub.read_telemetry(&service.token).await?;
    let message = messages
        .iter()
        .find(|m| m["systemProperties"]["message-id"] == "node-msg-1")
        .with_context(|| format!("the SDK's telemetry is in the stream: {messages:?}"))?;
    assert_eq!(message["deviceId"], "node-device");
    assert_eq!(
        message["body"],
        json!({"from": "azure-node-sdk", "id": "node-msg-1"})
    );
    let system = &message["systemProperties"];
    assert_eq!(system["correlation-id"], "corr-1");
    assert_eq!(system["content-type"], "application/json");
    assert_eq!(system["content-encoding"], "utf-8");
    assert_eq!(system["dt-subject"], "thermostat1");
    assert_eq!(system["dt-dataschema"], MODEL_ID);
    assert_eq!(system["iothub-connection-device-id"], "node-device");
    assert_eq!(message["properties"]["sdk"], "azure-iot-device");
    assert_eq!(message["properties"]["path"], "a/b&c=d");

    // Twin: GET, reported patch, desired push.
    device.command(json!({"cmd": "twin"})).await?;
    let twin = device
        .expect("twin", Duration::from_secs(30), |_| true)
        .await?;
    assert_eq!(twin["desired"]["$version"], 1, "{twin}");
    device
        .command(json!({"cmd": "report", "patch": {"fw": "2.0", "battery": 88}}))
        .await?;
    device
        .expect("reported", Duration::from_secs(30), |_| true)
        .await?;
    let (_, twin) = service
        .call(reqwest::Method::GET, "/twins/node-device", None)
        .await?;
    assert_eq!(twin["properties"]["reported"]["fw"], "2.0");
    assert_eq!(twin["properties"]["reported"]["battery"], 88);
    let (status, _) = service
        .call(
            reqwest::Method::PATCH,
            "/twins/node-device",
            Some(json!({"properties": {"desired": {"interval": 42}}})),
        )
        .await?;
    assert_eq!(status, 200);
    let desired = device
        .expect("desired", Duration::from_secs(30), |e| {
            e["patch"]["interval"] == 42
        })
        .await?;
    assert_eq!(desired["patch"]["$version"], 2);

    // A reported patch the hub refuses (over the 32 KiB limit, and a bad key) reaches
    // the SDK as an error, and changes nothing.
    device
        .command(json!({"cmd": "report", "patch": {"blob": "x".repeat(40 * 1024)}}))
        .await?;
    let refused = device
        .expect("report_failed", Duration::from_secs(30), |_| true)
        .await?;
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("exceeds the limit")),
        "{refused}"
    );
    device
        .command(json!({"cmd": "report", "patch": {"a.b": 1}}))
        .await?;
    device
        .expect("report_failed", Duration::from_secs(30), |_| true)
        .await?;
    let (_, after) = service
        .call(reqwest::Method::GET, "/twins/node-device", None)
        .await?;
    assert_eq!(
        after["properties"]["reported"]["$version"], twin["properties"]["reported"]["$version"],
        "refused patches change nothing"
    );

    // A direct method and a Plug and Play component command.
    for name in ["reboot", "thermostat1*getMaxMinReport"] {
        let method = json!({"methodName": name, "payload": {"since": "2026-01-01"}, "responseTimeoutInSeconds": 30});
        let (status, answer) = service
            .call(
                reqwest::Method::POST,
                "/twins/node-device/methods",
                Some(method),
            )
            .await?;
        assert_eq!(status, 200, "{name}: {answer}");
        assert_eq!(
            answer,
            json!({"status": 200, "payload": {"handled": name, "payload": {"since": "2026-01-01"}}})
        );
        device
            .expect("method", Duration::from_secs(10), |e| e["name"] == name)
            .await?;
    }

    // C2D with message id, correlation id and application properties.
    let c2d = json!({"body": "hello node", "messageId": "c2d-1", "correlationId": "corr-c2d",
        "properties": {"colour": "blue/green", "a&b": "c=d"}});
    let (status, _) = service
        .call(
            reqwest::Method::POST,
            "/devices/node-device/messages/deviceBound",
            Some(c2d),
        )
        .await?;
    assert_eq!(status, 202);
    let received = device
        .expect("c2d", Duration::from_secs(30), |e| {
            e["messageId"] == "c2d-1"
        })
        .await?;
    assert_eq!(received["body"], "hello node");
    assert_eq!(received["correlationId"], "corr-c2d");
    assert_eq!(received["to"], "/devices/node-device/messages/deviceBound");
    assert_eq!(received["properties"]["colour"], "blue/green");
    assert_eq!(received["properties"]["a&b"], "c=d");
    // System properties are the SDK's fields, not application properties.
    for system in ["$.mid", "$.cid", "$.to", "%24.mid", "$.exp"] {
        assert!(
            received["properties"].get(system).is_none(),
            "{system} leaked into the application properties: {received}"
        );
    }

    device.command(json!({"cmd": "quit"})).await?;
    let _ = tokio::time::timeout(Duration::from_secs(20), device.child.wait()).await;
    assert!(hub.stop().await?.success());
    Ok(())
}
