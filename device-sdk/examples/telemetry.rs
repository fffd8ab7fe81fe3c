//! Sends ten telemetry messages and waits for each to be durable.
//!
//! ```sh
//! cargo run --release -p hub -- device create sensor-1     # in another terminal: hub running
//! HUB_CONNECTION_STRING="HostName=localhost;DeviceId=sensor-1;SharedAccessKey=<primaryKey>" \
//!   cargo run -p device-sdk --example telemetry
//! ```
//! `HUB_CA` names the CA file (default `hub-data/certs/ca.pem`).

use std::time::Duration;

use device_sdk::{ClientOptions, DeviceClient, Message};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let connection_string = std::env::var("HUB_CONNECTION_STRING")?;
    let ca = std::fs::read_to_string(
        std::env::var("HUB_CA").unwrap_or_else(|_| "hub-data/certs/ca.pem".into()),
    )?;
    let options = ClientOptions::from_connection_string(&connection_string)?.with_ca(&ca);
    let (client, _events) = DeviceClient::start(options)?;
    client.connected(Duration::from_secs(10)).await?;
    for n in 0..10 {
        let message = Message::json(
            &serde_json::json!({ "reading": n, "temp": 20.0 + f64::from(n) / 10.0 }),
        )?
        .with_property("source", "example");
        client.send_telemetry(message).await?;
        println!("message {n} is durable on the hub");
    }
    client.close().await;
    Ok(())
}
