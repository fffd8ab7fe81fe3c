//! Session state machine tests: no sockets, paused tokio time.

use super::*;
use rumqttc::mqttbytes::v4::{Connect, Login, SubscribeFilter};
use tokio::time::advance;

fn connect(client_id: &str, clean: bool, keep_alive: u16) -> Packet {
    let mut connect = Connect::new(client_id);
    connect.clean_session = clean;
    connect.keep_alive = keep_alive;
    connect.login = Some(Login::new(
        format!("hub/{client_id}/?api-version=2021-04-12"),
        "secret",
    ));
    Packet::Connect(connect)
}

fn accepted(id: &str, expires_in: Option<Duration>, subscriptions: &[Subscription]) -> Accepted {
    Accepted {
        device_id: DeviceId::parse(id).unwrap(),
        expires_at: expires_in.map(|d| Instant::now() + d),
        session_present: !subscriptions.is_empty(),
        subscriptions: subscriptions.iter().copied().collect(),
    }
}

/// A connected session for device `d1`.
fn connected(
    clean: bool,
    keep_alive: u16,
    expires_in: Option<Duration>,
    subs: &[Subscription],
) -> Session {
    let mut session = Session::new(SessionLimits::default(), Instant::now());
    let mut out = Vec::new();
    session.on_packet(connect("d1", clean, keep_alive), Instant::now(), &mut out);
    assert!(
        matches!(out.as_slice(), [Action::Authenticate(_)]),
        "{out:?}"
    );
    out.clear();
    session.on_auth(
        Ok(accepted("d1", expires_in, subs)),
        Instant::now(),
        &mut out,
    );
    assert!(
        matches!(
            out.as_slice(),
            [Action::Send(Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::Success,
                ..
            }))]
        ),
        "{out:?}"
    );
    session
}

fn closed_with(out: &[Action]) -> Option<&CloseReason> {
    out.iter().find_map(|a| match a {
        Action::Close(reason) => Some(reason),
        _ => None,
    })
}

#[tokio::test(start_paused = true)]
async fn connect_is_authenticated_and_the_password_is_not_in_debug_output() {
    let mut session = Session::new(SessionLimits::default(), Instant::now());
    let mut out = Vec::new();
    session.on_packet(connect("d1", false, 30), Instant::now(), &mut out);
    let Some(Action::Authenticate(request)) = out.first() else {
        panic!("{out:?}")
    };
    assert_eq!(request.client_id, "d1");
    assert_eq!(request.password.as_deref(), Some("secret"));
    assert!(!format!("{request:?}").contains("secret"));
    assert!(!request.clean_session);
}

#[tokio::test(start_paused = true)]
async fn refused_authentication_sends_connack_5_then_closes() {
    let mut session = Session::new(SessionLimits::default(), Instant::now());
    let mut out = Vec::new();
    session.on_packet(connect("d1", true, 30), Instant::now(), &mut out);
    out.clear();
    session.on_auth(
        Err(ConnectReturnCode::NotAuthorized),
        Instant::now(),
        &mut out,
    );
    assert!(matches!(
        out.as_slice(),
        [
            Action::Send(Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::NotAuthorized,
                session_present: false
            })),
            Action::Close(CloseReason::Refused(ConnectReturnCode::NotAuthorized))
        ]
    ));
    assert!(session.is_closed());
}

#[tokio::test(start_paused = true)]
async fn the_first_packet_must_be_connect_within_ten_seconds() {
    let mut session = Session::new(SessionLimits::default(), Instant::now());
    let mut out = Vec::new();
    session.on_packet(Packet::PingReq, Instant::now(), &mut out);
    assert!(matches!(
        closed_with(&out),
        Some(CloseReason::ProtocolViolation(_))
    ));

    let mut session = Session::new(SessionLimits::default(), Instant::now());
    let mut out = Vec::new();
    assert_eq!(
        session.next_deadline(),
        Some(Instant::now() + Duration::from_secs(10))
    );
    advance(Duration::from_millis(9_999)).await;
    session.on_deadline(Instant::now(), &mut out);
    assert!(out.is_empty());
    advance(Duration::from_millis(1)).await;
    session.on_deadline(Instant::now(), &mut out);
    assert_eq!(closed_with(&out), Some(&CloseReason::ConnectTimeout));
}

#[tokio::test(start_paused = true)]
async fn keep_alive_closes_after_one_and_a_half_periods_of_silence() {
    let mut session = connected(true, 10, None, &[]);
    let mut out = Vec::new();
    advance(Duration::from_secs(14)).await;
    session.on_packet(Packet::PingReq, Instant::now(), &mut out);
    assert!(matches!(out.as_slice(), [Action::Send(Packet::PingResp)]));
    out.clear();
    // The deadline moved with the ping: 15 s from now.
    assert_eq!(
        session.next_deadline(),
        Some(Instant::now() + Duration::from_secs(15))
    );
    advance(Duration::from_millis(14_999)).await;
    session.on_deadline(Instant::now(), &mut out);
    assert!(out.is_empty());
    advance(Duration::from_millis(1)).await;
    session.on_deadline(Instant::now(), &mut out);
    assert_eq!(closed_with(&out), Some(&CloseReason::KeepAliveTimeout));
}

#[tokio::test(start_paused = true)]
async fn keep_alive_zero_means_no_timeout() {
    let session = connected(true, 0, None, &[]);
    assert_eq!(session.next_deadline(), None);
}

#[tokio::test(start_paused = true)]
async fn the_connection_closes_when_its_credential_expires() {
    let mut session = connected(true, 60, Some(Duration::from_secs(20)), &[]);
    let mut out = Vec::new();
    assert_eq!(
        session.next_deadline(),
        Some(Instant::now() + Duration::from_secs(20))
    );
    advance(Duration::from_secs(19)).await;
    session.on_packet(Packet::PingReq, Instant::now(), &mut out);
    session.on_deadline(Instant::now(), &mut out);
    assert!(closed_with(&out).is_none());
    advance(Duration::from_secs(1)).await;
    session.on_deadline(Instant::now(), &mut out);
    assert_eq!(closed_with(&out), Some(&CloseReason::CredentialExpired));
}

#[tokio::test(start_paused = true)]
async fn an_already_expired_credential_is_refused() {
    let mut session = Session::new(SessionLimits::default(), Instant::now());
    let mut out = Vec::new();
    session.on_packet(connect("d1", true, 30), Instant::now(), &mut out);
    out.clear();
    let mut stale = accepted("d1", None, &[]);
    stale.expires_at = Some(Instant::now());
    session.on_auth(Ok(stale), Instant::now(), &mut out);
    assert_eq!(
        closed_with(&out),
        Some(&CloseReason::Refused(ConnectReturnCode::NotAuthorized))
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_client_ids_and_foreign_wills_are_refused() {
    let mut session = Session::new(SessionLimits::default(), Instant::now());
    let mut out = Vec::new();
    session.on_packet(connect("bad id", true, 30), Instant::now(), &mut out);
    assert_eq!(
        closed_with(&out),
        Some(&CloseReason::Refused(ConnectReturnCode::BadClientId))
    );

    let mut session = Session::new(SessionLimits::default(), Instant::now());
    let mut out = Vec::new();
    let Packet::Connect(mut with_will) = connect("d1", true, 30) else {
        unreachable!()
    };
    with_will.last_will = Some(LastWill::new(
        "devices/d2/messages/events/",
        "bye",
        QoS::AtLeastOnce,
        false,
    ));
    session.on_packet(Packet::Connect(with_will), Instant::now(), &mut out);
    assert_eq!(
        closed_with(&out),
        Some(&CloseReason::Refused(ConnectReturnCode::NotAuthorized))
    );
}

#[tokio::test(start_paused = true)]
async fn telemetry_is_ingested_and_acked_only_by_the_connection_task() {
    let mut session = connected(true, 30, None, &[]);
    let mut out = Vec::new();
    let mut publish = Publish::new(
        "devices/d1/messages/events/%24.mid=7&k=v",
        QoS::AtLeastOnce,
        "hello",
    );
    publish.pkid = 9;
    session.on_packet(Packet::Publish(publish), Instant::now(), &mut out);
    let [
        Action::Ingest {
            properties,
            payload,
            ack,
            will,
        },
    ] = out.as_slice()
    else {
        panic!("{out:?}")
    };
    assert_eq!(properties.get("$.mid"), Some("7"));
    assert_eq!(payload.as_ref(), b"hello");
    assert_eq!(*ack, Some(9));
    assert!(!will);
}

#[tokio::test(start_paused = true)]
async fn another_devices_topic_closes_without_ingesting() {
    for topic in [
        "devices/d2/messages/events/",
        "devices/d1/messages/devicebound/x",
        "random",
    ] {
        let mut session = connected(true, 30, None, &[]);
        let mut out = Vec::new();
        session.on_packet(
            Packet::Publish(Publish::new(topic, QoS::AtLeastOnce, "x")),
            Instant::now(),
            &mut out,
        );
        assert!(
            !out.iter().any(|a| matches!(a, Action::Ingest { .. })),
            "{topic}"
        );
        assert_eq!(
            closed_with(&out),
            Some(&CloseReason::TopicNotAllowed),
            "{topic}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn qos2_and_oversized_telemetry_close_the_connection() {
    let mut session = connected(true, 30, None, &[]);
    let mut out = Vec::new();
    let publish = Publish::new("devices/d1/messages/events/", QoS::ExactlyOnce, "x");
    session.on_packet(Packet::Publish(publish), Instant::now(), &mut out);
    assert_eq!(closed_with(&out), Some(&CloseReason::QoS2));

    let mut session = connected(true, 30, None, &[]);
    let mut out = Vec::new();
    let big = vec![0u8; 256 * 1024 + 1];
    session.on_packet(
        Packet::Publish(Publish::new(
            "devices/d1/messages/events/",
            QoS::AtLeastOnce,
            big,
        )),
        Instant::now(),
        &mut out,
    );
    assert_eq!(closed_with(&out), Some(&CloseReason::TooLarge));
    assert!(!out.iter().any(|a| matches!(a, Action::Ingest { .. })));
}

#[tokio::test(start_paused = true)]
async fn subscribe_grants_contract_filters_and_refuses_the_rest() {
    let mut session = connected(false, 30, None, &[]);
    let mut out = Vec::new();
    let filters = vec![
        SubscribeFilter::new("devices/d1/messages/devicebound/#".into(), QoS::AtLeastOnce),
        SubscribeFilter::new("#".into(), QoS::AtLeastOnce),
        SubscribeFilter::new("devices/+/messages/devicebound/#".into(), QoS::AtLeastOnce),
        SubscribeFilter::new("devices/d2/messages/devicebound/#".into(), QoS::AtLeastOnce),
        SubscribeFilter::new("$iothub/methods/POST/#".into(), QoS::ExactlyOnce),
    ];
    session.on_packet(
        Packet::Subscribe(Subscribe::new_many(filters)),
        Instant::now(),
        &mut out,
    );
    let [
        Action::Send(Packet::SubAck(suback)),
        Action::SaveSubscriptions(saved),
    ] = out.as_slice()
    else {
        panic!("{out:?}")
    };
    // `devices/+/messages/devicebound/#` is Azure's Embedded C SDK's C2D filter: it
    // is granted and means the device's own C2D (DESIGN section 2).
    assert_eq!(
        suback.return_codes,
        vec![
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
        ]
    );
    assert_eq!(
        saved,
        &[Subscription::CloudToDevice, Subscription::Methods]
            .into_iter()
            .collect()
    );
    assert!(
        !session.is_closed(),
        "a refused filter leaves the connection open"
    );
}

#[tokio::test(start_paused = true)]
async fn clean_sessions_are_not_persisted_or_resumed() {
    let mut session = connected(true, 30, None, &[Subscription::Methods]);
    assert!(
        !session.is_subscribed(Subscription::Methods),
        "CleanSession=1 starts afresh"
    );
    let mut out = Vec::new();
    let sub = Subscribe::new("$iothub/twin/res/#", QoS::AtLeastOnce);
    session.on_packet(Packet::Subscribe(sub), Instant::now(), &mut out);
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::SaveSubscriptions(_)))
    );

    let resumed = connected(false, 30, None, &[Subscription::Methods]);
    assert!(resumed.is_subscribed(Subscription::Methods));
}

#[tokio::test(start_paused = true)]
async fn outbound_qos1_respects_the_window_and_the_queue() {
    let limits = SessionLimits {
        outbound_inflight: 2,
        outbound_queue: 1,
        ..SessionLimits::default()
    };
    let mut session = Session::new(limits, Instant::now());
    let mut out = Vec::new();
    session.on_packet(connect("d1", true, 30), Instant::now(), &mut out);
    session.on_auth(Ok(accepted("d1", None, &[])), Instant::now(), &mut out);
    out.clear();
    let message = |id: u64| Outbound {
        topic: topic::method_request("m", &id.to_string()),
        payload: Bytes::from_static(b"{}"),
        qos: QoS::AtLeastOnce,
        requires: Some(Subscription::Methods),
        id,
    };
    assert_eq!(
        session.deliver(message(1), &mut out),
        Err(DeliverError::NotSubscribed)
    );
    session.on_packet(
        Packet::Subscribe(Subscribe::new("$iothub/methods/POST/#", QoS::AtLeastOnce)),
        Instant::now(),
        &mut out,
    );
    out.clear();
    for id in 1..=3 {
        session.deliver(message(id), &mut out).unwrap();
    }
    assert_eq!(
        session.deliver(message(4), &mut out),
        Err(DeliverError::QueueFull)
    );
    let sent: Vec<u16> = out
        .iter()
        .filter_map(|a| match a {
            Action::Send(Packet::Publish(p)) => Some(p.pkid),
            _ => None,
        })
        .collect();
    assert_eq!(sent, [1, 2], "two in flight, one queued");
    out.clear();
    session.on_packet(Packet::PubAck(PubAck::new(1)), Instant::now(), &mut out);
    assert!(matches!(out.first(), Some(Action::Delivered(1))));
    assert!(matches!(out.get(1), Some(Action::Send(Packet::Publish(p))) if p.pkid == 3));
}

#[tokio::test(start_paused = true)]
async fn the_will_is_ingested_on_an_unclean_close_only() {
    let will_connect = || {
        let Packet::Connect(mut c) = connect("d1", true, 30) else {
            unreachable!()
        };
        c.last_will = Some(LastWill::new(
            "devices/d1/messages/events/",
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
        Packet::Connect(c)
    };
    for (reason, expect_will) in [
        (CloseReason::KeepAliveTimeout, true),
        (CloseReason::PeerClosed, true),
    ] {
        let mut session = Session::new(SessionLimits::default(), Instant::now());
        let mut out = Vec::new();
        session.on_packet(will_connect(), Instant::now(), &mut out);
        session.on_auth(Ok(accepted("d1", None, &[])), Instant::now(), &mut out);
        out.clear();
        session.close(reason, &mut out);
        let will = out.iter().find_map(|a| match a {
            Action::Ingest {
                properties,
                will: true,
                ..
            } => Some(properties.clone()),
            _ => None,
        });
        assert_eq!(will.is_some(), expect_will);
        assert_eq!(
            will.and_then(|p| p.get("iothub-MessageType").map(str::to_string))
                .as_deref(),
            Some("Will")
        );
    }
    let mut session = Session::new(SessionLimits::default(), Instant::now());
    let mut out = Vec::new();
    session.on_packet(will_connect(), Instant::now(), &mut out);
    session.on_auth(Ok(accepted("d1", None, &[])), Instant::now(), &mut out);
    out.clear();
    session.on_packet(Packet::Disconnect, Instant::now(), &mut out);
    assert!(!out.iter().any(|a| matches!(a, Action::Ingest { .. })));
    assert_eq!(closed_with(&out), Some(&CloseReason::ClientDisconnected));
}

#[test]
fn a_topic_longer_than_mqtt_can_frame_is_never_written() {
    let mut session = connected(true, 30, None, &[]);
    let mut out = Vec::new();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let message = Outbound {
            topic: format!("$iothub/twin/res/200/?$rid={}", "r".repeat(70_000)),
            payload: Bytes::from_static(b"{}"),
            qos,
            requires: None,
            id: 1,
        };
        let len = message.topic.len();
        assert_eq!(
            session.deliver(message, &mut out),
            Err(DeliverError::TopicTooLong(len))
        );
        assert!(out.is_empty(), "nothing is sent: {out:?}");
    }
    let fits = Outbound {
        topic: format!("$iothub/twin/res/200/?$rid={}", "r".repeat(60_000)),
        payload: Bytes::from_static(b"{}"),
        qos: QoS::AtMostOnce,
        requires: None,
        id: 2,
    };
    session
        .deliver(fits, &mut out)
        .expect("a topic under the limit goes out");
    assert_eq!(out.len(), 1);
}
