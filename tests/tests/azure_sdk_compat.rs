//! Compatibility with Azure's own device SDK: the unmodified Python package
//! `azure-iot-device` 2.x (on paho-mqtt 1.6.1) connects to the real hub over TLS with a
//! connection string and the hub's CA, sends telemetry (read back through the stream
//! API), gets and patches its twin, receives a desired patch, answers a direct method,
//! receives a C2D message — and, after the hub restarts and the SDK reconnects (it
//! does not resubscribe), still receives methods and C2D messages.
//!
//! Needs a Python with the SDK: `$HUB_AZURE_PYTHON`, or `target/azure-venv`, which
//! `.ci/run` creates and this test creates from PyPI when it is missing. If that fails
//! (no Python, no network), the test fails and says how to install it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hub_tests::azure::azure_python;
use hub_tests::{Hub, HubOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

struct SdkDevice {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    seen: Vec<Value>,
}

impl SdkDevice {
    async fn command(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("device stdin")?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
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
                        "no {kind} event from the Azure SDK device in {within:?}; seen {:?}",
                        self.seen
                    )
                })??
                .context("the Azure SDK device exited")?;
            let event: Value =
                serde_json::from_str(&line).with_context(|| format!("device said {line:?}"))?;
            if event["event"] == "error" {
                bail!("the Azure SDK device reported an error: {event}");
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

/// Binds the hub's TLS listener on 127.0.0.N:8883 (the port the SDK always dials)
/// and, with `websockets`, its HTTPS listener on 127.0.0.N:443 (where the SDK dials
/// MQTT over WebSocket), trying a few N in case one is taken. The two variants try
/// different N so that they can run at once.
async fn start_hub(
    dir: &std::path::Path,
    previous: Option<&str>,
    websockets: bool,
) -> Result<(Hub, String)> {
    let candidates: Vec<String> = match previous {
        Some(host) => vec![host.to_string()],
        None => {
            let base = 2 + (std::process::id() % 200);
            let third = if websockets { 140 } else { 100 };
            (0..10)
                .map(|i| format!("127.0.{}.{}", third + i, base))
                .collect()
        }
    };
    let mut last = None;
    for host in candidates {
        let mut options = HubOptions::new(dir)
            .mqtts(&format!("{host}:8883"))
            .args(["--hostname", host.as_str()]);
        if websockets {
            options = options.args(["--https", &format!("{host}:443")]);
        }
        match options.start().await {
            Ok(hub) => return Ok((hub, host)),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no address to try")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_python_device_sdk_works_unmodified() -> Result<()> {
    python_sdk_scenario(false).await
}

/// The same scenario with `websockets=True`: MQTT over WebSocket on the HTTPS
/// listener, as devices behind firewalls that only pass 443 connect to Azure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_python_device_sdk_works_unmodified_over_websockets() -> Result<()> {
    python_sdk_scenario(true).await
}

async fn python_sdk_scenario(websockets: bool) -> Result<()> {
    let python = azure_python().await?;
    let dir = tempfile::tempdir()?;
    let (hub, host) = start_hub(dir.path(), None, websockets).await?;
    let token = hub.owner_token().await?;
    let service = Service {
        http: reqwest::Client::new(),
        url: hub.url(),
        token,
    };
    let (status, device) = service
        .call(reqwest::Method::PUT, "/devices/sdk-device", Some(json!({})))
        .await?;
    assert_eq!(status, 200);
    let key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .context("key")?;
    let connection_string = format!("HostName={host};DeviceId=sdk-device;SharedAccessKey={key}");

    let mut child = Command::new(&python)
        .arg(workspace().join("tests/compat/azure_device.py"))
        .arg(&connection_string)
        .arg(dir.path().join("certs/ca.pem"))
        .args(websockets.then_some("websockets"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the Azure SDK device")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut device = SdkDevice {
        child,
        lines: BufReader::new(stdout).lines(),
        seen: Vec::new(),
    };
    device
        .expect("ready", Duration::from_secs(60), |_| true)
        .await?;

    // Telemetry, read back through the stream API.
    device.command("send sdk-msg-1").await?;
    device
        .expect("sent", Duration::from_secs(30), |_| true)
        .await?;
    let mut found = None;
    for partition in 0..4 {
        let (_, page) = service
            .call(
                reqwest::Method::GET,
                &format!("/streams/telemetry/partitions/{partition}/messages?from=earliest"),
                None,
            )
            .await?;
        if let Some(message) = page["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["systemProperties"]["message-id"] == "sdk-msg-1")
        {
            found = Some(message.clone());
        }
    }
    let message = found.context("the SDK's telemetry is in the stream")?;
    assert_eq!(message["deviceId"], "sdk-device");
    assert_eq!(
        message["body"],
        json!({"from": "azure-sdk", "id": "sdk-msg-1"})
    );
    assert_eq!(
        message["systemProperties"]["content-type"],
        "application/json"
    );
    assert_eq!(message["properties"]["sdk"], "azure-iot-device");

    // Twin: GET, reported patch, desired patch.
    device.command("twin").await?;
    let twin = device
        .expect("twin", Duration::from_secs(30), |_| true)
        .await?;
    assert_eq!(twin["twin"]["desired"]["$version"], 1);
    device
        .command(r#"report {"fw": "2.0", "battery": 88}"#)
        .await?;
    device
        .expect("reported", Duration::from_secs(30), |_| true)
        .await?;
    let (_, twin) = service
        .call(reqwest::Method::GET, "/twins/sdk-device", None)
        .await?;
    assert_eq!(twin["properties"]["reported"]["fw"], "2.0");
    assert_eq!(twin["properties"]["reported"]["battery"], 88);
    let (status, _) = service
        .call(
            reqwest::Method::PATCH,
            "/twins/sdk-device",
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

    // A direct method and a C2D message.
    let method =
        json!({"methodName": "reboot", "payload": {"delay": 1}, "responseTimeoutInSeconds": 30});
    let (status, answer) = service
        .call(
            reqwest::Method::POST,
            "/twins/sdk-device/methods",
            Some(method.clone()),
        )
        .await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"status": 200, "payload": {"handled": "reboot", "payload": {"delay": 1}}})
    );
    device
        .expect("method", Duration::from_secs(10), |e| e["name"] == "reboot")
        .await?;
    let c2d =
        json!({"body": "hello sdk", "messageId": "c2d-1", "properties": {"colour": "blue/green"}});
    let (status, _) = service
        .call(
            reqwest::Method::POST,
            "/devices/sdk-device/messages/deviceBound",
            Some(c2d),
        )
        .await?;
    assert_eq!(status, 202);
    let received = device
        .expect("c2d", Duration::from_secs(30), |e| {
            e["message_id"] == "c2d-1"
        })
        .await?;
    assert_eq!(received["body"], "hello sdk");
    assert_eq!(received["properties"]["colour"], "blue/green");

    // The hub restarts; the SDK reconnects by itself and does not resubscribe.
    assert!(hub.stop().await?.success());
    let (hub, _) = start_hub(dir.path(), Some(&host), websockets).await?;
    let service = Service {
        url: hub.url(),
        ..service
    };
    let c2d = json!({"body": "after restart", "messageId": "c2d-2"});
    let (status, _) = service
        .call(
            reqwest::Method::POST,
            "/devices/sdk-device/messages/deviceBound",
            Some(c2d),
        )
        .await?;
    assert_eq!(status, 202);
    let received = device
        .expect("c2d", Duration::from_secs(90), |e| {
            e["message_id"] == "c2d-2"
        })
        .await?;
    assert_eq!(received["body"], "after restart");
    let method = json!({"methodName": "status", "payload": null, "responseTimeoutInSeconds": 30, "connectTimeoutInSeconds": 60});
    let (status, answer) = service
        .call(
            reqwest::Method::POST,
            "/twins/sdk-device/methods",
            Some(method),
        )
        .await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["payload"]["handled"], "status");

    device.command("quit").await?;
    let _ = tokio::time::timeout(Duration::from_secs(20), device.child.wait()).await;
    Ok(())
}
