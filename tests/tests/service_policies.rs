//! Shared access policies against a real hub: `hub connection-string` and `hub policy
//! list|rotate`, the policies file's mode, SAS tokens signed with a policy key accepted
//! beside bearer tokens with the policy's permissions, and a rotation taking effect on
//! the running hub.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hub::auth::policy;
use hub_tests::{Hub, HubOptions, run_hub};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn now() -> u64 {
    hub::auth::unix_now()
}

/// Splits `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`.
fn parse(connection_string: &str) -> Result<(String, String, String)> {
    let mut host = None;
    let mut name = None;
    let mut key = None;
    for part in connection_string.split(';') {
        let (k, v) = part.split_once('=').context("field without =")?;
        match k {
            "HostName" => host = Some(v.to_string()),
            "SharedAccessKeyName" => name = Some(v.to_string()),
            // base64 ends in `=`: the value is everything after the first one.
            "SharedAccessKey" => key = Some(v.to_string()),
            other => bail!("unexpected field {other}"),
        }
    }
    Ok((
        host.context("HostName")?,
        name.context("SharedAccessKeyName")?,
        key.context("SharedAccessKey")?,
    ))
}

async fn connection_string(hub: &Hub, args: &[&str]) -> Result<String> {
    let mut all = vec!["connection-string", "--hostname", "Hub.Example"];
    all.extend(args);
    let out = hub.cli(&all).await?;
    anyhow::ensure!(out.status.success(), "connection-string: {}", out.stderr);
    let line = out.stdout.trim().to_string();
    anyhow::ensure!(
        out.stdout == format!("{line}\n"),
        "only the string: {:?}",
        out.stdout
    );
    Ok(line)
}

fn sas(host: &str, name: &str, key: &str, expiry: u64) -> Result<String> {
    policy::sign(host, name, key, expiry).context("key is not base64")
}

async fn status_and_code(response: reqwest::Response) -> Result<(StatusCode, Value)> {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    Ok((status, body["errorCode"].clone()))
}

#[tokio::test]
async fn policy_signatures_authorize_with_the_policys_permissions_and_rotation_applies()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = HubOptions::new(dir.path())
        .args(["--hostname", "Hub.Example"])
        .start()
        .await?;
    let http = hub.http();
    let url = |path: &str| format!("{}{path}", hub.url());

    let mode = std::fs::metadata(dir.path().join("policies.json"))?
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let list = hub.cli(&["policy", "list"]).await?;
    assert!(list.status.success(), "{}", list.stderr);
    for line in [
        "iothubowner\tregistry:read,registry:write,service:connect",
        "service\tservice:connect",
        "registryRead\tregistry:read",
        "registryReadWrite\tregistry:read,registry:write",
    ] {
        assert!(list.stdout.lines().any(|l| l == line), "{}", list.stdout);
    }
    // A config file naming the data dir serves as `hub serve --config` does.
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, format!("data_dir = {:?}\n", dir.path()))?;
    let config = config.to_string_lossy().into_owned();
    let through_config = run_hub(&["policy", "list", "--config", &config]).await?;
    assert!(through_config.status.success(), "{}", through_config.stderr);
    assert_eq!(through_config.stdout, list.stdout);

    let owner = connection_string(&hub, &[]).await?;
    let (host, name, key) = parse(&owner)?;
    assert_eq!(
        (host.as_str(), name.as_str()),
        ("Hub.Example", "iothubowner")
    );
    let owner_sas = sas(&host, &name, &key, now() + 600)?;

    // The owner policy creates and reads; the sr's host is compared case-insensitively.
    let created = http
        .put(url("/devices/d1"))
        .header("authorization", &owner_sas)
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(created.status(), StatusCode::OK);
    let lower = sas("hub.example", &name, &key, now() + 600)?;
    let got = http
        .get(url("/devices/d1"))
        .header("authorization", &lower)
        .send()
        .await?;
    assert_eq!(got.status(), StatusCode::OK);

    // The secondary key signs too.
    let secondary = connection_string(&hub, &["--key", "secondary"]).await?;
    let (_, _, secondary_key) = parse(&secondary)?;
    assert_ne!(secondary_key, key);
    let by_secondary = sas(&host, &name, &secondary_key, now() + 600)?;
    let got = http
        .get(url("/devices/d1"))
        .header("authorization", &by_secondary)
        .send()
        .await?;
    assert_eq!(got.status(), StatusCode::OK);

    // registryRead reads and may not write; service may not read the registry.
    let (_, read_name, read_key) =
        parse(&connection_string(&hub, &["--policy", "registryRead"]).await?)?;
    let reader = sas(&host, &read_name, &read_key, now() + 600)?;
    let got = http
        .get(url("/devices/d1"))
        .header("authorization", &reader)
        .send()
        .await?;
    assert_eq!(got.status(), StatusCode::OK);
    let refused = http
        .delete(url("/devices/d1"))
        .header("authorization", &reader)
        .send()
        .await?;
    assert_eq!(
        status_and_code(refused).await?,
        (StatusCode::UNAUTHORIZED, json!(401002))
    );
    let (_, service_name, service_key) =
        parse(&connection_string(&hub, &["--policy", "service"]).await?)?;
    let service = sas(&host, &service_name, &service_key, now() + 600)?;
    let refused = http
        .get(url("/devices/d1"))
        .header("authorization", &service)
        .send()
        .await?;
    assert_eq!(
        status_and_code(refused).await?,
        (StatusCode::UNAUTHORIZED, json!(401002))
    );

    // Refusals: wrong key, expired, another hub, unknown policy.
    for (token, code) in [
        (sas(&host, &name, &read_key, now() + 600)?, 401002),
        (sas(&host, &name, &key, now() - 1)?, 401003),
        (sas("other.example", &name, &key, now() + 600)?, 401002),
        (sas(&host, "admin", &key, now() + 600)?, 401002),
    ] {
        let refused = http
            .get(url("/devices/d1"))
            .header("authorization", &token)
            .send()
            .await?;
        assert_eq!(
            status_and_code(refused).await?,
            (StatusCode::UNAUTHORIZED, json!(code)),
            "{token}"
        );
    }
    let unknown = hub.cli(&["connection-string", "--policy", "admin"]).await?;
    assert!(!unknown.status.success());
    assert!(
        unknown.stderr.contains("unknown policy"),
        "{}",
        unknown.stderr
    );

    // Rotating the primary key refuses the old one on the running hub, the new one
    // works, the secondary is untouched.
    let rotated = hub
        .cli(&[
            "policy",
            "rotate",
            "--policy",
            "iothubowner",
            "--key",
            "primary",
        ])
        .await?;
    assert!(rotated.status.success(), "{}", rotated.stderr);
    let (_, _, new_key) = parse(&connection_string(&hub, &[]).await?)?;
    assert_ne!(new_key, key);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let old = http
            .get(url("/devices/d1"))
            .header("authorization", &owner_sas)
            .send()
            .await?;
        if old.status() == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(Instant::now() < deadline, "the old key still works");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for token in [
        sas(&host, &name, &new_key, now() + 600)?,
        by_secondary.clone(),
    ] {
        let got = http
            .get(url("/devices/d1"))
            .header("authorization", &token)
            .send()
            .await?;
        assert_eq!(got.status(), StatusCode::OK);
    }

    // Bearer tokens keep working beside the policies.
    let bearer = hub.owner_token().await?;
    let got = http
        .get(url("/devices/d1"))
        .bearer_auth(&bearer)
        .send()
        .await?;
    assert_eq!(got.status(), StatusCode::OK);
    hub.stop().await?;

    // The keys survive a restart.
    let hub = HubOptions::new(dir.path())
        .args(["--hostname", "Hub.Example"])
        .start()
        .await?;
    let (_, _, after_restart) = parse(&connection_string(&hub, &[]).await?)?;
    assert_eq!(after_restart, new_key);
    hub.stop().await?;
    Ok(())
}
