//! Routing to a NATS subject, end to end: a real nats-server (started by the harness),
//! the hub's route with a condition, and a NATS subscriber that receives each matching
//! message as CloudEvents JSON with its id in `Nats-Msg-Id`.

use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use hub_tests::HubOptions;
use hub_tests::nats::NatsCluster;
use hub_tests::webhook::put_routing;
use serde_json::{Value, json};

#[tokio::test]
async fn a_route_to_a_nats_subject_publishes_cloud_events() -> Result<()> {
    let nats = NatsCluster::start(1).await?;
    let subscriber = async_nats::connect(nats.url(0)).await?;
    let mut messages = subscriber.subscribe("hub.alerts").await?;
    subscriber.flush().await?;

    let dir = tempfile::tempdir()?;
    let hub = HubOptions::new(dir.path()).start().await?;
    let token = hub.owner_token().await?;
    put_routing(
        &hub,
        &token,
        &json!({
            "endpoints": { "nats": [{ "name": "bus", "url": nats.url(0), "subject": "hub.alerts" }] },
            "routes": [{
                "name": "alerts", "source": "DeviceMessages", "condition": "level = 'alert'",
                "endpointNames": ["bus"], "isEnabled": true
            }]
        }),
    )
    .await?;
    let key = hub.create_device(&token, "n-1").await?;
    let mut device = hub.connect_device("n-1", &key, true).await?;
    for (i, level) in ["alert", "info", "alert"].iter().enumerate() {
        let topic = format!("devices/n-1/messages/events/$.mid=m{i}&level={level}");
        device.publish_acked(&topic, b"x").await?;
    }
    let mut got = Vec::new();
    while got.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(20), messages.next())
            .await
            .context("no NATS message in time")?
            .context("subscription ended")?;
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        let event: Value = serde_json::from_slice(&message.payload)?;
        got.push((id, event));
    }
    let ids: Vec<&str> = got
        .iter()
        .map(|(_, e)| {
            e["data"]["systemProperties"]["message-id"]
                .as_str()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(ids, vec!["m0", "m2"]);
    let (header_id, event) = &got[0];
    assert_eq!(event["id"].as_str(), Some(header_id.as_str()));
    assert_eq!(event["type"], "Microsoft.Devices.DeviceTelemetry");
    assert_eq!(event["subject"], "devices/n-1");
    // The "info" message was not published.
    let extra = tokio::time::timeout(Duration::from_millis(500), messages.next()).await;
    assert!(extra.is_err(), "unexpected message: {extra:?}");
    Ok(())
}
