//! Answers direct methods (echoing the payload) and completes C2D messages for 60 s.
//!
//! ```sh
//! HUB_CONNECTION_STRING="HostName=localhost;DeviceId=sensor-1;SharedAccessKey=<primaryKey>" \
//!   cargo run -p device-sdk --example methods
//! # meanwhile: cargo run --release -p hub -- invoke sensor-1 reboot '{"delay": 1}'
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
    println!("waiting for method calls and messages");
    let serve = async {
        loop {
            tokio::select! {
                Some(call) = events.methods.recv() => {
                    println!("method {} {}", call.name, call.payload);
                    let answer = serde_json::json!({ "handled": call.name, "payload": call.payload });
                    if let Err(err) = call.respond(200, &answer).await {
                        eprintln!("cannot answer: {err}");
                    }
                }
                Some(message) = events.messages.recv() => {
                    println!("message {:?}: {}", message.message_id(), String::from_utf8_lossy(&message.body));
                    message.complete().await?;
                }
                else => return Ok::<_, device_sdk::Error>(()),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(60), serve).await;
    client.close().await;
    Ok(())
}
