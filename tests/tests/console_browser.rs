//! The web console in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver with fantoccini) against a real hub: sign
//! in with a token and with a connection string, create a device, edit its twin (and
//! see the conflict when it changed underneath), watch live telemetry from a sending
//! device (a `<script>` body must stay text), invoke a method, send a C2D message, run
//! a query, create an enrollment group, sign out. Any JavaScript error fails the test. Screenshots of each page at
//! 1280×800 and 390×844 go to `$CONSOLE_SCREENSHOTS` (default
//! `target/console-screenshots`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use device_sdk::{ClientOptions, Credentials, DeviceClient, DeviceEvents, Message};
use fantoccini::{Client, ClientBuilder, Locator};
use hub_tests::Hub;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const WAIT: Duration = Duration::from_secs(20);

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Result<Self> {
        for path in [CHROMEDRIVER, CHROMIUM] {
            if !std::path::Path::new(path).exists() {
                bail!(
                    "{path} is missing: the console test needs Debian's browser and driver \
                     (apt-get install chromium chromium-driver)"
                );
            }
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting chromedriver")?;
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(response) = http.get(format!("{url}/status")).send().await
                && let Ok(status) = response.json::<Value>().await
                && status["value"]["ready"] == true
            {
                return Ok(Self { child, url });
            }
            if tokio::time::Instant::now() > deadline {
                bail!("chromedriver did not become ready on {url}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn session(&self, profile: &std::path::Path) -> Result<Client> {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,800",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .context("opening a WebDriver session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Waits until the element matching `css` has text containing `needle`.
async fn wait_text(browser: &Client, css: &str, needle: &str) -> Result<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(element) = browser.find(Locator::Css(css)).await
            && let Ok(text) = element.text().await
            && text.contains(needle)
        {
            return Ok(text);
        }
        if tokio::time::Instant::now() > deadline {
            let shown = match browser.find(Locator::Css(css)).await {
                Ok(element) => element.text().await.unwrap_or_default(),
                Err(_) => "(no such element)".into(),
            };
            bail!("{css} never contained {needle:?}; it shows {shown:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn set_value(browser: &Client, css: &str, value: &str) -> Result<()> {
    let element = browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await?;
    browser
        .execute(
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('change'));",
            vec![serde_json::to_value(&element)?, json!(value)],
        )
        .await?;
    Ok(())
}

async fn click(browser: &Client, css: &str) -> Result<()> {
    browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await?
        .click()
        .await?;
    Ok(())
}

async fn js_errors(browser: &Client) -> Result<Vec<Value>> {
    let errors = browser
        .execute("return window.__consoleErrors || [];", vec![])
        .await?;
    Ok(errors.as_array().cloned().unwrap_or_default())
}

fn screenshot_dir() -> PathBuf {
    std::env::var_os("CONSOLE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| hub_tests::azure::workspace().join("target/console-screenshots"))
}

/// Screenshots of the page as it is, at a laptop's and a phone's size.
async fn screenshots(browser: &Client, name: &str) -> Result<()> {
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir)?;
    for (width, height, label) in [(1280u32, 800u32, "desktop"), (390, 844, "phone")] {
        browser.set_window_size(width, height).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let png = browser.screenshot().await?;
        std::fs::write(dir.join(format!("{name}-{label}.png")), png)?;
    }
    browser.set_window_size(1280, 800).await?;
    Ok(())
}

fn device(hub: &Hub, id: &str, key: &str) -> Result<(DeviceClient, DeviceEvents)> {
    let ca = std::fs::read_to_string(hub.data_dir().join("certs/ca.pem"))?;
    let port = hub.endpoint("mqtts").context("mqtts")?.port();
    let options = ClientOptions::new(
        "localhost",
        id,
        Credentials::Sas {
            key: key.to_string(),
            ttl: Duration::from_secs(600),
        },
    )
    .with_ca(&ca)
    .with_endpoint("localhost", port);
    Ok(DeviceClient::start(options)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_operates_a_hub_in_a_real_browser() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub
        .token("registry:read,registry:write,service:connect,provisioning:read,provisioning:write")
        .await?;
    let driver = Driver::start().await?;
    let profile = tempfile::tempdir()?;
    let browser = driver.session(profile.path()).await?;
    let result = drive(&hub, &token, &browser).await;
    let errors = js_errors(&browser).await;
    let _ = browser.close().await;
    result?;
    let errors = errors?;
    assert!(errors.is_empty(), "JavaScript errors: {errors:?}");
    Ok(())
}

async fn drive(hub: &Hub, token: &str, browser: &Client) -> Result<()> {
    let console = format!("{}/console/", hub.url());

    // The files themselves: the policy and the types the browser relies on.
    let page = hub.http().get(&console).send().await?;
    let csp = page.headers()["content-security-policy"]
        .to_str()?
        .to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(
        page.headers()["content-type"]
            .to_str()?
            .starts_with("text/html")
    );

    // Sign in with a token.
    browser.goto(&console).await?;
    screenshots(browser, "sign-in").await?;
    set_value(browser, "[data-testid=credential]", token).await?;
    click(browser, "[data-testid=sign-in]").await?;
    wait_text(browser, "[data-testid=device-count]", "0").await?;
    // The rates need two samples of /metrics.
    wait_text(browser, "[data-testid=msg-rate]", ".").await?;
    screenshots(browser, "overview").await?;

    // Create a device.
    browser.goto(&format!("{console}#/devices")).await?;
    set_value(browser, "[data-testid=new-device]", "console-1").await?;
    click(browser, "[data-testid=create-device]").await?;
    wait_text(browser, "[data-testid=device-status]", "enabled").await?;
    let created = hub.get_json(token, "/devices/console-1").await?;
    let key = created["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .context("created device has a key")?
        .to_string();
    let connection_string = wait_text(
        browser,
        "[data-testid=device-connection-string]",
        "DeviceId=console-1",
    )
    .await?;
    assert!(connection_string.contains(&key), "{connection_string}");

    // Edit the twin, then see a conflict when it changed underneath.
    wait_text(browser, "[data-testid=twin-status]", "etag").await?;
    set_value(
        browser,
        "[data-testid=twin-editor]",
        r#"{"tags": {"site": "oslo"}, "properties": {"desired": {"interval": 10}}}"#,
    )
    .await?;
    click(browser, "[data-testid=twin-save]").await?;
    wait_text(browser, "[data-testid=twin-status]", "saved").await?;
    let twin = hub.get_json(token, "/twins/console-1").await?;
    assert_eq!(twin["tags"]["site"], "oslo");
    assert_eq!(twin["properties"]["desired"]["interval"], 10);
    let underneath = hub
        .http()
        .patch(format!("{}/twins/console-1", hub.url()))
        .bearer_auth(token)
        .json(&json!({"properties": {"desired": {"interval": 20}}}))
        .send()
        .await?;
    assert!(underneath.status().is_success());
    set_value(
        browser,
        "[data-testid=twin-editor]",
        r#"{"tags": {"site": "bergen"}, "properties": {"desired": {"interval": 30}}}"#,
    )
    .await?;
    click(browser, "[data-testid=twin-save]").await?;
    wait_text(
        browser,
        "[data-testid=twin-status]",
        "the twin changed since you loaded it",
    )
    .await?;
    let twin = hub.get_json(token, "/twins/console-1").await?;
    assert_eq!(
        twin["tags"]["site"], "oslo",
        "the conflicting save changed nothing"
    );

    // Live telemetry from a connected device, with a body that must stay text.
    let (client, mut events) = device(hub, "console-1", &key)?;
    client.connected(WAIT).await?;
    click(browser, "[data-testid=telemetry-start]").await?;
    wait_text(browser, "[data-testid=telemetry-state]", "live").await?;
    let hostile =
        "<script>window.__injected = 1</script><img src=x onerror=\"window.__injected = 2\">";
    client.send_telemetry(Message::new(hostile)).await?;
    client
        .send_telemetry(Message::json(&json!({"temp": 21.5}))?.with_property("unit", "C"))
        .await?;
    wait_text(browser, "[data-testid=telemetry]", "\"temp\":21.5").await?;
    let shown = wait_text(browser, "[data-testid=telemetry]", "<script>").await?;
    assert!(
        shown.contains(hostile),
        "the body is shown as written: {shown}"
    );
    let injected = browser
        .execute("return window.__injected === undefined;", vec![])
        .await?;
    assert_eq!(injected, json!(true), "a device's body ran as script");
    screenshots(browser, "device").await?;

    // A direct method answered by the device.
    let mut methods = events.methods;
    tokio::spawn(async move {
        while let Some(call) = methods.recv().await {
            let answer = json!({"rebooted": call.name});
            let _ = call.respond(200, &answer).await;
        }
    });
    set_value(browser, "[data-testid=method-name]", "reboot").await?;
    set_value(browser, "[data-testid=method-payload]", r#"{"delay": 1}"#).await?;
    click(browser, "[data-testid=method-invoke]").await?;
    wait_text(browser, "[data-testid=method-history]", "status 200").await?;
    wait_text(
        browser,
        "[data-testid=method-history]",
        "\"rebooted\":\"reboot\"",
    )
    .await?;

    // A C2D message with properties reaches the device.
    set_value(browser, "[data-testid=c2d-body]", "hello device").await?;
    set_value(browser, "[data-testid=c2d-properties]", "color=blue").await?;
    click(browser, "[data-testid=c2d-send]").await?;
    wait_text(browser, "[data-testid=c2d-sent]", "queued").await?;
    let message = tokio::time::timeout(WAIT, events.messages.recv())
        .await?
        .context("the device's C2D channel closed")?;
    assert_eq!(message.body.as_ref(), b"hello device");
    assert!(
        message
            .properties
            .iter()
            .any(|(k, v)| k == "color" && v == "blue"),
        "{:?}",
        message.properties
    );

    // A query.
    browser.goto(&format!("{console}#/query")).await?;
    set_value(
        browser,
        "[data-testid=query]",
        "SELECT * FROM devices WHERE tags.site = 'oslo'",
    )
    .await?;
    click(browser, "[data-testid=run-query]").await?;
    wait_text(browser, "[data-testid=query-count]", "1 result(s)").await?;
    wait_text(browser, "[data-testid=query-result]", "console-1").await?;
    screenshots(browser, "query").await?;
    browser.goto(&format!("{console}#/devices")).await?;
    wait_text(browser, "[data-testid=device-row-console-1]", "enabled").await?;
    screenshots(browser, "devices").await?;

    // Provisioning: create a symmetric-key enrollment group.
    browser.goto(&format!("{console}#/provisioning")).await?;
    set_value(browser, "[data-testid=new-group]", "factory-a").await?;
    click(browser, "[data-testid=create-group]").await?;
    wait_text(browser, "[data-testid=group-row-factory-a]", "symmetricKey").await?;
    let group = hub.get_json(token, "/enrollmentGroups/factory-a").await?;
    assert_eq!(group["provisioningStatus"], "enabled", "{group}");
    screenshots(browser, "provisioning").await?;

    // Sign out, then in again with a connection string (signed in the page).
    click(browser, "[data-testid=sign-out]").await?;
    wait_text(browser, "[role=status]", "signed out").await?;
    let stored = browser
        .execute("return sessionStorage.length;", vec![])
        .await?;
    assert_eq!(stored, json!(0), "sign-out forgets the credential");
    let out = hub.cli(&["connection-string"]).await?;
    assert!(out.status.success(), "{}", out.stderr);
    set_value(browser, "[data-testid=credential]", out.stdout.trim()).await?;
    click(browser, "[data-testid=sign-in]").await?;
    wait_text(browser, "[data-testid=device-count]", "1").await?;
    wait_text(browser, "#who", "policy iothubowner").await?;
    client.close().await;
    Ok(())
}
