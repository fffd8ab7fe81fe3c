//! Cluster mode (issue 16): two hub nodes on one real NATS JetStream cluster share the
//! shared access policies through `hub-cluster-secrets` — the second node adopts the
//! first's keys, a key rotated with `hub policy rotate` on one node is refused by the
//! other within seconds and the new key works there, and every node's data dir (and so
//! its `hub connection-string`) follows. Feedback abandoned on one node is offered
//! again at once on the other.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use hub::auth::policy;
use hub_tests::nats::NatsCluster;
use hub_tests::{Hub, HubOptions};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;

const HOST: &str = "cluster.example";

async fn node(root: &Path, name: &str, cluster: &NatsCluster) -> Result<Hub> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir)?;
    let config = root.join("hub-test.toml");
    // JetStream reserves a stream's maximum bytes on every node's disk.
    std::fs::write(&config, "[telemetry]\nretention_bytes = 268435456\n")?;
    HubOptions::new(&dir)
        .args([
            "--cluster",
            cluster.cluster_url().as_str(),
            "--config",
            config.to_str().context("config path")?,
            "--hostname",
            HOST,
        ])
        .start()
        .await
}

async fn owner_key(hub: &Hub) -> Result<String> {
    let out = hub.cli(&["connection-string", "--hostname", HOST]).await?;
    anyhow::ensure!(out.status.success(), "{}", out.stderr);
    out.stdout
        .trim()
        .split_once("SharedAccessKey=")
        .map(|(_, key)| key.to_string())
        .context("no key in the connection string")
}

async fn get_with(hub: &Hub, key: &str) -> Result<StatusCode> {
    let token = policy::sign(HOST, "iothubowner", key, hub::auth::unix_now() + 600)
        .context("key is not base64")?;
    Ok(hub
        .http()
        .get(format!("{}/devices/d1", hub.url()))
        .header("authorization", token)
        .send()
        .await?
        .status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policies_and_their_rotation_are_shared_by_every_node() -> Result<()> {
    let root = tempfile::tempdir()?;
    let cluster = NatsCluster::start(3).await?;
    let result = async {
        let a = node(root.path(), "a", &cluster).await?;
        let b = node(root.path(), "b", &cluster).await?;
        let key = owner_key(&a).await?;
        assert_eq!(owner_key(&b).await?, key, "B adopted A's policies");
        let token = a.owner_token().await?;
        let created = a
            .http()
            .put(format!("{}/devices/d1", a.url()))
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
            .await?;
        assert_eq!(created.status(), StatusCode::OK);
        let deadline = Instant::now() + Duration::from_secs(10);
        while get_with(&b, &key).await? != StatusCode::OK {
            assert!(Instant::now() < deadline, "B never served d1 to A's key");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Rotated on A: B refuses the old key and accepts the new one.
        let rotated = a
            .cli(&["policy", "rotate", "--policy", "iothubowner"])
            .await?;
        assert!(rotated.status.success(), "{}", rotated.stderr);
        let new_key = owner_key(&a).await?;
        assert_ne!(new_key, key);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let old = get_with(&b, &key).await?;
            let new = get_with(&b, &new_key).await?;
            if old == StatusCode::UNAUTHORIZED && new == StatusCode::OK {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "B did not follow the rotation: old {old}, new {new}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // B's data dir follows too, so its connection string is current.
        let deadline = Instant::now() + Duration::from_secs(10);
        while owner_key(&b).await? != new_key {
            assert!(Instant::now() < deadline, "B's policies file is stale");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(get_with(&a, &key).await?, StatusCode::UNAUTHORIZED);

        // Feedback abandoned on A is offered again at once on B.
        let sent = a
            .http()
            .post(format!("{}/devices/d1/messages/deviceBound", a.url()))
            .bearer_auth(&token)
            .json(&json!({"body": "x", "messageId": "m1", "ack": "full"}))
            .send()
            .await?;
        assert_eq!(sent.status(), StatusCode::ACCEPTED);
        let purged = a
            .http()
            .delete(format!("{}/devices/d1/commands", a.url()))
            .bearer_auth(&token)
            .send()
            .await?;
        assert!(purged.status().is_success());
        let feedback = |hub: &Hub, wait: u32| {
            hub.http()
                .get(format!(
                    "{}/messages/serviceBound/feedback?waitMs={wait}",
                    hub.url()
                ))
                .bearer_auth(&token)
                .send()
        };
        let first: Value = feedback(&a, 10_000).await?.json().await?;
        assert_eq!(first["records"][0]["originalMessageId"], json!("m1"));
        let lock = first["lockToken"].as_str().context("lockToken")?;
        let abandoned = a
            .http()
            .post(format!(
                "{}/messages/serviceBound/feedback/{lock}/abandon",
                a.url()
            ))
            .bearer_auth(&token)
            .send()
            .await?;
        assert_eq!(abandoned.status(), StatusCode::NO_CONTENT);
        // Well within the 60 s lock.
        let again = feedback(&b, 10_000).await?;
        assert_eq!(again.status(), StatusCode::OK);
        let again: Value = again.json().await?;
        assert_eq!(again["records"][0]["originalMessageId"], json!("m1"));
        let second = again["lockToken"].as_str().context("lockToken")?;
        let completed = b
            .http()
            .delete(format!(
                "{}/messages/serviceBound/feedback/{second}",
                b.url()
            ))
            .bearer_auth(&token)
            .send()
            .await?;
        assert_eq!(completed.status(), StatusCode::NO_CONTENT);
        a.stop().await?;
        b.stop().await?;
        anyhow::Ok(())
    }
    .await;
    cluster.with_logs(result)
}
