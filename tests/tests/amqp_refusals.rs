//! Bad input on the AMQP endpoint (issue 24), with a real AMQP client (`fe2o3-amqp`'s
//! connector) on the plain listener: an attach before any CBS token, to an unknown
//! address, forged, expired and wrong-policy tokens, a policy without ServiceConnect,
//! per-message C2D refusals (unknown device, too large, bad `to`) that leave the link
//! attached, SASL PLAIN, garbage after the header, a non-AMQP header, and session and
//! link floods over the configured bounds — each refused with an AMQP error
//! condition, and the hub serving the next client unaffected.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::messaging::{Body, Message, Outcome};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Receiver, Sender, Session};
use hub_tests::amqp::{STEP, data, key, message, open, put_token, token};
use hub_tests::{Hub, HubOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// A hub named `localhost` (so its Event Hub-compatible entity is `localhost`) with
/// the plain AMQP listener and small session and link bounds.
async fn start() -> Result<(Hub, tempfile::TempDir, SocketAddr)> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("amqp-limits.toml");
    std::fs::write(
        &config,
        "[amqp]\nmax_sessions = 4\nmax_links_per_session = 4\n",
    )?;
    let hub = HubOptions::new(dir.path())
        .args(["--amqp", "127.0.0.1:0", "--config"])
        .args([config.to_string_lossy().into_owned()])
        .start()
        .await?;
    let amqp = hub.endpoint("amqp").context("hub ready has amqp=")?;
    Ok((hub, dir, amqp))
}

/// The error a sender attach ends with (refused at attach or detached right after).
async fn sender_refusal(
    session: &mut fe2o3_amqp::session::SessionHandle<()>,
    address: &str,
) -> String {
    match timeout(
        STEP,
        Sender::attach(session, format!("s-{address}"), address),
    )
    .await
    {
        Ok(Err(err)) => format!("{err:?}"),
        Ok(Ok(mut sender)) => match timeout(STEP, sender.on_detach()).await {
            Ok(err) => format!("{err:?}"),
            Err(_) => "still attached".to_string(),
        },
        Err(_) => "attach timed out".to_string(),
    }
}

async fn receiver_refusal(
    session: &mut fe2o3_amqp::session::SessionHandle<()>,
    address: &str,
) -> String {
    match timeout(
        STEP,
        Receiver::attach(session, format!("r-{address}"), address),
    )
    .await
    {
        Ok(Err(err)) => format!("{err:?}"),
        Ok(Ok(mut receiver)) => match timeout(STEP, receiver.recv::<Body<Value>>()).await {
            Ok(Err(err)) => format!("{err:?}"),
            Ok(Ok(_)) => "a message arrived".to_string(),
            Err(_) => "still attached".to_string(),
        },
        Err(_) => "attach timed out".to_string(),
    }
}

/// The rejected outcome's error of a send, or "accepted".
async fn outcome(sender: &mut Sender, message: Message<Body<Value>>) -> Result<String> {
    Ok(
        match timeout(STEP, sender.send(message))
            .await
            .context("send")??
        {
            Outcome::Accepted(_) => "accepted".to_string(),
            Outcome::Rejected(rejected) => format!("{:?}", rejected.error),
            other => format!("{other:?}"),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_amqp_conditions_and_leave_the_hub_serving() -> Result<()> {
    let (hub, dir, addr) = start().await?;
    let token_admin = hub.owner_token().await?;
    hub.create_device(&token_admin, "dev-1").await?;
    let service = key(dir.path(), "service")?;
    let reader = key(dir.path(), "registryRead")?;

    // Before any token: unauthorized; an unknown address: not found.
    let (mut connection, mut session) = open(addr, None).await?;
    let refusal = sender_refusal(&mut session, "/messages/devicebound").await;
    assert!(
        refusal.contains("UnauthorizedAccess"),
        "attach before CBS: {refusal}"
    );
    let refusal = receiver_refusal(
        &mut session,
        "localhost/ConsumerGroups/$Default/Partitions/0",
    )
    .await;
    assert!(
        refusal.contains("UnauthorizedAccess"),
        "read before CBS: {refusal}"
    );
    let refusal = sender_refusal(&mut session, "/no/such/node").await;
    assert!(refusal.contains("NotFound"), "unknown address: {refusal}");

    // Tokens: forged, expired, another hub, no ServiceConnect → 401; good → 200.
    let forged = token("localhost", "service", &reader, 3600)?;
    assert_eq!(put_token(&mut session, "localhost", &forged).await?, 401);
    let expired = token("localhost", "service", &service, -10)?;
    assert_eq!(put_token(&mut session, "localhost", &expired).await?, 401);
    let elsewhere = token("other-hub", "service", &service, 3600)?;
    assert_eq!(put_token(&mut session, "other-hub", &elsewhere).await?, 401);
    let read_only = token("localhost", "registryRead", &reader, 3600)?;
    assert_eq!(put_token(&mut session, "localhost", &read_only).await?, 401);
    let refusal = sender_refusal(&mut session, "/messages/devicebound").await;
    assert!(
        refusal.contains("UnauthorizedAccess"),
        "after refused tokens: {refusal}"
    );
    let good = token("localhost", "service", &service, 3600)?;
    assert_eq!(put_token(&mut session, "localhost", &good).await?, 200);

    // Per-message refusals keep the link.
    let mut c2d = Sender::attach(&mut session, "c2d", "/messages/devicebound").await?;
    let to = |id: &str| format!("/devices/{id}/messages/devicebound");
    let sent = outcome(
        &mut c2d,
        message(Some(&to("nobody")), &[], data(b"x"), None),
    )
    .await?;
    assert!(sent.contains("NotFound"), "unknown device: {sent}");
    let big = vec![b'x'; 70 * 1024];
    let sent = outcome(&mut c2d, message(Some(&to("dev-1")), &[], data(&big), None)).await?;
    assert!(sent.contains("MessageSizeExceeded"), "too large: {sent}");
    let sent = outcome(
        &mut c2d,
        message(Some("/devices/dev-1"), &[], data(b"x"), None),
    )
    .await?;
    assert!(sent.contains("argument-error"), "bad to: {sent}");
    let sent = outcome(
        &mut c2d,
        message(
            Some(&to("dev-1")),
            &[("iothub-ack", "sometimes")],
            data(b"x"),
            None,
        ),
    )
    .await?;
    assert!(sent.contains("argument-error"), "bad iothub-ack: {sent}");
    let sent = outcome(
        &mut c2d,
        message(
            Some(&to("dev-1")),
            &[("color", "red")],
            data(b"hello"),
            Some("ok-1"),
        ),
    )
    .await?;
    assert_eq!(sent, "accepted");
    let _ = c2d.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;

    // SASL PLAIN with `{policy}@sas.root.{hub}` authenticates the connection.
    let plain = SaslProfile::Plain {
        username: "service@sas.root.localhost".into(),
        password: good.clone(),
    };
    let (mut connection, mut session) = open(addr, Some(plain)).await?;
    let mut c2d = Sender::attach(&mut session, "c2d", "/messages/devicebound").await?;
    let sent = outcome(
        &mut c2d,
        message(Some(&to("dev-1")), &[], data(b"plain"), None),
    )
    .await?;
    assert_eq!(sent, "accepted");
    let _ = c2d.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;
    let wrong = SaslProfile::Plain {
        username: "service@sas.root.localhost".into(),
        password: forged.clone(),
    };
    assert!(
        open(addr, Some(wrong)).await.is_err(),
        "a forged PLAIN password is refused"
    );

    // Floods over the bounds (4 sessions, 4 links a session) end that connection only.
    let (connection, mut session) = open(addr, Some(SaslProfile::Anonymous)).await?;
    assert_eq!(put_token(&mut session, "localhost", &good).await?, 200);
    let mut links = Vec::new();
    for i in 0..4 {
        links.push(
            timeout(
                STEP,
                Sender::attach(&mut session, format!("l{i}"), "/messages/devicebound"),
            )
            .await
            .context("attach")??,
        );
    }
    let refusal = sender_refusal(&mut session, "/messages/devicebound").await;
    assert!(
        refusal.contains("ResourceLimitExceeded"),
        "the fifth link: {refusal}"
    );
    // The first four still work.
    let sent = outcome(
        &mut links[0],
        message(Some(&to("dev-1")), &[], data(b"l0"), None),
    )
    .await?;
    assert_eq!(sent, "accepted");
    drop(links);
    drop(session);
    drop(connection);
    let (mut connection, _first) = open(addr, None).await?;
    let mut sessions = Vec::new();
    let mut session_error = None;
    for _ in 0..6 {
        match timeout(STEP, Session::begin(&mut connection)).await {
            Ok(Ok(session)) => sessions.push(session),
            Ok(Err(err)) => {
                session_error = Some(format!("{err:?}"));
                break;
            }
            Err(_) => {
                session_error = Some("timed out".into());
                break;
            }
        }
    }
    assert!(
        session_error.is_some(),
        "more sessions than the bound: {}",
        sessions.len() + 1
    );
    drop(sessions);
    drop(connection);

    // Garbage after a good header, and a header that is not AMQP: the connection ends.
    let mut raw = TcpStream::connect(addr).await?;
    raw.write_all(b"AMQP\x00\x01\x00\x00\x00\x00\x00\x10\x02\x00\x00\x00garbagegarbage!!")
        .await?;
    let mut buf = vec![0u8; 1024];
    let ended = timeout(STEP, async {
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the hub closes a connection that sends garbage frames"
    );
    let mut raw = TcpStream::connect(addr).await?;
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
    let mut header = [0u8; 8];
    let answered = timeout(STEP, raw.read_exact(&mut header)).await;
    if let Ok(Ok(_)) = answered {
        assert_eq!(&header[..4], b"AMQP", "answered with the AMQP header");
    }

    // The hub serves the next client as before.
    let (mut connection, mut session) = open(addr, Some(SaslProfile::Anonymous)).await?;
    assert_eq!(
        put_token(&mut session, "sb://localhost/localhost", &good).await?,
        200
    );
    let _ = session.end().await;
    let _ = connection.close().await;
    let status = hub.stop().await?;
    assert!(status.success(), "the hub stops cleanly: {status}");
    Ok(())
}
