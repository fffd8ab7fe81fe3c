//! Cluster mode and the AMQP endpoint (issue 24): every hub node serves it from the
//! shared store. On a 3-node NATS JetStream cluster with hubs A and B: a C2D message
//! sent over AMQP to A reaches a device connected to B, and an Event Hubs-style
//! partition receiver on A reads telemetry the device published through B, with the
//! device id annotation and its properties.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{Body, Outcome};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};
use fe2o3_amqp::{Receiver, Sender};
use hub_tests::amqp::{STEP, data, key, message, open, put_token, token};
use hub_tests::nats::NatsCluster;
use hub_tests::{Hub, HubOptions};
use rumqttc::mqttbytes::v4::Packet;
use tokio::time::timeout;

/// A hub on `cluster` with the plain AMQP listener.
async fn cluster_hub(dir: &std::path::Path, cluster: &NatsCluster) -> Result<Hub> {
    let args = cluster.hub_args(dir)?;
    HubOptions::new(dir)
        .args(args)
        .args(["--amqp", "127.0.0.1:0"])
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_on_one_node_reaches_devices_and_telemetry_of_another() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let result = async {
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let a = cluster_hub(dir_a.path(), &cluster).await?;
        let b = cluster_hub(dir_b.path(), &cluster).await?;
        let owner = a.owner_token().await?;
        let device_key = a.create_device(&owner, "lamp").await?;

        // The device on B.
        let mut device = b.connect_device("lamp", &device_key, true).await?;
        device
            .subscribe(&["devices/lamp/messages/devicebound/#"])
            .await?;

        // C2D over AMQP on A (the policies are the cluster's: A's file has them).
        let addr = a.endpoint("amqp").context("amqp on A")?;
        let service = key(dir_a.path(), "service")?;
        let good = token("localhost", "service", &service, 3600)?;
        let (mut connection, mut session) = open(addr, Some(SaslProfile::Anonymous)).await?;
        ensure!(put_token(&mut session, "sb://localhost/localhost", &good).await? == 200);
        ensure!(put_token(&mut session, "localhost", &good).await? == 200);
        let mut c2d = Sender::attach(&mut session, "c2d", "/messages/devicebound").await?;
        let sent = timeout(
            STEP,
            c2d.send(message(
                Some("/devices/lamp/messages/devicebound"),
                &[("color", "red")],
                data(b"on"),
                Some("amqp-m-1"),
            )),
        )
        .await
        .context("send")??;
        ensure!(matches!(sent, Outcome::Accepted(_)), "{sent:?}");
        let delivered = loop {
            match timeout(Duration::from_secs(15), device.recv()).await {
                Ok(Ok(Some(Packet::Publish(publish)))) => break publish,
                Ok(Ok(Some(_))) => continue,
                other => bail!("no C2D message on B: {other:?}; B's log:\n{}", b.stderr()),
            }
        };
        ensure!(delivered.payload.as_ref() == b"on");
        ensure!(
            delivered.topic.contains("color=red") && delivered.topic.contains("amqp-m-1"),
            "{}",
            delivered.topic
        );

        // Telemetry through B, read over AMQP on A from the earliest position.
        device
            .publish_acked("devices/lamp/messages/events/k=v", b"{\"t\":1}")
            .await?;
        let mut found = None;
        for partition in 0..4 {
            let address = format!("localhost/ConsumerGroups/$Default/Partitions/{partition}");
            let mut receiver =
                Receiver::attach(&mut session, format!("p{partition}"), address).await?;
            let got: Result<Result<Delivery<Body<Value>>, _>, _> =
                timeout(Duration::from_secs(3), receiver.recv()).await;
            let _ = receiver.close().await;
            if let Ok(Ok(delivery)) = got {
                found = Some(delivery.into_message());
                break;
            }
        }
        let event = found.context("the telemetry event on A")?;
        let annotations = event.message_annotations.context("annotations")?;
        let device_id = annotations
            .0
            .get(&OwnedKey::Symbol(Symbol::from(
                "iothub-connection-device-id",
            )))
            .cloned();
        ensure!(
            device_id == Some(Value::String("lamp".into())),
            "{device_id:?}"
        );
        let k = event
            .application_properties
            .as_ref()
            .and_then(|app| app.0.get("k").cloned());
        ensure!(k == Some(SimpleValue::String("v".into())), "{k:?}");
        let _ = c2d.close().await;
        let _ = session.end().await;
        let _ = connection.close().await;
        Ok(())
    }
    .await;
    cluster.stop().await?;
    result
}
