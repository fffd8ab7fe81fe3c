//! Azure's Embedded C SDK (azure-sdk-for-c, and the FreeRTOS, ESP32 and NetX samples
//! built on it) spoken byte for byte with a raw MQTT client against the real hub: its
//! CONNECT username, its four subscriptions, its telemetry topic and `%24.` property
//! bag, twin GET and reported patch by `$rid`, a direct method by raw name and its
//! response, and C2D whose system properties the SDK finds only by the `%24.` prefix.

use anyhow::{Context, Result, bail};
use hub_tests::Hub;
use hub_tests::mqtt::{self, RawClient};
use reqwest::StatusCode;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, PubAck, Publish};
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// The subscriptions `az_iot_hub_client` makes (its `*_SUBSCRIBE_TOPIC` constants).
const SUBSCRIPTIONS: [&str; 4] = [
    "devices/+/messages/devicebound/#",
    "$iothub/methods/POST/#",
    "$iothub/twin/res/#",
    "$iothub/twin/PATCH/properties/desired/#",
];

const MODEL_ID: &str = "dtmi:com:example:Thermostat;1";

/// The username `az_iot_hub_client_get_user_name` builds with a model id.
fn embedded_c_username(host: &str, device: &str) -> String {
    format!(
        "{host}/{device}/?api-version=2020-09-30&DeviceClientType=azsdk-c%2F1.5.0\
         &model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1"
    )
}

async fn connect(hub: &Hub, device: &str, key: &str) -> Result<RawClient<TcpStream>> {
    let mut client = mqtt::tcp(hub.endpoint("mqtt").context("no mqtt endpoint")?).await?;
    let password = mqtt::sas("localhost", device, key, 600)?;
    let ack = client
        .connect(
            device,
            Some(&embedded_c_username("localhost", device)),
            Some(&password),
            true,
        )
        .await?;
    if ack.code != ConnectReturnCode::Success {
        bail!("{device} refused: {:?}", ack.code);
    }
    Ok(client)
}

/// The next PUBLISH, acknowledging it at QoS 1 as the SDK's MQTT stack does; PUBACKs of
/// our own publishes in between are skipped.
async fn next_publish(client: &mut RawClient<TcpStream>) -> Result<Publish> {
    loop {
        match client.recv().await? {
            Some(Packet::Publish(publish)) => {
                if publish.qos == QoS::AtLeastOnce {
                    client
                        .send(&Packet::PubAck(PubAck::new(publish.pkid)))
                        .await?;
                }
                return Ok(publish);
            }
            Some(Packet::PubAck(_)) => {}
            other => bail!("expected a PUBLISH, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_c_topics_and_property_bags_byte_for_byte() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let key = hub.create_device(&token, "esp32-1").await?;
    let mut device = connect(&hub, "esp32-1", &key).await?;

    // All four subscriptions granted at QoS 1 (none is 0x80).
    let ack = device.subscribe(&SUBSCRIPTIONS).await?;
    assert_eq!(ack.return_codes.len(), 4);
    for (filter, code) in SUBSCRIPTIONS.iter().zip(&ack.return_codes) {
        assert_eq!(
            *code,
            rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(QoS::AtLeastOnce),
            "{filter}"
        );
    }

    // Telemetry with the SDK's topic and an application-built `%24.` bag.
    let ack = device
        .publish_acked(
            "devices/esp32-1/messages/events/%24.mid=1&%24.ct=application%2Fjson&%24.ce=utf-8&prop=1",
            br#"{"temperature":21.5}"#,
        )
        .await?;
    assert!(ack.pkid > 0);
    let messages = hub.read_telemetry(&token).await?;
    let message = messages
        .iter()
        .find(|m| m["deviceId"] == "esp32-1")
        .with_context(|| format!("telemetry not read back: {messages:?}"))?;
    let system = &message["systemProperties"];
    assert_eq!(system["message-id"], "1");
    assert_eq!(system["content-type"], "application/json");
    assert_eq!(system["content-encoding"], "utf-8");
    assert_eq!(system["dt-dataschema"], MODEL_ID);
    assert_eq!(message["properties"]["prop"], "1");
    assert_eq!(message["body"]["temperature"], json!(21.5));

    // Twin GET by `$rid`.
    device.publish_qos1("$iothub/twin/GET/?$rid=1", b"").await?;
    let response = next_publish(&mut device).await?;
    assert_eq!(response.topic, "$iothub/twin/res/200/?$rid=1");
    let twin: Value = serde_json::from_slice(&response.payload)?;
    assert!(twin["desired"]["$version"].is_number(), "{twin}");
    assert!(twin["reported"]["$version"].is_number(), "{twin}");

    // Reported patch: 204 with the new version.
    device
        .publish_qos1(
            "$iothub/twin/PATCH/properties/reported/?$rid=2",
            br#"{"targetTemperature":{"value":21.5,"ac":200,"av":1}}"#,
        )
        .await?;
    let response = next_publish(&mut device).await?;
    let version = response
        .topic
        .strip_prefix("$iothub/twin/res/204/?$rid=2&$version=")
        .with_context(|| format!("reported patch response: {}", response.topic))?;
    assert!(version.parse::<u64>().is_ok(), "{}", response.topic);

    // A desired patch from the service arrives on the SDK's PATCH topic.
    let patched = hub
        .http()
        .patch(format!("{}/twins/esp32-1", hub.url()))
        .bearer_auth(&token)
        .json(&json!({"properties": {"desired": {"targetTemperature": 23}}}))
        .send()
        .await?;
    assert_eq!(patched.status(), StatusCode::OK);
    let push = next_publish(&mut device).await?;
    assert!(
        push.topic
            .starts_with("$iothub/twin/PATCH/properties/desired/?$version="),
        "{}",
        push.topic
    );
    let desired: Value = serde_json::from_slice(&push.payload)?;
    assert_eq!(desired["targetTemperature"], 23);

    // A component command: the name arrives raw, and the SDK's response completes the call.
    let invoke = {
        let client = hub.http().clone();
        let url = format!("{}/twins/esp32-1/methods", hub.url());
        let token = token.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"methodName": "thermostat1*getMaxMinReport", "payload": {"since": "2026-11-30T00:00:00Z"}, "responseTimeoutInSeconds": 30}))
                .send()
                .await
        })
    };
    let request = next_publish(&mut device).await?;
    let rid = request
        .topic
        .strip_prefix("$iothub/methods/POST/thermostat1*getMaxMinReport/?$rid=")
        .with_context(|| format!("method request topic: {}", request.topic))?
        .to_string();
    assert!(!rid.is_empty() && !rid.contains('&'), "{}", request.topic);
    let payload: Value = serde_json::from_slice(&request.payload)?;
    assert_eq!(payload["since"], "2026-11-30T00:00:00Z");
    device
        .publish_qos1(
            &format!("$iothub/methods/res/200/?$rid={rid}"),
            br#"{"maxTemp":23.0,"minTemp":20.5}"#,
        )
        .await?;
    let result = invoke.await??;
    assert_eq!(result.status(), StatusCode::OK);
    let result: Value = result.json().await?;
    assert_eq!(result["status"], 200);
    assert_eq!(result["payload"]["maxTemp"], json!(23.0));

    // C2D: system properties written `%24.`, as az_iot_hub_client_c2d_parse_received_topic
    // and az_iot_message_properties_find expect them.
    let sent = hub
        .http()
        .post(format!("{}/devices/esp32-1/messages/deviceBound", hub.url()))
        .bearer_auth(&token)
        .json(&json!({"body": "reboot", "messageId": "c2d-1", "correlationId": "corr-1", "contentType": "text/plain", "properties": {"color": "red"}}))
        .send()
        .await?;
    assert_eq!(sent.status(), StatusCode::ACCEPTED);
    let c2d = next_publish(&mut device).await?;
    let bag = c2d
        .topic
        .strip_prefix("devices/esp32-1/messages/devicebound/")
        .with_context(|| format!("C2D topic: {}", c2d.topic))?;
    let pairs: Vec<&str> = bag.split('&').collect();
    assert!(pairs.contains(&"%24.mid=c2d-1"), "{bag}");
    assert!(pairs.contains(&"%24.cid=corr-1"), "{bag}");
    assert!(pairs.contains(&"%24.ct=text%2Fplain"), "{bag}");
    assert!(
        pairs.contains(&"%24.to=%2Fdevices%2Fesp32-1%2Fmessages%2FdeviceBound"),
        "{bag}"
    );
    assert!(pairs.contains(&"color=red"), "{bag}");
    assert!(
        !bag.contains("$."),
        "no unescaped system property keys: {bag}"
    );
    assert_eq!(c2d.payload.as_ref(), b"reboot");

    device.ping().await?;
    hub.stop().await?;
    Ok(())
}
