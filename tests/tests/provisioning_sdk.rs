//! Provisioning through the DPS contract with Azure's own Python device SDK,
//! unmodified: `ProvisioningDeviceClient.create_from_symmetric_key` with a key
//! derived from an enrollment group's registers over MQTT/TLS on the hub's 8883
//! listener, then `IoTHubDeviceClient` connects with the result, sees the group's
//! initial twin and sends telemetry that is read back. Registering again is
//! idempotent; a disabled group and a wrong key are refused with nothing created; a
//! registration id that is no valid device id is answered 400 with an errorCode
//! (over the HTTPS device route, which the Python SDK does not use). The same SDK
//! provisions over MQTT over WebSocket on the HTTPS listener; an individual
//! enrollment registers through the HTTPS device routes (register, then poll the
//! operation) and its device then connects over MQTT.
//!
//! Needs a Python with the SDK: `$HUB_AZURE_PYTHON` or `target/azure-venv` (see
//! `hub_tests::azure::azure_python`).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hub_tests::Hub;
use hub_tests::azure::{azure_python, start_hub_on_loopback, workspace};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Runs the provisioning device script to its end; returns its events.
async fn provision(
    hub: &Hub,
    host: &str,
    scope: &str,
    registration_id: &str,
    key: &str,
    websockets: bool,
) -> Result<Vec<Value>> {
    let python = azure_python().await?;
    let mut child = Command::new(&python)
        .arg(workspace().join("tests/compat/azure_provision.py"))
        .args([host, scope, registration_id, key])
        .arg(hub.data_dir().join("certs/ca.pem"))
        .args(websockets.then_some("websockets"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the Azure SDK provisioning device")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut events = Vec::new();
    let run = async {
        while let Some(line) = lines.next_line().await? {
            events.push(
                serde_json::from_str::<Value>(&line)
                    .with_context(|| format!("the device said {line:?}"))?,
            );
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .context("the Azure SDK provisioning device did not finish in 90 s")??;
    let _ = child.wait().await;
    Ok(events)
}

fn event<'a>(events: &'a [Value], kind: &str) -> Result<&'a Value> {
    events
        .iter()
        .find(|e| e["event"] == kind)
        .with_context(|| format!("no {kind} event in {events:?}"))
}

/// The device key of `registration_id` in a group, computed here (not by the hub):
/// base64 of HMAC-SHA256 over the id, keyed with the decoded group key.
fn derive(group_key: &str, registration_id: &str) -> Result<String> {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&STANDARD.decode(group_key)?)?;
    mac.update(registration_id.as_bytes());
    Ok(STANDARD.encode(mac.finalize().into_bytes()))
}

struct Api<'a> {
    hub: &'a Hub,
    token: String,
}

impl Api<'_> {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut request = self
            .hub
            .http()
            .request(method, format!("{}{path}", self.hub.url()))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| format!("body {text:?}"))?
        };
        Ok((status, body))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_python_sdk_provisions_through_an_enrollment_group() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (hub, host) = start_hub_on_loopback(dir.path(), 200, false).await?;
    let scope_out = hub.cli(&["dps", "scope"]).await?;
    let scope = scope_out.stdout.trim().to_string();
    assert!(
        scope.starts_with("0ne") && scope.len() == 11,
        "scope {scope:?}; stderr {}",
        scope_out.stderr
    );
    let api = Api {
        hub: &hub,
        token: hub
            .token(
                "registry:read,registry:write,service:connect,provisioning:read,provisioning:write",
            )
            .await?,
    };

    // An enrollment group with an initial twin.
    let (status, group) = api
        .call(
            reqwest::Method::PUT,
            "/enrollmentGroups/fleet?api-version=2021-10-01",
            Some(json!({
                "enrollmentGroupId": "fleet",
                "attestation": {"type": "symmetricKey"},
                "provisioningStatus": "enabled",
                "initialTwin": {
                    "tags": {"site": "lab"},
                    "properties": {"desired": {"interval": 30}}
                }
            })),
        )
        .await?;
    assert_eq!(status, 200, "{group}");
    let group_key = group["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .context("generated group key")?
        .to_string();
    let device_key = derive(&group_key, "sensor-1")?;
    let cli_key = hub.cli(&["dps", "device-key", "fleet", "sensor-1"]).await?;
    assert_eq!(cli_key.stdout.trim(), device_key, "{}", cli_key.stderr);

    // Register, connect with the result, see the initial twin, send telemetry.
    let events = provision(&hub, &host, &scope, "sensor-1", &device_key, false).await?;
    let registered = event(&events, "registered")?;
    assert_eq!(registered["status"], "assigned", "{events:?}");
    assert_eq!(registered["device_id"], "sensor-1");
    assert_eq!(registered["assigned_hub"], host.as_str());
    assert_eq!(registered["substatus"], "initialAssignment");
    let twin = event(&events, "twin")?;
    assert_eq!(twin["desired"]["interval"], 30, "{twin}");
    event(&events, "sent")?;
    let telemetry = hub.read_telemetry(&api.token).await?;
    let message = telemetry
        .iter()
        .find(|m| m["systemProperties"]["message-id"] == "dps-sensor-1")
        .with_context(|| format!("the provisioned device's telemetry in {telemetry:?}"))?;
    assert_eq!(message["deviceId"], "sensor-1");
    assert_eq!(message["body"], json!({"provisioned": "sensor-1"}));

    // The registry device carries the derived key; the twin the group's tags; the
    // registration is stored.
    let (status, device) = api
        .call(reqwest::Method::GET, "/devices/sensor-1", None)
        .await?;
    assert_eq!(status, 200);
    assert_eq!(
        device["authentication"]["symmetricKey"]["primaryKey"],
        device_key.as_str()
    );
    let (_, twin) = api
        .call(reqwest::Method::GET, "/twins/sensor-1", None)
        .await?;
    assert_eq!(twin["tags"]["site"], "lab");
    let (status, registration) = api
        .call(reqwest::Method::GET, "/registrations/sensor-1", None)
        .await?;
    assert_eq!(status, 200, "{registration}");
    assert_eq!(registration["status"], "assigned");
    assert_eq!(registration["deviceId"], "sensor-1");
    assert_eq!(registration["symmetricKey"]["enrollmentGroupId"], "fleet");
    let first_etag = registration["etag"].clone();

    // Registering again is idempotent: same device, twin kept (migrated), new etag.
    let (status, _) = api
        .call(
            reqwest::Method::PATCH,
            "/twins/sensor-1",
            Some(json!({"properties": {"desired": {"interval": 60}}})),
        )
        .await?;
    assert_eq!(status, 200);
    let events = provision(&hub, &host, &scope, "sensor-1", &device_key, false).await?;
    let registered = event(&events, "registered")?;
    assert_eq!(registered["status"], "assigned", "{events:?}");
    assert_eq!(registered["substatus"], "deviceDataMigrated");
    assert_eq!(event(&events, "twin")?["desired"]["interval"], 60);
    let (_, registration) = api
        .call(reqwest::Method::GET, "/registrations/sensor-1", None)
        .await?;
    assert_ne!(registration["etag"], first_etag);
    let (_, devices) = api.call(reqwest::Method::GET, "/devices", None).await?;
    assert_eq!(devices.as_array().map(Vec::len), Some(1), "{devices}");

    // A disabled group is refused, and nothing is created.
    let (status, disabled) = api
        .call(
            reqwest::Method::PUT,
            "/enrollmentGroups/frozen",
            Some(json!({"provisioningStatus": "disabled"})),
        )
        .await?;
    assert_eq!(status, 200, "{disabled}");
    let frozen_key = derive(
        disabled["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .context("key")?,
        "sensor-2",
    )?;
    let events = provision(&hub, &host, &scope, "sensor-2", &frozen_key, false).await?;
    let refused = event(&events, "error")?;
    assert!(
        refused["cause_message"]
            .as_str()
            .is_some_and(|m| m.contains("disabled")),
        "{events:?}"
    );
    let (status, _) = api
        .call(reqwest::Method::GET, "/devices/sensor-2", None)
        .await?;
    assert_eq!(status, 404, "a disabled group creates no device");
    let (_, registration) = api
        .call(reqwest::Method::GET, "/registrations/sensor-2", None)
        .await?;
    assert_eq!(registration["status"], "disabled");

    // A wrong key is refused at CONNECT.
    let wrong = derive(&group_key, "someone-else")?;
    let events = provision(&hub, &host, &scope, "sensor-3", &wrong, false).await?;
    event(&events, "error")?;
    let (status, _) = api
        .call(reqwest::Method::GET, "/devices/sensor-3", None)
        .await?;
    assert_eq!(status, 404, "a refused registration creates no device");
    let (status, _) = api
        .call(reqwest::Method::GET, "/registrations/sensor-3", None)
        .await?;
    assert_eq!(status, 404);

    // The HTTPS device contract answers a registration id that is no device id with
    // 400 and an errorCode, before any key is looked at.
    let bad_id = "bad id!";
    let sr = format!("{scope}/registrations/{bad_id}");
    let token = hub::auth::sas::sign_resource(
        &sr,
        &STANDARD.decode(&group_key)?,
        hub::auth::unix_now() + 600,
    );
    let response = hub
        .http()
        .put(format!(
            "{}/{scope}/registrations/bad%20id%21/register?api-version=2021-06-01",
            hub.url()
        ))
        .header("Authorization", format!("{token}&skn=registration"))
        .json(&json!({"registrationId": bad_id}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await?;
    assert_eq!(body["errorCode"], 400_005, "{body}");

    // Deleting the group leaves its registrations and devices; the list shows it gone.
    let (status, _) = api
        .call(reqwest::Method::DELETE, "/enrollmentGroups/frozen", None)
        .await?;
    assert_eq!(status, 204);
    let (status, groups) = api
        .call(
            reqwest::Method::POST,
            "/enrollmentGroups/query",
            Some(json!({"query": "*"})),
        )
        .await?;
    assert_eq!(status, 200);
    let ids: Vec<&str> = groups
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["enrollmentGroupId"].as_str())
        .collect();
    assert_eq!(ids, vec!["fleet"]);

    if !hub.stop().await?.success() {
        bail!("the hub did not stop cleanly");
    }
    Ok(())
}

/// MQTT over WebSocket (`websockets=True`): the SDK dials `wss://HOST:443/$iothub/websocket`
/// for provisioning and for the hub connection alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_python_sdk_provisions_over_websockets() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (hub, host) = start_hub_on_loopback(dir.path(), 220, true).await?;
    let scope = hub.cli(&["dps", "scope"]).await?.stdout.trim().to_string();
    let api = Api {
        hub: &hub,
        token: hub
            .token("registry:read,service:connect,provisioning:write")
            .await?,
    };
    let (status, group) = api
        .call(
            reqwest::Method::PUT,
            "/enrollmentGroups/ws-fleet",
            Some(json!({"initialTwin": {"properties": {"desired": {"ws": true}}}})),
        )
        .await?;
    assert_eq!(status, 200, "{group}");
    let key = derive(
        group["attestation"]["symmetricKey"]["secondaryKey"]
            .as_str()
            .context("key")?,
        "ws-sensor",
    )?;
    let events = provision(&hub, &host, &scope, "ws-sensor", &key, true).await?;
    let registered = event(&events, "registered")?;
    assert_eq!(registered["status"], "assigned", "{events:?}");
    assert_eq!(registered["device_id"], "ws-sensor");
    assert_eq!(event(&events, "twin")?["desired"]["ws"], true);
    event(&events, "sent")?;
    let telemetry = hub.read_telemetry(&api.token).await?;
    assert!(
        telemetry
            .iter()
            .any(|m| m["systemProperties"]["message-id"] == "dps-ws-sensor"),
        "{telemetry:?}"
    );
    assert!(hub.stop().await?.success());
    Ok(())
}

/// An individual enrollment through the HTTPS device contract (what Node's `-http`
/// transport and IoT Edge use): register → 202 `assigning` with `Retry-After`, poll →
/// 200 `assigned`; the device then connects with the enrollment's key. Errors carry
/// Azure's `errorCode`; a disabled enrollment answers `disabled`; a stale If-Match
/// on the enrollment is 412.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_individual_enrollment_registers_over_the_https_device_routes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let scope = hub.cli(&["dps", "scope"]).await?.stdout.trim().to_string();
    let api = Api {
        hub: &hub,
        token: hub
            .token("registry:read,provisioning:read,provisioning:write")
            .await?,
    };
    let key = STANDARD.encode([42u8; 32]);
    let (status, enrollment) = api
        .call(
            reqwest::Method::PUT,
            "/enrollments/meter-7?api-version=2021-10-01",
            Some(json!({
                "registrationId": "meter-7",
                "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}},
                "initialTwin": {"properties": {"desired": {"mode": "eco"}}}
            })),
        )
        .await?;
    assert_eq!(status, 200, "{enrollment}");
    assert_eq!(enrollment["registrationId"], "meter-7");

    let sign = |id: &str, key: &str, scope: &str| -> Result<String> {
        let token = hub::auth::sas::sign_resource(
            &format!("{scope}/registrations/{id}"),
            &STANDARD.decode(key)?,
            hub::auth::unix_now() + 600,
        );
        Ok(format!("{token}&skn=registration"))
    };
    let register = |id: &str, token: String, body: Value| {
        hub.http()
            .put(format!(
                "{}/{scope}/registrations/{id}/register?api-version=2021-06-01",
                hub.url()
            ))
            .header("Authorization", token)
            .json(&body)
            .send()
    };
    let response = register(
        "meter-7",
        sign("meter-7", &key, &scope)?,
        json!({"registrationId": "meter-7", "payload": {"model": "m7"}}),
    )
    .await?;
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let accepted: Value = response.json().await?;
    assert_eq!(accepted["status"], "assigning", "{accepted}");
    let operation = accepted["operationId"].as_str().context("operationId")?;
    let poll =
        |operation: &str| {
            hub.http()
            .get(format!(
                "{}/{scope}/registrations/meter-7/operations/{operation}?api-version=2021-06-01",
                hub.url()
            ))
            .header("Authorization", sign("meter-7", &key, &scope).unwrap_or_default())
            .send()
        };
    let response = poll(operation).await?;
    assert_eq!(response.status().as_u16(), 200);
    let outcome: Value = response.json().await?;
    assert_eq!(outcome["status"], "assigned", "{outcome}");
    let state = &outcome["registrationState"];
    assert_eq!(state["deviceId"], "meter-7");
    assert_eq!(state["assignedHub"], "localhost");
    assert_eq!(state["substatus"], "initialAssignment");
    assert_eq!(state["symmetricKey"]["registrationId"], "meter-7");
    let response = poll("5.0000.0000").await?;
    assert_eq!(response.status().as_u16(), 404);
    assert_eq!(response.json::<Value>().await?["errorCode"], 404_001);

    // The device connects with the enrollment's key and has the initial twin.
    let device = hub.connect_device("meter-7", &key, true).await?;
    drop(device);
    let (_, twin) = api
        .call(reqwest::Method::GET, "/twins/meter-7", None)
        .await?;
    assert_eq!(twin["properties"]["desired"]["mode"], "eco", "{twin}");

    // Wrong key, wrong scope: 401, nothing created.
    let other = STANDARD.encode([7u8; 32]);
    let response = register("meter-7", sign("meter-7", &other, &scope)?, json!({})).await?;
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(response.json::<Value>().await?["errorCode"], 401_002);
    let response = register("meter-7", sign("meter-7", &key, "0ne00000000")?, json!({})).await?;
    assert_eq!(response.status().as_u16(), 401);

    // A malformed body: 400, nothing created for a new enrollment.
    let (status, _) = api
        .call(
            reqwest::Method::PUT,
            "/enrollments/meter-8",
            Some(json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}}})),
        )
        .await?;
    assert_eq!(status, 200);
    let response = hub
        .http()
        .put(format!(
            "{}/{scope}/registrations/meter-8/register",
            hub.url()
        ))
        .header("Authorization", sign("meter-8", &key, &scope)?)
        .header("Content-Type", "application/json")
        .body("{\"registrationId\": ")
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(response.json::<Value>().await?["errorCode"], 400_004);
    let (status, _) = api
        .call(reqwest::Method::GET, "/devices/meter-8", None)
        .await?;
    assert_eq!(status, 404);

    // A stale etag is refused; disabling with the current one works, and a
    // registration then answers `disabled`.
    let (status, _) = api
        .call(
            reqwest::Method::PUT,
            "/enrollments/meter-7",
            Some(json!({"provisioningStatus": "disabled", "etag": "stale"})),
        )
        .await?;
    assert_eq!(status, 412);
    let (status, disabled) = api
        .call(
            reqwest::Method::PUT,
            "/enrollments/meter-7",
            Some(json!({"provisioningStatus": "disabled", "etag": enrollment["etag"]})),
        )
        .await?;
    assert_eq!(status, 200, "{disabled}");
    assert_eq!(
        disabled["attestation"]["symmetricKey"]["primaryKey"],
        key.as_str(),
        "an update keeps the keys it does not name"
    );
    let response = register("meter-7", sign("meter-7", &key, &scope)?, json!({})).await?;
    assert_eq!(response.status().as_u16(), 202);
    let accepted: Value = response.json().await?;
    let response = poll(accepted["operationId"].as_str().context("operationId")?).await?;
    let outcome: Value = response.json().await?;
    assert_eq!(outcome["status"], "disabled", "{outcome}");
    assert!(hub.stop().await?.success());
    Ok(())
}

/// Issues a device certificate from the hub's CA (`hub cert device`); the script's
/// `x509:CERT:KEY` credential.
async fn issue(hub: &Hub, id: &str) -> Result<String> {
    let out = hub.cli(&["cert", "device", id]).await?;
    anyhow::ensure!(out.status.success(), "{}", out.stderr);
    let pem = std::path::PathBuf::from(out.stdout.trim());
    let key = pem.with_extension("key");
    Ok(format!("x509:{}:{}", pem.display(), key.display()))
}

/// An X.509 enrollment group: the group holds a CA certificate (here the hub's own
/// development CA, which `hub cert device` issues from); the unmodified SDK registers
/// with `create_from_x509_certificate` (no password, the certificate at the TLS
/// handshake, CN = registration id) and connects with the same certificate; the
/// registry device authenticates by the certificate's thumbprint. A certificate that
/// chains to no X.509 group is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_python_sdk_provisions_with_a_certificate_under_a_group_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // 90+: below the other loopback tests' ranges.
    let (hub, host) = start_hub_on_loopback(dir.path(), 90, false).await?;
    let scope = hub.cli(&["dps", "scope"]).await?.stdout.trim().to_string();
    let api = Api {
        hub: &hub,
        token: hub
            .token("registry:read,service:connect,provisioning:write")
            .await?,
    };
    // Before any X.509 group exists, the certificate is refused.
    let stray = issue(&hub, "cam-0").await?;
    let events = provision(&hub, &host, &scope, "cam-0", &stray, false).await?;
    event(&events, "error")?;

    let ca = std::fs::read_to_string(dir.path().join("certs/ca.pem"))?;
    let (status, group) = api
        .call(
            reqwest::Method::PUT,
            "/enrollmentGroups/cameras",
            Some(json!({
                "attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": ca}}}},
                "initialTwin": {"properties": {"desired": {"fps": 25}}}
            })),
        )
        .await?;
    assert_eq!(status, 200, "{group}");
    assert_eq!(group["attestation"]["type"], "x509");

    let credential = issue(&hub, "cam-1").await?;
    let events = provision(&hub, &host, &scope, "cam-1", &credential, false).await?;
    let registered = event(&events, "registered")?;
    assert_eq!(registered["status"], "assigned", "{events:?}");
    assert_eq!(registered["device_id"], "cam-1");
    assert_eq!(event(&events, "twin")?["desired"]["fps"], 25);
    event(&events, "sent")?;
    let (_, device) = api
        .call(reqwest::Method::GET, "/devices/cam-1", None)
        .await?;
    assert_eq!(device["authentication"]["type"], "selfSigned", "{device}");
    assert!(hub.stop().await?.success());
    Ok(())
}
