//! A webhook receiver in its own process (`tests/receivers/webhook_receiver.py`, run
//! with `python3`): it records the events routed to it and can be told to answer 503
//! for a while, or slowly. Killed when dropped.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running receiver.
#[derive(Debug)]
pub struct Receiver {
    _child: Child,
    port: u16,
    http: reqwest::Client,
}

/// What a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// Successful POSTs.
    pub posts: u64,
    /// POSTs answered with the failure status.
    pub refused: u64,
    /// Every event, in arrival order, with its POST's content type.
    pub events: Vec<(String, Value)>,
}

impl Receiver {
    /// Starts a receiver that refuses everything for the first `fail_for`.
    pub async fn start(fail_for: Duration) -> Result<Self> {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("receivers/webhook_receiver.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(fail_for.as_secs_f64().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot run python3 for the webhook receiver; install it with apt-get install python3")?;
        let stdout = child.stdout.take().context("receiver stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("the webhook receiver did not start")??
            .context("the webhook receiver exited")?;
        let Some(port) = line.strip_prefix("listening ") else {
            bail!("unexpected receiver output {line:?}");
        };
        Ok(Self {
            _child: child,
            port: port.trim().parse()?,
            http: reqwest::Client::new(),
        })
    }

    /// The URL to route to (`/hook` + `path`).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/hook{path}", self.port)
    }

    /// Everything received so far.
    pub async fn received(&self) -> Result<Received> {
        let answer: Value = self
            .http
            .get(format!("http://127.0.0.1:{}/_events", self.port))
            .send()
            .await?
            .json()
            .await?;
        let events = answer["events"]
            .as_array()
            .context("no events")?
            .iter()
            .map(|e| {
                (
                    e["contentType"].as_str().unwrap_or_default().to_string(),
                    e["event"].clone(),
                )
            })
            .collect();
        Ok(Received {
            posts: answer["posts"].as_u64().unwrap_or(0),
            refused: answer["refused"].as_u64().unwrap_or(0),
            events,
        })
    }

    /// Waits until `done` holds for what was received, or fails after `timeout`
    /// with what arrived.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&Received) -> bool,
    ) -> Result<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let received = self.received().await?;
            if done(&received) {
                return Ok(received);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "receiver: condition not met after {timeout:?}; got {} events: {:?}",
                    received.events.len(),
                    received.events.iter().take(20).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Refuses with `status` for `seconds`; delays each answer by `delay_ms`.
    pub async fn control(&self, fail_for: f64, status: u16, delay_ms: u64) -> Result<()> {
        self.http
            .post(format!("http://127.0.0.1:{}/_control", self.port))
            .json(&json!({ "failFor": fail_for, "status": status, "delayMs": delay_ms }))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

/// `PUT /configuration/routing` with `config`; fails unless the hub accepts it.
pub async fn put_routing(hub: &crate::Hub, token: &str, config: &Value) -> Result<Value> {
    let response = hub
        .http()
        .put(format!("{}/configuration/routing", hub.url()))
        .bearer_auth(token)
        .json(config)
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        bail!("PUT /configuration/routing: {status}: {body}");
    }
    Ok(body)
}

/// Every message of stream `name`, from the earliest offset of each partition.
pub async fn read_stream(hub: &crate::Hub, token: &str, name: &str) -> Result<Vec<Value>> {
    let info = hub.get_json(token, &format!("/streams/{name}")).await?;
    let partitions = info["partitionCount"]
        .as_u64()
        .context("no partitionCount")?;
    let mut all = Vec::new();
    for partition in 0..partitions {
        let path =
            format!("/streams/{name}/partitions/{partition}/messages?from=earliest&max=1000");
        let page = hub.get_json(token, &path).await?;
        all.extend(
            page["messages"]
                .as_array()
                .context("no messages")?
                .iter()
                .cloned(),
        );
    }
    Ok(all)
}
