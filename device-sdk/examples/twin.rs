//! Reads the twin, reports a property, and prints desired-property updates for 30 s.
//!
//! ```sh
//! HUB_CONNECTION_STRING="HostName=localhost;DeviceId=sensor-1;SharedAccessKey=<primaryKey>" \
//!   cargo run -p device-sdk --example twin
//! # meanwhile: PATCH /twins/sensor-1 {"properties": {"desired": {"interval": 10}}}
//! ```

use std::time::Duration;

use device_sdk::{ClientOptions, DeviceClient};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let connection_string = std::env::var("HUB_CONNECTION_STRING")?;
    let ca = std::fs::read_to_string(
        std::env::var("HUB_CA").unwrap_or_else(|_| "hub-data/certs/ca.pem".into()),
    )?;
    let options = ClientOptions::from_connection_string(&connection_string)?.with_ca(&ca);
    let (client, mut events) = DeviceClient::start(options)?;
    client.connected(Duration::from_secs(10)).await?;
    let twin = client.get_twin().await?;
    println!("desired: {}\nreported: {}", twin.desired, twin.reported);
    let version = client
        .patch_reported(&serde_json::json!({ "firmware": "1.0.0" }))
        .await?;
    println!("reported properties now at version {version}");
    let listen = async {
        while let Some(update) = events.desired.recv().await {
            println!("desired update: {update:?}");
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), listen).await;
    client.close().await;
    Ok(())
}
