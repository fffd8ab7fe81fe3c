//! The offline queue's policy when full: with no hub reachable, sends wait in the queue
//! up to its capacity, and the next one is refused at once with `OfflineQueueFull`.

use std::time::Duration;

use device_sdk::{ClientOptions, Credentials, DeviceClient, Error, Message};

#[tokio::test]
async fn a_full_offline_queue_refuses_the_newest_message() {
    // A port nothing listens on: the client keeps reconnecting in the background.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = unused.local_addr().expect("addr").port();
    drop(unused);
    let mut options = ClientOptions::new(
        "localhost",
        "offline-device",
        Credentials::Sas {
            key: "a2V5a2V5a2V5a2V5a2V5a2V5".into(),
            ttl: Duration::from_secs(60),
        },
    )
    .without_tls()
    .with_endpoint("127.0.0.1", port);
    options.offline_queue = 2;
    let (client, _events) = DeviceClient::start(options).expect("start");

    let mut waiting = Vec::new();
    for n in 0..2 {
        let client = client.clone();
        waiting.push(tokio::spawn(async move {
            client.send_telemetry(Message::new(vec![n])).await
        }));
    }
    // Let both reach the queue.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = client.send_telemetry(Message::new(vec![9])).await;
    assert!(
        matches!(refused, Err(Error::OfflineQueueFull)),
        "{refused:?}"
    );
    assert!(
        waiting.iter().all(|t| !t.is_finished()),
        "queued sends wait for the hub"
    );

    client.close().await;
    for task in waiting {
        let outcome = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("closed in time");
        assert!(matches!(outcome, Ok(Err(Error::Closed))), "{outcome:?}");
    }
}
