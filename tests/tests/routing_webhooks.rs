//! Routing to webhooks and named streams, end to end with a real hub and a real HTTP
//! receiver process: a condition routes only matching messages, a message matching
//! no route goes to the fallback, enrichments (static and `$twin`) arrive, a route
//! to a named stream is read back over REST; invalid configurations get 400 naming
//! the JSON path; the routing test and the CLI.

use std::time::Duration;

use anyhow::Result;
use hub_tests::webhook::{Receiver, put_routing, read_stream};
use hub_tests::{Hub, HubOptions};
use serde_json::{Value, json};

const JSON: &str = "$.ct=application%2Fjson&$.ce=utf-8";

async fn hub() -> Result<(tempfile::TempDir, Hub, String)> {
    let dir = tempfile::tempdir()?;
    let hub = HubOptions::new(dir.path()).start().await?;
    let token = hub.owner_token().await?;
    Ok((dir, hub, token))
}

fn body_of(event: &Value) -> Value {
    event["data"]["body"].clone()
}

#[tokio::test]
async fn a_condition_routes_only_matching_messages_the_rest_falls_back_and_enrichments_arrive()
-> Result<()> {
    let (_dir, hub, token) = hub().await?;
    let hot = Receiver::start(Duration::ZERO).await?;
    let rest = Receiver::start(Duration::ZERO).await?;
    let key = hub.create_device(&token, "thermo-1").await?;
    let patched = hub
        .http()
        .patch(format!("{}/twins/thermo-1", hub.url()))
        .bearer_auth(&token)
        .json(&json!({ "tags": { "site": "oslo" } }))
        .send()
        .await?;
    assert!(patched.status().is_success());
    put_routing(
        &hub,
        &token,
        &json!({
            "endpoints": {
                "webhooks": [
                    { "name": "hot", "url": hot.url("/hot"), "headers": { "x-secret": "s3" } },
                    { "name": "rest", "url": rest.url("/rest"), "schema": "eventGrid" }
                ]
            },
            "routes": [{
                "name": "too-hot", "source": "DeviceMessages", "condition": "$body.temp > 30",
                "endpointNames": ["hot"], "isEnabled": true
            }, {
                "name": "disabled", "source": "DeviceMessages", "condition": "true",
                "endpointNames": ["hot"], "isEnabled": false
            }],
            "fallbackRoute": {
                "name": "$fallback", "source": "DeviceMessages", "condition": "true",
                "endpointNames": ["rest"], "isEnabled": true
            },
            "enrichments": [
                { "key": "region", "value": "north", "endpointNames": ["hot"] },
                { "key": "site", "value": "$twin.tags.site", "endpointNames": ["hot"] },
                { "key": "hub", "value": "$iothubname", "endpointNames": ["rest"] }
            ]
        }),
    )
    .await?;
    let mut device = hub.connect_device("thermo-1", &key, true).await?;
    let topic = format!("devices/thermo-1/messages/events/{JSON}");
    for temp in [10, 35, 20, 40] {
        device
            .publish_acked(&topic, json!({ "temp": temp }).to_string().as_bytes())
            .await?;
    }
    let got_hot = match hot
        .wait_for(Duration::from_secs(20), |r| r.events.len() >= 2)
        .await
    {
        Ok(got) => got,
        Err(err) => {
            eprintln!("{}\nrest: {:?}", hub.stderr(), rest.received().await?);
            return Err(err);
        }
    };
    let got_rest = rest
        .wait_for(Duration::from_secs(20), |r| r.events.len() >= 2)
        .await?;
    // Give a wrongly routed message time to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_hot = hot.received().await.unwrap_or(got_hot);
    let got_rest = rest.received().await.unwrap_or(got_rest);

    let temps = |events: &[(String, Value)], body: fn(&Value) -> Value| -> Vec<Value> {
        events
            .iter()
            .map(|(_, e)| body(e)["temp"].clone())
            .collect()
    };
    assert_eq!(temps(&got_hot.events, body_of), vec![json!(35), json!(40)]);
    let (content_type, event) = &got_hot.events[0];
    assert!(
        content_type.starts_with("application/cloudevents+json"),
        "{content_type}"
    );
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["type"], "Microsoft.Devices.DeviceTelemetry");
    assert_eq!(event["subject"], "devices/thermo-1");
    assert_eq!(event["data"]["properties"]["region"], "north");
    assert_eq!(event["data"]["properties"]["site"], "oslo");
    assert_eq!(
        event["data"]["systemProperties"]["iothub-connection-device-id"],
        "thermo-1"
    );

    // The fallback endpoint speaks Event Grid's schema.
    let grid = |e: &Value| e["data"]["body"].clone();
    assert_eq!(temps(&got_rest.events, grid), vec![json!(10), json!(20)]);
    let (content_type, event) = &got_rest.events[0];
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    assert_eq!(event["eventType"], "Microsoft.Devices.DeviceTelemetry");
    assert_eq!(event["data"]["properties"]["hub"], "localhost");
    assert!(event["data"]["properties"].get("region").is_none());

    // Every message is in the built-in stream regardless.
    assert_eq!(hub.read_telemetry(&token).await?.len(), 4);

    let metrics = hub.metrics().await?;
    assert!(
        metrics.contains("hub_routing_delivered_total{endpoint=\"hot\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("hub_routing_latency_seconds_count{endpoint=\"rest\"} 2"));
    Ok(())
}

#[tokio::test]
async fn a_route_to_a_named_stream_is_read_back_over_rest() -> Result<()> {
    let (_dir, hub, token) = hub().await?;
    let key = hub.create_device(&token, "pump-7").await?;
    put_routing(
        &hub,
        &token,
        &json!({
            "endpoints": { "streams": [{ "name": "alerts", "partitions": 2 }] },
            "routes": [{
                "name": "critical", "source": "DeviceMessages",
                "condition": "level = 'critical'", "endpointNames": ["alerts"], "isEnabled": true
            }]
        }),
    )
    .await?;
    let mut device = hub.connect_device("pump-7", &key, true).await?;
    for (i, level) in ["critical", "info", "critical"].iter().enumerate() {
        let topic = format!("devices/pump-7/messages/events/$.mid=m{i}&level={level}");
        device
            .publish_acked(&topic, format!("n{i}").as_bytes())
            .await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let messages = loop {
        let messages = read_stream(&hub, &token, "alerts").await?;
        if messages.len() >= 2 || tokio::time::Instant::now() > deadline {
            break messages;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ids: Vec<&str> = messages
        .iter()
        .map(|m| {
            m["systemProperties"]["message-id"]
                .as_str()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(ids, vec!["m0", "m2"], "{messages:?}");
    assert_eq!(messages[0]["deviceId"], "pump-7");
    assert_eq!(messages[0]["properties"]["level"], "critical");
    let info = hub.get_json(&token, "/streams/alerts").await?;
    assert_eq!(info["partitionCount"], 2);

    // An unknown stream is a 404 with Azure's error body.
    let missing = hub
        .http()
        .get(format!("{}/streams/nope/partitions/0/messages", hub.url()))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await?;
    assert!(body["errorCode"].is_number(), "{body}");
    Ok(())
}

#[tokio::test]
async fn invalid_configurations_get_400_naming_the_json_path_and_change_nothing() -> Result<()> {
    let (_dir, hub, token) = hub().await?;
    let put = |body: String| {
        hub.http()
            .put(format!("{}/configuration/routing", hub.url()))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, path) in [
        (
            r#"{"routes":[{"name":"r","source":"DeviceMessages","endpointNames":["nowhere"],"isEnabled":true}]}"#,
            "routes[0].endpointNames[0]",
        ),
        (
            r#"{"routes":[{"name":"r","source":"DeviceMessages","condition":"$body.t >","endpointNames":["events"],"isEnabled":true}]}"#,
            "routes[0].condition",
        ),
        (
            r#"{"endpoints":{"webhooks":[{"name":"h","url":"ftp://x"}]}}"#,
            "endpoints.webhooks[0].url",
        ),
        (
            r#"{"routes":[{"name":"r","source":"Bogus","endpointNames":["events"],"isEnabled":true}]}"#,
            "routes[0].source",
        ),
        ("not json", "$"),
    ] {
        let response = put(body.to_string()).await?;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await?;
        assert_eq!(error["errorCode"], 400004, "{error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(path), "{message} should name {path}");
    }
    let config = hub.get_json(&token, "/configuration/routing").await?;
    assert_eq!(config["routes"], json!([]));
    // Without registry:write a PUT is refused.
    let reader = hub.token("registry:read").await?;
    let refused = hub
        .http()
        .put(format!("{}/configuration/routing", hub.url()))
        .bearer_auth(&reader)
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(refused.status(), 403);
    Ok(())
}

#[tokio::test]
async fn the_cli_sets_gets_and_tests_routes_and_the_configuration_survives_a_restart() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let hub = HubOptions::new(dir.path()).start().await?;
    let config = json!({
        "endpoints": { "streams": [{ "name": "alerts" }] },
        "routes": [{
            "name": "hot", "source": "DeviceMessages", "condition": "$body.temp > 30 AND $twin.tags.site = 'oslo'",
            "endpointNames": ["alerts"], "isEnabled": true
        }],
        "fallbackRoute": {
            "name": "$fallback", "source": "DeviceMessages", "condition": "true",
            "endpointNames": ["events"], "isEnabled": true
        }
    });
    let file = dir.path().join("routing.json");
    std::fs::write(&file, config.to_string())?;
    let set = hub
        .cli(&[
            "routing",
            "set",
            file.to_str().unwrap_or_default(),
            "--url",
            &hub.url(),
        ])
        .await?;
    assert!(set.status.success(), "{}", set.stderr);
    let sample = |temp: i32, site: &str| {
        json!({
            "routingSource": "DeviceMessages",
            "message": {
                "body": json!({ "temp": temp }).to_string(),
                "systemProperties": { "contentType": "application/json", "contentEncoding": "utf-8" }
            },
            "twin": { "tags": { "site": site } }
        })
    };
    let test_file = dir.path().join("sample.json");
    std::fs::write(&test_file, sample(35, "oslo").to_string())?;
    let test = hub
        .cli(&[
            "routing",
            "test",
            test_file.to_str().unwrap_or_default(),
            "--url",
            &hub.url(),
        ])
        .await?;
    assert!(test.status.success(), "{}", test.stderr);
    let answer: Value = serde_json::from_str(&test.stdout)?;
    assert_eq!(answer["routes"][0]["properties"]["name"], "hot", "{answer}");
    assert_eq!(answer["routes"].as_array().map(Vec::len), Some(1));
    std::fs::write(&test_file, sample(35, "bergen").to_string())?;
    let test = hub
        .cli(&[
            "routing",
            "test",
            test_file.to_str().unwrap_or_default(),
            "--url",
            &hub.url(),
        ])
        .await?;
    let answer: Value = serde_json::from_str(&test.stdout)?;
    assert_eq!(
        answer["routes"][0]["properties"]["name"], "$fallback",
        "{answer}"
    );

    hub.stop().await?;
    let hub = HubOptions::new(dir.path()).start().await?;
    let get = hub.cli(&["routing", "get"]).await?;
    assert!(get.status.success(), "{}", get.stderr);
    let stored: Value = serde_json::from_str(&get.stdout)?;
    assert_eq!(stored["routes"], config["routes"]);
    assert_eq!(stored["endpoints"]["streams"][0]["name"], "alerts");
    Ok(())
}
