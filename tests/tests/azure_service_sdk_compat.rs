//! Compatibility with Azure's own Node.js service SDK: the unmodified npm package
//! `azure-iothub` runs against the hub's HTTPS listener on a loopback address's port
//! 443 with connection strings printed by `hub connection-string` (issue 16). The
//! script `tests/compat/azure_service.js` creates a device with generated keys, gets,
//! updates and deletes it with the SDK's default `If-Match`, bulk-adds 150 devices and
//! lists them all, gets and updates twins, runs a paged tag query, invokes a direct
//! method on a device connected with Azure's Node device SDK, sees DeviceNotFoundError
//! after the delete, and is refused with a wrong key and, for a write, with the
//! `registryRead` policy. This test then checks the hub's side through the REST API.
//!
//! Needs node and npm, and the SDKs in `target/azure-node` (`hub_tests::azure`).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hub_tests::Hub;
use hub_tests::azure::{azure_node_modules, start_hub_on_loopback, workspace};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// How long the whole script may take (150 creates, a device connection, a method).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

async fn connection_string(hub: &Hub, host: &str, policy: &str) -> Result<String> {
    let out = hub
        .cli(&["connection-string", "--hostname", host, "--policy", policy])
        .await?;
    anyhow::ensure!(out.status.success(), "connection-string: {}", out.stderr);
    Ok(out.stdout.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_node_service_sdk_works_unmodified_over_https() -> Result<()> {
    let modules = azure_node_modules().await?;
    let dir = tempfile::tempdir()?;
    // 180+: other tests bind 127.0.100+, 120+, 140+ and 160+.
    let (hub, host) = start_hub_on_loopback(dir.path(), 180, true).await?;
    let owner = connection_string(&hub, &host, "iothubowner").await?;
    let reader = connection_string(&hub, &host, "registryRead").await?;
    assert!(owner.starts_with(&format!("HostName={host};SharedAccessKeyName=iothubowner;")));

    let mut child = Command::new("node")
        .arg(workspace().join("tests/compat/azure_service.js"))
        .arg(&owner)
        .arg(&reader)
        .env("NODE_PATH", &modules)
        // The service SDK has no CA option: Node adds this file to its trust store.
        .env("NODE_EXTRA_CA_CERTS", dir.path().join("certs/ca.pem"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start node with the Azure service SDK (is node installed?)")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut steps = Vec::new();
    let mut done = false;
    let deadline = tokio::time::Instant::now() + SCRIPT_TIMEOUT;
    while let Some(line) = tokio::time::timeout_at(deadline, lines.next_line())
        .await
        .with_context(|| format!("the service SDK script did not finish; steps {steps:?}"))??
    {
        let event: Value =
            serde_json::from_str(&line).with_context(|| format!("the script said {line:?}"))?;
        match event["event"].as_str() {
            Some("step") => steps.push(event["name"].as_str().unwrap_or_default().to_string()),
            Some("done") => done = true,
            Some("error") => bail!(
                "the Azure service SDK script failed after steps {steps:?}: {}",
                event["error"]
            ),
            _ => bail!("unexpected output from the script: {line}"),
        }
    }
    let status = tokio::time::timeout_at(deadline, child.wait()).await??;
    assert!(status.success(), "the script exited with {status}");
    assert!(done, "the script ended without finishing; steps {steps:?}");
    assert_eq!(
        steps,
        [
            "create",
            "get",
            "update",
            "bulk_and_list",
            "twin",
            "query",
            "method",
            "delete",
            "wrong_key",
            "read_only"
        ]
    );

    // The hub's side: what the SDK did is there, what it was refused is not.
    let token = hub.owner_token().await?;
    let get = |id: &str| {
        hub.http()
            .get(format!("{}/devices/{id}", hub.url()))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(get("svc-1").await?.status(), 404);
    assert_eq!(get("not-allowed").await?.status(), 404);
    assert_eq!(get("bulk-149").await?.status(), 200);
    let twin: Value = hub
        .http()
        .get(format!("{}/twins/bulk-000", hub.url()))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(twin["tags"]["fleet"], "node");
    assert_eq!(twin["properties"]["desired"]["rate"], 3);
    assert!(hub.stop().await?.success());
    Ok(())
}
