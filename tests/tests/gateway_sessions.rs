//! MQTT sessions at the gateway: CleanSession=0 subscriptions survive reconnects and
//! hub restarts (session-present=1), CleanSession=1 starts afresh, a second
//! connection replaces the first, disabling or deleting a device cuts it off at once,
//! an expiring credential closes the connection, twin answers go to the asking
//! connection, and an unclean drop ingests the will.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use hub::delivery::Subscription;
use hub::gateway::session::Outbound;
use hub::gateway::topic;
use hub::properties::PropertyBag;
use hub::registry::{DeviceId, DeviceSpec, DeviceStatus, IfMatch};
use hub_tests::inproc::InProcessHub;
use hub_tests::mqtt::{self, RawClient, azure_username, sas};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, LastWill, Login, Packet, PubAck};
use serde_json::json;
use tokio::net::TcpStream;

struct Device {
    id: String,
    token: String,
}

impl Device {
    async fn create(hub: &InProcessHub, id: &str) -> Result<Self> {
        let device = hub.create_device(id, json!({})).await?;
        Ok(Self {
            id: id.to_string(),
            token: sas("localhost", id, &InProcessHub::primary_key(&device)?, 600)?,
        })
    }

    async fn connect(
        &self,
        hub: &InProcessHub,
        clean: bool,
    ) -> Result<(RawClient<TcpStream>, bool)> {
        let mut client = mqtt::tcp(hub.mqtt).await?;
        let ack = client
            .connect(
                &self.id,
                Some(&azure_username("localhost", &self.id)),
                Some(&self.token),
                clean,
            )
            .await?;
        assert_eq!(ack.code, ConnectReturnCode::Success);
        Ok((client, ack.session_present))
    }
}

fn c2d(device: &str, id: u64) -> Outbound {
    let bag = PropertyBag(vec![
        ("$.mid".into(), format!("m-{id}")),
        (
            "$.to".into(),
            format!("/devices/{device}/messages/deviceBound"),
        ),
    ]);
    Outbound {
        topic: topic::cloud_to_device(device, &bag),
        payload: Bytes::from(format!("message {id}")),
        qos: QoS::AtLeastOnce,
        requires: Some(Subscription::CloudToDevice),
        id,
    }
}

/// Receives the next PUBLISH and acknowledges it.
async fn receive_and_ack(client: &mut RawClient<TcpStream>) -> Result<(String, Bytes)> {
    match client.recv().await? {
        Some(Packet::Publish(publish)) => {
            client
                .send(&Packet::PubAck(PubAck::new(publish.pkid)))
                .await?;
            Ok((publish.topic, publish.payload))
        }
        other => bail!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn persistent_sessions_survive_reconnects_and_restarts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = InProcessHub::start(dir.path()).await?;
    let device = Device::create(&hub, "keeper").await?;
    let id = DeviceId::parse("keeper")?;

    let (mut client, present) = device.connect(&hub, false).await?;
    assert!(!present, "first connect has no session");
    client
        .subscribe(&[
            "devices/keeper/messages/devicebound/#",
            "$iothub/methods/POST/#",
        ])
        .await?;
    client.send(&Packet::Disconnect).await?;
    client.expect_closed().await?;

    // Reconnect without subscribing again (Azure's SDKs do not).
    let (mut client, present) = device.connect(&hub, false).await?;
    assert!(present, "session-present=1 after a reconnect");
    hub.connections.deliver(&id, c2d("keeper", 1))?;
    let (topic, payload) = receive_and_ack(&mut client).await?;
    assert!(
        topic.starts_with("devices/keeper/messages/devicebound/"),
        "{topic}"
    );
    assert!(
        topic.contains("%24.mid=m-1") || topic.contains("$.mid=m-1"),
        "{topic}"
    );
    assert!(
        topic.contains("%2Fdevices%2Fkeeper%2Fmessages%2FdeviceBound"),
        "slashes escaped: {topic}"
    );
    assert_eq!(payload.as_ref(), b"message 1");
    hub.recorder
        .wait_for("delivery ack", |r| {
            r.delivered()
                .iter()
                .any(|(d, i)| d.as_str() == "keeper" && *i == 1)
        })
        .await?;
    drop(client);

    // After a hub restart, too.
    hub.stop().await?;
    let hub = InProcessHub::start(dir.path()).await?;
    let (mut client, present) = device.connect(&hub, false).await?;
    assert!(present, "session-present=1 after a hub restart");
    hub.connections.deliver(&id, c2d("keeper", 2))?;
    let (_, payload) = receive_and_ack(&mut client).await?;
    assert_eq!(payload.as_ref(), b"message 2");

    // CleanSession=1 drops the session: nothing is delivered, and it is gone after.
    drop(client);
    let (mut client, present) = device.connect(&hub, true).await?;
    assert!(!present);
    hub.connections.deliver(&id, c2d("keeper", 3))?;
    client.ping().await?; // A PINGRESP, not a PUBLISH, comes next.
    drop(client);
    let (_client, present) = device.connect(&hub, false).await?;
    assert!(!present, "the clean session removed the stored one");
    hub.stop().await
}

#[tokio::test]
async fn a_second_connection_replaces_the_first() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = InProcessHub::start(dir.path()).await?;
    let device = Device::create(&hub, "twin-peaks").await?;
    let (mut first, _) = device.connect(&hub, true).await?;
    let (mut second, _) = device.connect(&hub, true).await?;
    first.expect_closed().await?;
    second.ping().await?;
    assert!(
        hub.connections
            .is_connected(&DeviceId::parse("twin-peaks")?)
    );
    hub.stop().await
}

#[tokio::test]
async fn disabling_or_deleting_a_device_cuts_it_off_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = InProcessHub::start(dir.path()).await?;
    let to_disable = Device::create(&hub, "to-disable").await?;
    let to_delete = Device::create(&hub, "to-delete").await?;
    let (mut disabled_client, _) = to_disable.connect(&hub, true).await?;
    let (mut deleted_client, _) = to_delete.connect(&hub, true).await?;

    let started = Instant::now();
    let spec = DeviceSpec {
        status: Some(DeviceStatus::Disabled),
        ..DeviceSpec::default()
    };
    hub.registry
        .update(DeviceId::parse("to-disable")?, spec, IfMatch::Any)
        .await?;
    disabled_client.expect_closed().await?;
    hub.registry
        .delete(&DeviceId::parse("to-delete")?, None)
        .await?;
    deleted_client.expect_closed().await?;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cut off at once, took {:?}",
        started.elapsed()
    );

    // And they cannot come back.
    let mut client = mqtt::tcp(hub.mqtt).await?;
    let ack = client
        .connect(
            "to-disable",
            Some(&azure_username("localhost", "to-disable")),
            Some(&to_disable.token),
            true,
        )
        .await?;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    hub.stop().await
}

#[tokio::test]
async fn the_connection_closes_when_its_sas_token_expires() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = InProcessHub::start(dir.path()).await?;
    let created = hub.create_device("short-lived", json!({})).await?;
    let token = sas(
        "localhost",
        "short-lived",
        &InProcessHub::primary_key(&created)?,
        2,
    )?;
    let mut client = mqtt::tcp(hub.mqtt).await?;
    let ack = client
        .connect(
            "short-lived",
            Some(&azure_username("localhost", "short-lived")),
            Some(&token),
            true,
        )
        .await?;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let started = Instant::now();
    client.expect_closed().await?;
    assert!(
        started.elapsed() <= Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
    hub.stop().await
}

#[tokio::test]
async fn twin_answers_go_to_the_asking_connection_even_unsubscribed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = InProcessHub::start(dir.path()).await?;
    let device = Device::create(&hub, "asker").await?;
    let (mut client, _) = device.connect(&hub, true).await?;
    let mut get = rumqttc::mqttbytes::v4::Publish::new(
        "$iothub/twin/GET/?$rid=17",
        QoS::AtMostOnce,
        Vec::new(),
    );
    get.pkid = 0;
    client.send(&Packet::Publish(get)).await?;
    match client.recv().await? {
        Some(Packet::Publish(reply)) => {
            assert_eq!(reply.topic, "$iothub/twin/res/200/?$rid=17");
            assert!(!reply.payload.is_empty());
        }
        other => bail!("expected the twin answer, got {other:?}"),
    }
    client
        .publish_acked(
            "$iothub/twin/PATCH/properties/reported/?$rid=18",
            b"{\"fw\":2}",
        )
        .await?;
    match client.recv().await? {
        Some(Packet::Publish(reply)) => {
            assert_eq!(reply.topic, "$iothub/twin/res/204/?$rid=18&$version=2")
        }
        other => bail!("expected the patch answer, got {other:?}"),
    }
    client
        .publish_acked("$iothub/methods/res/200/?$rid=5", b"{\"ok\":true}")
        .await?;
    hub.recorder
        .wait_for("method answer", |r| !r.methods().is_empty())
        .await?;
    let (device_id, rid, status, payload) = hub.recorder.methods()[0].clone();
    assert_eq!(
        (device_id.as_str(), rid.as_str(), status),
        ("asker", "5", 200)
    );
    assert_eq!(payload.as_ref(), b"{\"ok\":true}");
    hub.stop().await
}

#[tokio::test]
async fn an_unclean_drop_ingests_the_will_as_telemetry() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = InProcessHub::start(dir.path()).await?;
    let device = Device::create(&hub, "willing").await?;
    let mut client = mqtt::tcp(hub.mqtt).await?;
    let mut connect = Connect::new("willing");
    connect.keep_alive = 60;
    connect.login = Some(Login::new(
        azure_username("localhost", "willing"),
        device.token.clone(),
    ));
    connect.last_will = Some(LastWill::new(
        "devices/willing/messages/events/",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    client.send(&Packet::Connect(connect)).await?;
    assert!(
        matches!(client.recv().await?, Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success)
    );
    drop(client); // No DISCONNECT: an unclean drop.
    hub.recorder
        .wait_for("will", |r| !r.telemetry().is_empty())
        .await?;
    let will = &hub.recorder.telemetry()[0];
    assert_eq!(will.body.as_ref(), b"gone");
    assert_eq!(will.properties.get("iothub-MessageType"), Some("Will"));
    hub.stop().await
}

/// A telemetry store whose commits fail, like a broken disk.
struct FailingStore;

#[async_trait::async_trait]
impl hub::telemetry::TelemetryIngest for FailingStore {
    async fn submit(
        &self,
        _messages: Vec<hub::telemetry::TelemetryMessage>,
    ) -> Result<hub::telemetry::Durable, hub::telemetry::IngestError> {
        Ok(Box::pin(async {
            Err(hub::telemetry::IngestError::Commit("injected fault".into()))
        }))
    }
}

#[tokio::test]
async fn a_failed_commit_is_never_acknowledged() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = hub_tests::inproc::test_config(dir.path());
    let hub = InProcessHub::start_with_services(config, |recorder| {
        hub::gateway::services::DeviceServices {
            telemetry: std::sync::Arc::new(FailingStore),
            twins: recorder.clone(),
            methods: recorder.clone(),
            deliveries: recorder.clone(),
            events: recorder,
        }
    })
    .await?;
    let device = Device::create(&hub, "unlucky").await?;
    let (mut client, _) = device.connect(&hub, true).await?;
    client
        .publish_qos1("devices/unlucky/messages/events/", b"lost")
        .await?;
    // No PUBACK: the connection closes, so the device sends the message again later.
    match client.recv().await? {
        None => {}
        Some(other) => bail!("expected the connection to close without a PUBACK, got {other:?}"),
    }
    hub.stop().await
}
