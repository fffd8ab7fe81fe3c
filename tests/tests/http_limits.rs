//! Bounds of the HTTP listener against slow and greedy clients: a stalled request
//! header or an idle keep-alive connection is closed within the header timeout, a
//! stalled body fails its request; at the
//! connection cap the next connection waits until one closes; long requests fill only
//! their own slots, so `/healthz`, `/readyz` and short requests still answer.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hub_tests::{Hub, HubOptions};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for anything the hub should do "promptly" on a busy test machine.
const PROMPTLY: Duration = Duration::from_secs(10);

async fn start(dir: &Path, http: &str) -> Result<Hub> {
    let config = dir.join("hub.toml");
    std::fs::write(&config, format!("[http]\n{http}"))?;
    let config = config.to_string_lossy().into_owned();
    HubOptions::new(&dir.join("data"))
        .args(["--config", config.as_str()])
        .start()
        .await
}

/// Reads until the hub closes the connection; returns what it sent.
async fn read_to_close(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut received = Vec::new();
    tokio::time::timeout(PROMPTLY, async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .context("the hub did not close the connection")?;
    Ok(received)
}

/// Sends `GET path` on a keep-alive connection and reads one whole response.
async fn get(stream: &mut TcpStream, path: &str) -> Result<String> {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: hub\r\n\r\n").as_bytes())
        .await?;
    read_response(stream).await
}

async fn read_response(stream: &mut TcpStream) -> Result<String> {
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!(
                "connection closed mid-response: {}",
                String::from_utf8_lossy(&received)
            );
        }
        received.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .context("no content-length")?;
            if received.len() >= end + 4 + length {
                return Ok(text);
            }
        }
    }
}

#[tokio::test]
async fn a_stalled_header_and_an_idle_connection_are_closed_within_the_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start(dir.path(), "header_timeout_secs = 1\n").await?;
    let addr = hub.endpoint("http").context("http endpoint")?;

    // Half a request header, then nothing.
    let mut stalled = TcpStream::connect(addr).await?;
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nX-Slow: ")
        .await?;
    let started = Instant::now();
    let answer = read_to_close(&mut stalled).await?;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty(),
        "closed without an answer, got {answer:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the timeout: {:?}",
        started.elapsed()
    );

    // A keep-alive connection that answered a request and then idles.
    let mut idle = TcpStream::connect(addr).await?;
    assert!(
        get(&mut idle, "/healthz")
            .await?
            .starts_with("HTTP/1.1 200")
    );
    assert!(read_to_close(&mut idle).await?.is_empty(), "closed quietly");

    // A client that keeps its requests coming is served throughout.
    assert_eq!(
        hub.http()
            .get(format!("{}/healthz", hub.url()))
            .send()
            .await?
            .status(),
        StatusCode::OK
    );
    assert!(hub.stop().await?.success(), "SIGTERM still exits 0");
    Ok(())
}

#[tokio::test]
async fn a_request_body_that_stalls_is_cut_off_after_the_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start(dir.path(), "header_timeout_secs = 1\n").await?;
    let token = hub.owner_token().await?;
    let addr = hub.endpoint("http").context("http endpoint")?;
    let mut stalled = TcpStream::connect(addr).await?;
    stalled
        .write_all(
            format!(
                "PUT /devices/slow HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"authentication\""
            )
            .as_bytes(),
        )
        .await?;
    let answer = tokio::time::timeout(PROMPTLY, read_response(&mut stalled))
        .await
        .context("the hub still waits for the body")??;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("400004"), "{answer}");
    let missing = hub
        .http()
        .get(format!("{}/devices/slow", hub.url()))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND, "nothing created");
    Ok(())
}

#[tokio::test]
async fn at_the_connection_cap_the_next_connection_waits_until_one_closes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = start(dir.path(), "max_connections = 2\nmax_long_requests = 1\n").await?;
    let addr = hub.endpoint("http").context("http endpoint")?;

    // Two open keep-alive connections: the cap.
    let mut first = TcpStream::connect(addr).await?;
    assert!(
        get(&mut first, "/healthz")
            .await?
            .starts_with("HTTP/1.1 200")
    );
    let mut second = TcpStream::connect(addr).await?;
    assert!(
        get(&mut second, "/healthz")
            .await?
            .starts_with("HTTP/1.1 200")
    );

    // The third connects (the kernel's backlog) but is not served...
    let mut third = TcpStream::connect(addr).await?;
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n")
        .await?;
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.read(&mut byte))
            .await
            .is_err(),
        "held while the cap is reached"
    );
    // ...until one of the two closes; then it is answered.
    drop(first);
    let answer = tokio::time::timeout(PROMPTLY, read_response(&mut third))
        .await
        .context("served once a slot freed")??;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The connection that held a slot still works.
    assert!(
        get(&mut second, "/readyz")
            .await?
            .starts_with("HTTP/1.1 200")
    );
    drop((second, third));
    assert!(hub.stop().await?.success());
    Ok(())
}

#[tokio::test]
async fn waiting_long_polls_leave_health_probes_and_short_requests_answering() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A single limit of 2 for everything would let two long-polls block the rest.
    let hub = start(
        dir.path(),
        "max_long_requests = 2\nmax_concurrent_requests = 2\n",
    )
    .await?;
    let token = hub.owner_token().await?;
    let feedback = format!("{}/messages/serviceBound/feedback", hub.url());

    let mut polls = Vec::new();
    for _ in 0..2 {
        // A client each: a shared pool could queue a long-poll behind the requests
        // below instead of opening its connection.
        let request = reqwest::Client::new()
            .get(format!("{feedback}?waitMs=30000"))
            .bearer_auth(&token)
            .send();
        polls.push(tokio::spawn(request));
    }
    // Wait until both hold their slots (the hub's gauge says so)...
    tokio::time::timeout(PROMPTLY, async {
        loop {
            let metrics = hub
                .http()
                .get(format!("{}/metrics", hub.url()))
                .send()
                .await?
                .text()
                .await?;
            if metrics.contains("\nhub_http_long_requests 2\n") {
                return Ok::<_, anyhow::Error>(());
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .context("the long-polls never took their slots")??;
    // ...then a third long request is refused at once.
    let refused = hub
        .http()
        .get(format!("{feedback}?waitMs=0"))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: serde_json::Value = refused.json().await?;
    assert_eq!(body["errorCode"], 429001);

    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = tokio::time::timeout(
            PROMPTLY,
            hub.http().get(format!("{}{path}", hub.url())).send(),
        )
        .await
        .with_context(|| format!("{path} answers while long-polls wait"))??;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let devices = tokio::time::timeout(
        PROMPTLY,
        hub.http()
            .get(format!("{}/devices", hub.url()))
            .bearer_auth(&token)
            .send(),
    )
    .await
    .context("GET /devices answers while long-polls wait")??;
    assert_eq!(devices.status(), StatusCode::OK);

    assert!(
        polls.iter().all(|poll| !poll.is_finished()),
        "the long-polls were still waiting"
    );
    for poll in polls {
        poll.abort();
    }
    Ok(())
}

#[tokio::test]
async fn a_telemetry_websocket_holds_a_long_request_slot_until_it_closes() -> Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = tempfile::tempdir()?;
    let hub = start(dir.path(), "max_long_requests = 1\n").await?;
    let token = hub.owner_token().await?;
    let addr = hub.endpoint("http").context("http endpoint")?;
    let mut request =
        format!("ws://{addr}/streams/telemetry/partitions/0/ws").into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let (socket, _) = tokio_tungstenite::connect_async(request).await?;

    let poll = || {
        hub.http()
            .get(format!(
                "{}/messages/serviceBound/feedback?waitMs=0",
                hub.url()
            ))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(
        poll().await?.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the open stream holds the only long slot"
    );
    drop(socket);
    // The stream ends once the hub sees the close; then the slot is free again.
    let freed = tokio::time::timeout(PROMPTLY, async {
        loop {
            let status = poll().await?.status();
            if status != StatusCode::TOO_MANY_REQUESTS {
                return Ok::<_, anyhow::Error>(status);
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .context("the slot was never released")??;
    assert_eq!(freed, StatusCode::NO_CONTENT);
    assert!(hub.stop().await?.success());
    Ok(())
}
