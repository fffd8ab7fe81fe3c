//! AMQP client helpers for the tests of the hub's AMQP endpoint, on `fe2o3-amqp`'s
//! connector: a connection with one session (bare header or SASL), a CBS put-token
//! that returns the reply's status code, policy SAS tokens, C2D-shaped messages.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Data, Message, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use hub::auth::policy::{KeySlot, PolicySet, sign};
use tokio::time::timeout;

/// Bound on every client step.
pub const STEP: Duration = Duration::from_secs(10);

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// `policy`'s primary key.
pub fn key(dir: &Path, policy: &str) -> Result<String> {
    let set = PolicySet::load(&dir.join("policies.json"))?;
    Ok(set
        .get(policy)
        .context("policy")?
        .key(KeySlot::Primary)
        .to_string())
}

pub fn token(resource: &str, policy: &str, key: &str, ttl: i64) -> Result<String> {
    let expiry = (unix_now() as i64 + ttl).max(1) as u64;
    sign(resource, policy, key, expiry).context("sign")
}

pub fn message(
    to: Option<&str>,
    props: &[(&str, &str)],
    body: Body<Value>,
    message_id: Option<&str>,
) -> Message<Body<Value>> {
    let mut app = ApplicationProperties::default();
    for (k, v) in props {
        app.0
            .insert(k.to_string(), SimpleValue::String(v.to_string()));
    }
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            to: to.map(str::to_string),
            message_id: message_id.map(|id| MessageId::String(id.to_string())),
            reply_to: Some("cbs-reply".to_string()),
            ..Properties::default()
        }),
        application_properties: Some(app),
        body,
        footer: None,
    }
}

pub fn data(bytes: &[u8]) -> Body<Value> {
    Body::Data(vec![Data(Binary::from(bytes.to_vec()))].into())
}

/// A connection (bare AMQP header, as azure-iothub; or SASL) with one session.
pub async fn open(
    addr: SocketAddr,
    sasl: Option<SaslProfile>,
) -> Result<(ConnectionHandle<()>, SessionHandle<()>)> {
    let builder = Connection::builder().container_id("refusals");
    let builder = match sasl {
        Some(profile) => builder.sasl_profile(profile),
        None => builder,
    };
    let mut connection = timeout(STEP, builder.open(format!("amqp://{addr}").as_str()))
        .await
        .context("open timed out")??;
    let session = timeout(STEP, Session::begin(&mut connection))
        .await
        .context("begin timed out")??;
    Ok((connection, session))
}

/// Puts `token` for `audience` on `$cbs`; returns the reply's status code.
pub async fn put_token(
    session: &mut SessionHandle<()>,
    audience: &str,
    token: &str,
) -> Result<i64> {
    let mut sender = Sender::attach(session, "cbs-sender", "$cbs").await?;
    let mut receiver = Receiver::attach(session, "cbs-reply", "$cbs").await?;
    let mut request = message(
        Some("$cbs"),
        &[
            ("operation", "put-token"),
            ("type", "servicebus.windows.net:sastoken"),
            ("name", audience),
        ],
        Body::Value(AmqpValue(Value::String(token.to_string()))),
        Some("req-1"),
    );
    if let Some(props) = &mut request.properties {
        props.message_id = Some(MessageId::String("req-1".into()));
    }
    timeout(STEP, sender.send(request))
        .await
        .context("cbs send")??;
    let reply: fe2o3_amqp::link::delivery::Delivery<Body<Value>> = timeout(STEP, receiver.recv())
        .await
        .context("cbs reply")??;
    receiver.accept(&reply).await?;
    let message = reply.message();
    let correlation = message
        .properties
        .as_ref()
        .and_then(|p| p.correlation_id.clone());
    anyhow::ensure!(
        correlation == Some(MessageId::String("req-1".into())),
        "the reply echoes the message id: {correlation:?}"
    );
    let status = message
        .application_properties
        .as_ref()
        .and_then(|app| app.0.get("status-code"))
        .context("no status-code")?;
    let _ = sender.close().await;
    let _ = receiver.close().await;
    match status {
        SimpleValue::Int(code) => Ok(i64::from(*code)),
        other => bail!("status-code is not an int: {other:?}"),
    }
}
