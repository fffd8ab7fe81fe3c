//! The admin CLI against a real hub: `hub device create|get|list|disable|enable|delete`
//! and `hub cert device`, using the owner key and endpoints.json of the data dir.

use anyhow::Result;
use hub_tests::Hub;
use serde_json::Value;

fn json(out: &hub_tests::Output) -> Result<Value> {
    assert!(out.status.success(), "stderr: {}", out.stderr);
    Ok(serde_json::from_str(&out.stdout)?)
}

#[tokio::test]
async fn the_cli_manages_devices_through_the_api() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;

    let created = json(&hub.cli(&["device", "create", "cli-1"]).await?)?;
    assert_eq!(created["deviceId"], "cli-1");
    assert!(created["authentication"]["symmetricKey"]["primaryKey"].is_string());
    json(
        &hub.cli(&["device", "create", "cli-2", "--auth", "ca"])
            .await?,
    )?;

    let fetched = json(&hub.cli(&["device", "get", "cli-1"]).await?)?;
    assert_eq!(fetched, created);

    let listed = json(&hub.cli(&["device", "list", "--page-size", "1"]).await?)?;
    let ids: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|d| d["deviceId"].as_str())
        .collect();
    assert_eq!(ids, ["cli-1", "cli-2"]);

    let disabled = json(
        &hub.cli(&["device", "disable", "cli-1", "--reason", "stolen"])
            .await?,
    )?;
    assert_eq!(disabled["status"], "disabled");
    assert_eq!(disabled["statusReason"], "stolen");
    let enabled = json(&hub.cli(&["device", "enable", "cli-1"]).await?)?;
    assert_eq!(enabled["status"], "enabled");

    // Deleting with a stale etag is refused; with the current one it works.
    let stale = hub
        .cli(&["device", "delete", "cli-1", "--etag", "stale"])
        .await?;
    assert_eq!(stale.status.code(), Some(1));
    assert!(stale.stderr.contains("412001"), "{}", stale.stderr);
    let etag = enabled["etag"].as_str().expect("etag");
    let deleted = hub
        .cli(&["device", "delete", "cli-1", "--etag", etag])
        .await?;
    assert!(deleted.status.success(), "{}", deleted.stderr);

    let missing = hub.cli(&["device", "get", "cli-1"]).await?;
    assert_eq!(missing.status.code(), Some(1));
    assert!(missing.stderr.contains("404001"), "{}", missing.stderr);

    let duplicate = hub.cli(&["device", "create", "cli-2"]).await?;
    assert!(duplicate.stderr.contains("409001"), "{}", duplicate.stderr);

    let bad_id = hub.cli(&["device", "create", "a b"]).await?;
    assert!(bad_id.stderr.contains("400004"), "{}", bad_id.stderr);
    Ok(())
}

#[tokio::test]
async fn the_cli_says_when_no_hub_is_running() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    assert!(hub.stop().await?.success());
    let dir_arg = dir.path().to_string_lossy().into_owned();
    let out = hub_tests::run_hub(&["device", "list", "--data-dir", &dir_arg]).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.contains("is a hub running"), "{}", out.stderr);
    Ok(())
}

#[tokio::test]
async fn cert_device_issues_a_certificate_from_the_data_dir_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let out_dir = dir.path().join("issued");
    let out_arg = out_dir.to_string_lossy().into_owned();
    let out = hub
        .cli(&["cert", "device", "cam-7", "--out", &out_arg])
        .await?;
    assert!(out.status.success(), "{}", out.stderr);
    let pem = std::fs::read_to_string(out_dir.join("cam-7.pem"))?;
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(out_dir.join("cam-7.key").is_file());
    Ok(())
}

#[tokio::test]
async fn device_sas_prints_credentials_the_gateway_accepts() -> anyhow::Result<()> {
    use rumqttc::mqttbytes::v4::ConnectReturnCode;
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    json(&hub.cli(&["device", "create", "sas-cli"]).await?)?;
    let creds = json(
        &hub.cli(&["device", "sas", "sas-cli", "--ttl", "600"])
            .await?,
    )?;
    let mut client = hub_tests::mqtt::tcp(hub.endpoint("mqtt").expect("mqtt endpoint")).await?;
    let ack = client
        .connect(
            creds["clientId"].as_str().expect("clientId"),
            creds["username"].as_str(),
            creds["password"].as_str(),
            false,
        )
        .await?;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    client.ping().await?;
    Ok(())
}

#[tokio::test]
async fn the_cli_reads_patches_and_queries_twins() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    json(&hub.cli(&["device", "create", "twin-cli"]).await?)?;
    let patched = json(
        &hub.cli(&[
            "twin",
            "patch",
            "twin-cli",
            r#"{"tags": {"site": "oslo"}, "properties": {"desired": {"interval": 9}}}"#,
        ])
        .await?,
    )?;
    assert_eq!(patched["properties"]["desired"]["interval"], 9);
    let twin = json(&hub.cli(&["twin", "get", "twin-cli"]).await?)?;
    assert_eq!(twin["tags"]["site"], "oslo");
    let stale = hub
        .cli(&[
            "twin",
            "patch",
            "twin-cli",
            r#"{"tags": {"x": 1}}"#,
            "--etag",
            "stale",
        ])
        .await?;
    assert!(stale.stderr.contains("412001"), "{}", stale.stderr);
    let found = json(
        &hub.cli(&[
            "twin",
            "query",
            "SELECT deviceId FROM devices WHERE tags.site = 'oslo'",
        ])
        .await?,
    )?;
    assert_eq!(found, serde_json::json!([{"deviceId": "twin-cli"}]));
    Ok(())
}
