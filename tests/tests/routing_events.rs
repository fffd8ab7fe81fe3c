//! Device events end to end: a device created, connected, disconnected and deleted
//! yields those four events in order at a webhook (CloudEvents with Event Grid's
//! types and data) and in the built-in `device-events` stream, read like telemetry;
//! a twin patch (service desired, device reported) yields twin change events.

use std::time::Duration;

use anyhow::Result;
use hub_tests::webhook::{Receiver, put_routing, read_stream};
use hub_tests::{Hub, HubOptions};
use rumqttc::mqttbytes::v4::Packet;
use serde_json::{Value, json};

/// A hub whose routing sends `routes` to the webhook `hook` of a new receiver.
async fn hub_routing_to(
    hook: Value,
    routes: Value,
) -> Result<(tempfile::TempDir, Hub, String, Receiver)> {
    let dir = tempfile::tempdir()?;
    let hub = HubOptions::new(dir.path()).start().await?;
    let token = hub.owner_token().await?;
    let receiver = Receiver::start(Duration::ZERO).await?;
    let mut hook = hook;
    hook["url"] = Value::String(receiver.url(""));
    put_routing(
        &hub,
        &token,
        &json!({ "endpoints": { "webhooks": [hook] }, "routes": routes }),
    )
    .await?;
    Ok((dir, hub, token, receiver))
}

fn route(name: &str, source: &str, condition: &str, endpoint: &str) -> Value {
    json!({ "name": name, "source": source, "condition": condition,
            "endpointNames": [endpoint], "isEnabled": true })
}

#[tokio::test]
async fn created_connected_disconnected_and_deleted_arrive_in_order() -> Result<()> {
    let (_dir, hub, token, receiver) = hub_routing_to(
        json!({ "name": "events-hook" }),
        json!([
            route("lifecycle", "DeviceLifecycleEvents", "true", "events-hook"),
            route(
                "connections",
                "DeviceConnectionStateEvents",
                "true",
                "events-hook"
            ),
        ]),
    )
    .await?;
    let key = hub.create_device(&token, "lamp-3").await?;
    let mut device = hub.connect_device("lamp-3", &key, true).await?;
    device.ping().await?;
    device.send(&Packet::Disconnect).await?;
    drop(device);
    // The disconnect is seen before the delete.
    receiver
        .wait_for(Duration::from_secs(20), |r| r.events.len() >= 3)
        .await?;
    let deleted = hub
        .http()
        .delete(format!("{}/devices/lamp-3", hub.url()))
        .bearer_auth(&token)
        .send()
        .await?;
    assert!(deleted.status().is_success());
    let got = receiver
        .wait_for(Duration::from_secs(20), |r| r.events.len() >= 4)
        .await?;
    let types: Vec<&str> = got
        .events
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        types,
        vec![
            "Microsoft.Devices.DeviceCreated",
            "Microsoft.Devices.DeviceConnected",
            "Microsoft.Devices.DeviceDisconnected",
            "Microsoft.Devices.DeviceDeleted",
        ]
    );
    for (_, event) in &got.events {
        assert_eq!(event["subject"], "devices/lamp-3");
        assert_eq!(event["data"]["deviceId"], "lamp-3");
        assert_eq!(event["data"]["hubName"], "localhost");
    }
    let created = &got.events[0].1;
    assert_eq!(created["data"]["twin"]["deviceId"], "lamp-3");
    let connected = &got.events[1].1["data"]["deviceConnectionStateEventInfo"]["sequenceNumber"];
    let disconnected = &got.events[2].1["data"]["deviceConnectionStateEventInfo"]["sequenceNumber"];
    assert!(
        connected.as_str() < disconnected.as_str(),
        "{connected} {disconnected}"
    );

    // The same events, with Azure's properties, in the built-in events stream.
    let stored = read_stream(&hub, &token, "device-events").await?;
    let ops: Vec<&str> = stored
        .iter()
        .map(|m| m["properties"]["opType"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        ops,
        vec![
            "createDeviceIdentity",
            "deviceConnected",
            "deviceDisconnected",
            "deleteDeviceIdentity"
        ]
    );
    assert_eq!(
        stored[1]["properties"]["iothub-message-schema"],
        "deviceConnectionStateNotification"
    );
    assert_eq!(
        stored[1]["systemProperties"]["content-type"],
        "application/json"
    );
    assert!(stored[1]["body"]["sequenceNumber"].is_string());
    Ok(())
}

#[tokio::test]
async fn a_twin_patch_yields_a_twin_change_event() -> Result<()> {
    let (_dir, hub, token, receiver) = hub_routing_to(
        json!({ "name": "twins", "maxBatchSize": 10 }),
        json!([route(
            "twin",
            "TwinChangeEvents",
            "opType = 'updateTwin'",
            "twins"
        )]),
    )
    .await?;
    let key = hub.create_device(&token, "valve-9").await?;
    let patched = hub
        .http()
        .patch(format!("{}/twins/valve-9", hub.url()))
        .bearer_auth(&token)
        .json(&json!({ "properties": { "desired": { "open": true } } }))
        .send()
        .await?;
    assert!(patched.status().is_success());
    let mut device = hub.connect_device("valve-9", &key, true).await?;
    device.subscribe(&["$iothub/twin/res/#"]).await?;
    device
        .publish_qos1(
            "$iothub/twin/PATCH/properties/reported/?$rid=1",
            br#"{"opened": 1}"#,
        )
        .await?;
    let got = receiver
        .wait_for(Duration::from_secs(20), |r| r.events.len() >= 2)
        .await?;
    let (content_type, desired) = &got.events[0];
    // maxBatchSize > 1: CloudEvents' batch mode.
    assert!(
        content_type.starts_with("application/cloudevents-batch+json"),
        "{content_type}"
    );
    assert_eq!(desired["type"], "Microsoft.Devices.DeviceTwinChanged");
    assert_eq!(desired["data"]["opType"], "updateTwin");
    assert_eq!(desired["data"]["properties"]["desired"]["open"], true);
    assert_eq!(desired["data"]["properties"]["desired"]["$version"], 2);
    let reported = &got.events[1].1;
    assert_eq!(reported["data"]["properties"]["reported"]["opened"], 1);
    assert!(reported["data"]["version"].as_u64().is_some());
    Ok(())
}
