//! Start-up, restart and shutdown of the real binary: first start creates the data
//! dir, certificates and owner key; a restart keeps devices, keys and certificates;
//! SIGTERM exits 0; a corrupt or unusable data dir fails with a clear message.

use anyhow::Result;
use hub_tests::{Hub, HubOptions};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn read(dir: &std::path::Path, file: &str) -> Result<String> {
    Ok(std::fs::read_to_string(dir.join(file))?)
}

#[tokio::test]
async fn first_start_creates_the_data_dir_and_reports_its_endpoints() -> Result<()> {
    let parent = tempfile::tempdir()?;
    let dir = parent.path().join("fresh");
    let hub = Hub::start(&dir).await?;
    for file in [
        "certs/ca.pem",
        "certs/ca.key",
        "certs/server.pem",
        "certs/server.key",
        "service.key",
        "hub.redb",
    ] {
        assert!(dir.join(file).is_file(), "{file} created");
    }
    #[cfg(unix)]
    for secret in ["certs/ca.key", "certs/server.key", "service.key"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(secret))?.permissions().mode();
        assert_eq!(mode & 0o077, 0, "{secret} is private");
    }
    let endpoints: Value = serde_json::from_str(&read(&dir, "endpoints.json")?)?;
    let http = hub.endpoint("http").expect("http in the ready line");
    assert_eq!(endpoints["http"], json!(http.to_string()));
    assert!(http.ip().is_loopback() && http.port() != 0);

    let status = hub.stop().await?;
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    assert!(
        !dir.join("endpoints.json").exists(),
        "endpoints.json removed on shutdown"
    );
    Ok(())
}

#[tokio::test]
async fn a_restart_keeps_devices_keys_and_certificates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let created: Value = hub
        .http()
        .put(format!("{}/devices/keeper", hub.url()))
        .bearer_auth(&token)
        .json(&json!({"status": "disabled"}))
        .send()
        .await?
        .json()
        .await?;
    let before: Vec<String> = ["certs/ca.pem", "certs/server.pem", "service.key"]
        .iter()
        .map(|f| read(dir.path(), f))
        .collect::<Result<_>>()?;
    assert!(hub.stop().await?.success());

    let hub = Hub::start(dir.path()).await?;
    // The token minted before the restart still verifies: the owner key was kept.
    let fetched = hub
        .http()
        .get(format!("{}/devices/keeper", hub.url()))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(fetched.status(), StatusCode::OK);
    let fetched: Value = fetched.json().await?;
    assert_eq!(fetched, created, "device, keys and etag survive");
    let after: Vec<String> = ["certs/ca.pem", "certs/server.pem", "service.key"]
        .iter()
        .map(|f| read(dir.path(), f))
        .collect::<Result<_>>()?;
    assert_eq!(before, after, "certificates and owner key reused");
    assert!(hub.stop().await?.success());

    // A new hostname reissues the server certificate from the same CA.
    let hub = HubOptions::new(dir.path())
        .args(["--hostname", "hub.example"])
        .start()
        .await?;
    assert_eq!(read(dir.path(), "certs/ca.pem")?, before[0]);
    assert_ne!(read(dir.path(), "certs/server.pem")?, before[1]);
    assert!(hub.stop().await?.success());
    Ok(())
}

#[tokio::test]
async fn a_second_hub_on_the_same_data_dir_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let _first = Hub::start(dir.path()).await?;
    let second = HubOptions::new(dir.path())
        .start_expecting_failure()
        .await?;
    assert_eq!(second.status.code(), Some(1));
    assert!(
        second.stderr.contains("in use by another hub"),
        "{}",
        second.stderr
    );
    Ok(())
}

#[tokio::test]
async fn unusable_data_dirs_fail_start_up_with_a_clear_message() -> Result<()> {
    let parent = tempfile::tempdir()?;

    // The data dir path is a file.
    let file = parent.path().join("plain-file");
    std::fs::write(&file, "x")?;
    let out = HubOptions::new(&file).start_expecting_failure().await?;
    assert!(out.stderr.contains("is not a directory"), "{}", out.stderr);

    // It cannot be created (a parent is a file).
    let out = HubOptions::new(&file.join("sub"))
        .start_expecting_failure()
        .await?;
    assert!(out.stderr.contains("plain-file"), "{}", out.stderr);

    // Each corrupt file, in a data dir that was fine before.
    for (name, corrupt, expected) in [
        ("hub.redb", &b"\x42not a database"[..], "cannot open store"),
        ("service.key", &b"garbage"[..], "service.key"),
        ("certs/ca.pem", &b"garbage"[..], "ca.pem"),
    ] {
        let dir = tempfile::tempdir()?;
        let hub = Hub::start(dir.path()).await?;
        assert!(hub.stop().await?.success());
        std::fs::write(dir.path().join(name), corrupt.repeat(512))?;
        let out = HubOptions::new(dir.path())
            .start_expecting_failure()
            .await?;
        assert_eq!(out.status.code(), Some(1), "{name}: {}", out.stderr);
        assert!(out.stderr.contains(expected), "{name}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{name}: {}", out.stderr);
    }
    Ok(())
}

#[tokio::test]
async fn a_config_that_is_not_a_readable_file_fails_with_exit_code_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A directory where the config file should be: unreadable as a file.
    let config = dir.path().to_string_lossy().into_owned();
    let out = HubOptions::new(&dir.path().join("data"))
        .args(["--config", config.as_str()])
        .start_expecting_failure()
        .await?;
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot read config file"),
        "{}",
        out.stderr
    );
    Ok(())
}

#[tokio::test]
async fn a_taken_port_fails_start_up_naming_the_listener() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let dir = tempfile::tempdir()?;
    let out = HubOptions::new(dir.path())
        .http(&addr)
        .start_expecting_failure()
        .await?;
    assert!(
        out.stderr.contains("cannot bind the http listener"),
        "{}",
        out.stderr
    );
    Ok(())
}
