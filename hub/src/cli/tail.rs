//! `hub tail`: prints telemetry as it arrives, one JSON line per message, by
//! long-polling every partition; with `--group`, resumes from and advances that
//! consumer group's checkpoints.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use hub::auth::service::Scope;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::Target;
use super::client::{ApiClient, path_segment};

/// `hub tail` arguments.
#[derive(Args, Debug)]
pub struct TailArgs {
    /// Only messages from this device.
    #[arg(long)]
    device: Option<String>,
    /// Consumer group: start at its checkpoints and advance them as messages print.
    #[arg(long)]
    group: Option<String>,
    /// Without --group: where to start (earliest, latest, or an offset).
    #[arg(long, default_value = "latest")]
    from: String,
    /// Exit after printing this many messages.
    #[arg(long)]
    count: Option<usize>,
    #[command(flatten)]
    target: Target,
}

/// Runs `hub tail` until interrupted (or `--count` messages).
pub async fn tail(args: TailArgs) -> Result<()> {
    let client = Arc::new(ApiClient::connect(&args.target, &[Scope::ServiceConnect])?);
    let info: Value = client
        .send(client.request(Method::GET, "/streams/telemetry"))
        .await?
        .json()
        .await?;
    let partitions = info["partitionCount"]
        .as_u64()
        .context("no partitionCount in the answer")?;
    let (tx, mut rx) = mpsc::channel::<Result<Value>>(1024);
    for partition in 0..partitions {
        let client = Arc::clone(&client);
        let tx = tx.clone();
        let group = args.group.clone();
        let from = if group.is_some() {
            "checkpoint".to_string()
        } else {
            args.from.clone()
        };
        tokio::spawn(async move {
            if let Err(err) = follow(&client, partition, group, from, &tx).await {
                let _ = tx.send(Err(err)).await;
            }
        });
    }
    drop(tx);
    let mut printed = 0usize;
    while let Some(message) = rx.recv().await {
        let message = message?;
        if args
            .device
            .as_deref()
            .is_some_and(|d| message["deviceId"] != d)
        {
            continue;
        }
        println!("{message}");
        printed += 1;
        if args.count.is_some_and(|n| printed >= n) {
            break;
        }
    }
    Ok(())
}

async fn follow(
    client: &ApiClient,
    partition: u64,
    group: Option<String>,
    mut from: String,
    out: &mpsc::Sender<Result<Value>>,
) -> Result<()> {
    let group_query = group
        .as_deref()
        .map(|g| format!("&consumerGroup={}", path_segment(g)))
        .unwrap_or_default();
    loop {
        let path = format!(
            "/streams/telemetry/partitions/{partition}/messages?from={from}&max=500&waitMs=10000{group_query}"
        );
        let page: Value = client
            .send(client.request(Method::GET, &path))
            .await?
            .json()
            .await?;
        let next = page["nextOffset"]
            .as_u64()
            .context("no nextOffset in the answer")?;
        for message in page["messages"].as_array().into_iter().flatten() {
            if out.send(Ok(message.clone())).await.is_err() {
                return Ok(());
            }
        }
        if let Some(group) = &group
            && next.to_string() != from
        {
            let path = format!(
                "/streams/telemetry/consumergroups/{}/partitions/{partition}/checkpoint",
                path_segment(group)
            );
            client
                .send(
                    client
                        .request(Method::PUT, &path)
                        .json(&json!({ "offset": next })),
                )
                .await?;
        }
        from = next.to_string();
    }
}
