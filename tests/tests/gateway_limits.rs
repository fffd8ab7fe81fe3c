//! The gateway's bounds against the real binary: `mqtt.max_connections` refuses the
//! connection over the cap, and running out of file descriptors makes new
//! connections wait (counted) while the open ones keep being served.

use std::time::Duration;

use anyhow::{Context, Result};
use hub_tests::mqtt::{self, azure_username, sas};
use hub_tests::{Hub, HubOptions};
use rumqttc::mqttbytes::v4::ConnectReturnCode;

async fn create_device_sas(hub: &Hub, token: &str, id: &str) -> Result<String> {
    let key = hub.create_device(token, id).await?;
    sas("localhost", id, &key, 600)
}

async fn connect(
    hub: &Hub,
    id: &str,
    token: &str,
) -> Result<mqtt::RawClient<tokio::net::TcpStream>> {
    let mut client = mqtt::tcp(hub.endpoint("mqtt").context("mqtt endpoint")?).await?;
    let ack = client
        .connect(
            id,
            Some(&azure_username("localhost", id)),
            Some(token),
            true,
        )
        .await?;
    anyhow::ensure!(
        ack.code == ConnectReturnCode::Success,
        "{id}: {:?}",
        ack.code
    );
    Ok(client)
}

async fn metric(hub: &Hub, name: &str) -> Result<u64> {
    let text = hub
        .http()
        .get(format!("{}/metrics", hub.url()))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .with_context(|| format!("{name} in {text}"))
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_and_counted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, "[mqtt]\nmax_connections = 3\n")?;
    let config = config.to_string_lossy().into_owned();
    let hub = HubOptions::new(&dir.path().join("data"))
        .args(["--config", config.as_str()])
        .start()
        .await?;
    let token = hub.owner_token().await?;

    let mut open = Vec::new();
    for n in 0..3 {
        let id = format!("capped-{n}");
        let sas_token = create_device_sas(&hub, &token, &id).await?;
        open.push(connect(&hub, &id, &sas_token).await?);
    }
    let mut over = mqtt::tcp(hub.endpoint("mqtt").context("mqtt")?).await?;
    over.expect_closed().await?;
    assert_eq!(
        metric(&hub, "hub_mqtt_connections_refused_limit_total").await?,
        1
    );
    for client in &mut open {
        client.ping().await?;
    }
    // A slot frees when a connection ends.
    drop(open.pop());
    let sas_token = create_device_sas(&hub, &token, "capped-late").await?;
    let mut late = None;
    for _ in 0..50 {
        if let Ok(client) = connect(&hub, "capped-late", &sas_token).await {
            late = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    late.context("a freed slot is reused")?.ping().await?;
    Ok(())
}

#[tokio::test]
async fn out_of_file_descriptors_the_hub_keeps_serving_open_connections() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = HubOptions::new(dir.path())
        .wrapped_in(["prlimit", "--nofile=96:96", "--"])
        .start()
        .await
        .context("prlimit (util-linux) runs the hub with a low open-file limit")?;
    let token = hub.owner_token().await?;
    let first_token = create_device_sas(&hub, &token, "early").await?;
    let late_token = create_device_sas(&hub, &token, "late").await?;
    let mut early = connect(&hub, "early", &first_token).await?;

    // Far more TCP connections than the hub has descriptors for.
    let mqtt_addr = hub.endpoint("mqtt").context("mqtt")?;
    let mut flood = Vec::new();
    for _ in 0..150 {
        flood.push(tokio::net::TcpStream::connect(mqtt_addr).await?);
    }
    // Hold them until the hub has run out (it logs that once), however busy the
    // machine is.
    for _ in 0..200 {
        if hub.stderr().contains("out of file descriptors") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        hub.stderr().contains("out of file descriptors"),
        "the shortage was logged"
    );
    // During the shortage the established device is still served.
    early.ping().await?;
    drop(flood);

    // Once descriptors free up, new devices connect again.
    let mut late = None;
    for _ in 0..100 {
        if let Ok(client) = connect(&hub, "late", &late_token).await {
            late = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    late.context("new connections are accepted again")?
        .ping()
        .await?;
    assert!(
        metric(&hub, "hub_mqtt_accept_no_fds_total").await? > 0,
        "the shortage was counted"
    );
    Ok(())
}
