//! Device twins end to end against the real binary, with raw MQTT devices and HTTP:
//! desired patches reach online devices and survive reconnects, reported patches
//! bump versions and metadata, etags guard service writes, limits are refused with
//! the rule named, a device only ever sees its own twin, and concurrent writers
//! never lose an update.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use hub_tests::Hub;
use hub_tests::mqtt::RawClient;
use reqwest::StatusCode;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use serde_json::{Value, json};
use tokio::net::TcpStream;

struct Api {
    hub: Hub,
    token: String,
}

impl Api {
    async fn start(dir: &std::path::Path) -> Result<Self> {
        let hub = Hub::start(dir).await?;
        let token = hub.owner_token().await?;
        Ok(Self { hub, token })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.hub.url())
    }

    async fn create(&self, id: &str) -> Result<String> {
        self.hub.create_device(&self.token, id).await
    }

    async fn twin(&self, id: &str) -> Result<Value> {
        let response = self
            .hub
            .http()
            .get(self.url(&format!("/twins/{id}")))
            .bearer_auth(&self.token)
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == StatusCode::OK,
            "GET twin {id}: {}",
            response.status()
        );
        Ok(response.json().await?)
    }

    async fn patch(&self, id: &str, body: Value, etag: Option<&str>) -> Result<reqwest::Response> {
        let mut request = self
            .hub
            .http()
            .patch(self.url(&format!("/twins/{id}")))
            .bearer_auth(&self.token)
            .json(&body);
        if let Some(etag) = etag {
            request = request.header("If-Match", etag);
        }
        Ok(request.send().await?)
    }

    async fn connect(&self, id: &str, key: &str, clean: bool) -> Result<RawClient<TcpStream>> {
        self.hub.connect_device(id, key, clean).await
    }
}

/// Sends a twin request and returns (status, query, body) of its answer.
async fn twin_request(
    client: &mut RawClient<TcpStream>,
    topic: &str,
    body: &[u8],
    rid: &str,
) -> Result<(String, Value)> {
    let mut publish = Publish::new(topic, QoS::AtMostOnce, body.to_vec());
    publish.pkid = 0;
    client.send(&Packet::Publish(publish)).await?;
    loop {
        match client.recv().await? {
            Some(Packet::Publish(reply))
                if reply.topic.starts_with("$iothub/twin/res/")
                    && reply.topic.contains(&format!("$rid={rid}")) =>
            {
                let body = if reply.payload.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&reply.payload)?
                };
                return Ok((reply.topic, body));
            }
            Some(Packet::Publish(other)) => {
                if other.qos == QoS::AtLeastOnce {
                    client
                        .send(&Packet::PubAck(PubAck::new(other.pkid)))
                        .await?;
                }
            }
            Some(_) => {}
            None => bail!("connection closed while waiting for the twin answer"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_patches_reach_the_device_and_survive_a_reconnect() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::start(dir.path()).await?;
    let key = api.create("thermo").await?;
    let mut device = api.connect("thermo", &key, false).await?;
    device
        .subscribe(&[
            "$iothub/twin/PATCH/properties/desired/#",
            "$iothub/twin/res/#",
        ])
        .await?;

    let response = api.patch("thermo", json!({"properties": {"desired": {"target": 21, "fan": {"speed": 2}}}, "tags": {"room": "kitchen"}}), None).await?;
    assert_eq!(response.status(), StatusCode::OK);
    let twin: Value = response.json().await?;
    assert_eq!(twin["properties"]["desired"]["$version"], 2);
    match device.recv().await? {
        Some(Packet::Publish(push)) => {
            assert_eq!(
                push.topic,
                "$iothub/twin/PATCH/properties/desired/?$version=2"
            );
            let body: Value = serde_json::from_slice(&push.payload)?;
            assert_eq!(
                body,
                json!({"target": 21, "fan": {"speed": 2}, "$version": 2})
            );
            if push.qos == QoS::AtLeastOnce {
                device.send(&Packet::PubAck(PubAck::new(push.pkid))).await?;
            }
        }
        other => bail!("expected the desired patch, got {other:?}"),
    }
    drop(device);

    // Offline, another patch; after reconnecting (no re-subscribe), GET shows both.
    api.patch(
        "thermo",
        json!({"properties": {"desired": {"target": null, "mode": "eco"}}}),
        None,
    )
    .await?;
    let mut device = api.connect("thermo", &key, false).await?;
    let (topic, body) = twin_request(&mut device, "$iothub/twin/GET/?$rid=g1", b"", "g1").await?;
    assert_eq!(topic, "$iothub/twin/res/200/?$rid=g1");
    assert_eq!(
        body["desired"],
        json!({"fan": {"speed": 2}, "mode": "eco", "$version": 3})
    );
    assert_eq!(body["reported"], json!({"$version": 1}));
    assert!(
        body.get("tags").is_none() && body["desired"].get("$metadata").is_none(),
        "device view has no tags or metadata"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_patches_bump_versions_and_metadata() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::start(dir.path()).await?;
    let key = api.create("meter").await?;
    let before = api.twin("meter").await?;
    let mut device = api.connect("meter", &key, true).await?;
    let (topic, _) = twin_request(
        &mut device,
        "$iothub/twin/PATCH/properties/reported/?$rid=1",
        br#"{"fw": "1.2", "net": {"rssi": -60}}"#,
        "1",
    )
    .await?;
    assert_eq!(topic, "$iothub/twin/res/204/?$rid=1&$version=2");
    let (topic, _) = twin_request(
        &mut device,
        "$iothub/twin/PATCH/properties/reported/?$rid=2",
        br#"{"net": {"rssi": null, "ip": "10.0.0.2"}}"#,
        "2",
    )
    .await?;
    assert_eq!(topic, "$iothub/twin/res/204/?$rid=2&$version=3");

    let twin = api.twin("meter").await?;
    let reported = &twin["properties"]["reported"];
    assert_eq!(reported["fw"], "1.2");
    assert_eq!(reported["net"], json!({"ip": "10.0.0.2"}));
    assert_eq!(reported["$version"], 3);
    assert!(reported["$metadata"]["$lastUpdated"].is_string());
    assert!(reported["$metadata"]["net"]["ip"]["$lastUpdated"].is_string());
    assert!(reported["$metadata"]["net"].get("rssi").is_none());
    assert!(twin["version"].as_u64() > before["version"].as_u64());
    assert_ne!(twin["etag"], before["etag"]);
    assert_eq!(twin["connectionState"], "Connected");

    // Bad reported patches get 400 on the response topic, with Azure's errorCode (the
    // Node SDK treats a body without it as success) and the rule named.
    let (topic, body) = twin_request(
        &mut device,
        "$iothub/twin/PATCH/properties/reported/?$rid=3",
        br#"{"a.b": 1}"#,
        "3",
    )
    .await?;
    assert_eq!(topic, "$iothub/twin/res/400/?$rid=3");
    assert_eq!(body["errorCode"], 400004, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("key \"a.b\"")),
        "{body}"
    );
    let big = json!({ "blob": "x".repeat(40 * 1024) }).to_string();
    let (topic, body) = twin_request(
        &mut device,
        "$iothub/twin/PATCH/properties/reported/?$rid=4",
        big.as_bytes(),
        "4",
    )
    .await?;
    assert_eq!(topic, "$iothub/twin/res/400/?$rid=4");
    assert_eq!(body["errorCode"], 400004, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("exceeds the limit")),
        "{body}"
    );
    let (topic, body) = twin_request(
        &mut device,
        "$iothub/twin/PATCH/properties/reported/?$rid=5",
        b"not json",
        "5",
    )
    .await?;
    assert_eq!(topic, "$iothub/twin/res/400/?$rid=5");
    assert_eq!(body["errorCode"], 400004, "{body}");
    assert_eq!(
        api.twin("meter").await?["properties"]["reported"]["$version"],
        3,
        "refused patches change nothing"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_writes_check_etags_and_limits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::start(dir.path()).await?;
    api.create("guarded").await?;
    let twin = api.twin("guarded").await?;
    let etag = twin["etag"].as_str().context("etag")?.to_string();
    let ok = api
        .patch(
            "guarded",
            json!({"tags": {"a": 1}}),
            Some(&format!("\"{etag}\"")),
        )
        .await?;
    assert_eq!(ok.status(), StatusCode::OK);
    let stale = api
        .patch("guarded", json!({"tags": {"a": 2}}), Some(&etag))
        .await?;
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(stale.json::<Value>().await?["errorCode"], 412001);

    for (body, rule) in [
        (json!({"tags": {"big": "x".repeat(9000)}}), "tags"),
        (
            json!({"properties": {"desired": {"$bad": 1}}}),
            "key \"$bad\"",
        ),
        (
            json!({"properties": {"desired": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": {"k": 1}}}}}}}}}}}}}),
            "deeper than 10",
        ),
        (
            json!({"properties": {"reported": {"x": 1}}}),
            "written by the device",
        ),
        (json!({"tags": 5}), "must be a JSON object"),
    ] {
        let response = api.patch("guarded", body, None).await?;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{rule}");
        let error: Value = response.json().await?;
        assert_eq!(error["errorCode"], 400004);
        assert!(
            error["message"].as_str().is_some_and(|m| m.contains(rule)),
            "{rule}: {error}"
        );
    }

    // PUT replaces tags and desired.
    let replaced = api
        .hub
        .http()
        .put(api.url("/twins/guarded"))
        .bearer_auth(&api.token)
        .json(&json!({"tags": {"b": 2}, "properties": {"desired": {"x": 1}}}))
        .send()
        .await?;
    assert_eq!(replaced.status(), StatusCode::OK);
    let twin = api.twin("guarded").await?;
    assert_eq!(twin["tags"], json!({"b": 2}));
    assert_eq!(twin["properties"]["desired"]["x"], 1);
    let missing = api
        .hub
        .http()
        .get(api.url("/twins/nobody"))
        .bearer_auth(&api.token)
        .send()
        .await?;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_only_ever_sees_its_own_twin() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::start(dir.path()).await?;
    let alice = api.create("alice").await?;
    api.create("bob").await?;
    api.patch(
        "bob",
        json!({"properties": {"desired": {"secret": "bob's"}}}),
        None,
    )
    .await?;
    let mut device = api.connect("alice", &alice, true).await?;
    let (_, body) = twin_request(&mut device, "$iothub/twin/GET/?$rid=7", b"", "7").await?;
    assert!(!body.to_string().contains("bob's"));
    // Another device's topics are refused.
    let ack = device
        .subscribe(&["devices/bob/messages/devicebound/#", "$iothub/twin/#"])
        .await?;
    assert!(
        ack.return_codes
            .iter()
            .all(|c| *c == rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_device_and_service_writers_lose_no_update() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = std::sync::Arc::new(Api::start(dir.path()).await?);
    let key = api.create("busy").await?;
    const ROUNDS: u64 = 30;
    let mut tasks = Vec::new();
    // Four service writers, each on its own desired key, and tags.
    for writer in 0..4 {
        let api = std::sync::Arc::clone(&api);
        tasks.push(tokio::spawn(async move {
            for round in 1..=ROUNDS {
                let response = api
                    .patch("busy", json!({"properties": {"desired": {format!("w{writer}"): round}}, "tags": {format!("t{writer}"): round}}), None)
                    .await?;
                anyhow::ensure!(response.status() == StatusCode::OK);
            }
            Ok(())
        }));
    }
    // Two device connections (two ids would be two twins; one id would replace):
    // one device patching reported keys in sequence.
    let mut device = api.connect("busy", &key, true).await?;
    tasks.push(tokio::spawn(async move {
        for round in 1..=ROUNDS {
            let rid = format!("r{round}");
            let body = json!({"counter": round, format!("k{}", round % 5): round}).to_string();
            let (topic, _) = twin_request(
                &mut device,
                &format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
                body.as_bytes(),
                &rid,
            )
            .await?;
            anyhow::ensure!(topic.starts_with("$iothub/twin/res/204/"), "{topic}");
        }
        Ok(())
    }));
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task).await???;
    }
    // The model: every writer's last value, and one version per patch.
    let twin = api.twin("busy").await?;
    let desired = &twin["properties"]["desired"];
    let reported = &twin["properties"]["reported"];
    for writer in 0..4 {
        assert_eq!(desired[format!("w{writer}")], ROUNDS, "{desired}");
        assert_eq!(twin["tags"][format!("t{writer}")], ROUNDS);
    }
    assert_eq!(desired["$version"], 1 + 4 * ROUNDS);
    assert_eq!(reported["counter"], ROUNDS);
    for k in 0..5u64 {
        let last = (1..=ROUNDS).filter(|r| r % 5 == k).max().context("round")?;
        assert_eq!(reported[format!("k{k}")], last);
    }
    assert_eq!(reported["$version"], 1 + ROUNDS);
    assert_eq!(twin["version"], 1 + 4 * ROUNDS + ROUNDS);

    // And it all survives a restart (the write-behind committed it).
    let api = std::sync::Arc::try_unwrap(api)
        .ok()
        .context("api still shared")?;
    let Api { hub, token } = api;
    assert!(hub.stop().await?.success());
    let hub = Hub::start(dir.path()).await?;
    let api = Api { hub, token };
    assert_eq!(api.twin("busy").await?["properties"], twin["properties"]);
    Ok(())
}
