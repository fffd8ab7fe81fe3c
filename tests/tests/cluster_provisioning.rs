//! Cluster mode, provisioning (issue 25): two hub nodes on one real NATS JetStream
//! cluster share one ID scope and the enrollments and registrations (KV bucket
//! `hub-provisioning`). A group created through hub A registers a device through hub
//! B's HTTPS device routes; the registration is seen through A; the device connects
//! to A with its derived key.

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hub_tests::Hub;
use hub_tests::nats::NatsCluster;
use serde_json::{Value, json};

async fn scope(hub: &Hub) -> Result<String> {
    let out = hub.cli(&["dps", "scope"]).await?;
    anyhow::ensure!(out.status.success(), "{}", out.stderr);
    Ok(out.stdout.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_registers_against_the_clusters_enrollments() -> Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let root = tempfile::tempdir()?;
    let (dir_a, dir_b) = (root.path().join("a"), root.path().join("b"));
    std::fs::create_dir_all(&dir_a)?;
    std::fs::create_dir_all(&dir_b)?;
    let a = cluster.start_hub(&dir_a).await?;
    let b = cluster.start_hub(&dir_b).await?;
    let scope_a = scope(&a).await?;
    assert_eq!(scope(&b).await?, scope_a, "one ID scope for the cluster");

    let token_a = a
        .token("registry:read,provisioning:read,provisioning:write")
        .await?;
    let group: Value = a
        .http()
        .put(format!("{}/enrollmentGroups/shared", a.url()))
        .bearer_auth(&token_a)
        .json(&json!({"initialTwin": {"tags": {"via": "cluster"}}}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let group_key = group["attestation"]["symmetricKey"]["primaryKey"]
        .as_str()
        .context("group key")?;
    let device_key = hub::provisioning::derive_device_key(group_key, "roamer").context("derive")?;

    // Register through B.
    let token = hub::auth::sas::sign_resource(
        &format!("{scope_a}/registrations/roamer"),
        &STANDARD.decode(&device_key)?,
        hub::auth::unix_now() + 600,
    );
    let auth = format!("{token}&skn=registration");
    let accepted: Value = b
        .http()
        .put(format!(
            "{}/{scope_a}/registrations/roamer/register",
            b.url()
        ))
        .header("Authorization", &auth)
        .json(&json!({"registrationId": "roamer"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let operation = accepted["operationId"].as_str().context("operationId")?;
    // Poll through A: the operation lives with the registration in the bucket.
    let outcome: Value = a
        .http()
        .get(format!(
            "{}/{scope_a}/registrations/roamer/operations/{operation}",
            a.url()
        ))
        .header("Authorization", &auth)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(outcome["status"], "assigned", "{outcome}");
    let registration: Value = a
        .http()
        .get(format!("{}/registrations/roamer", a.url()))
        .bearer_auth(&token_a)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(registration["symmetricKey"]["enrollmentGroupId"], "shared");

    // The device exists cluster-wide with the derived key and the initial twin.
    let twin: Value = a
        .http()
        .get(format!("{}/twins/roamer", a.url()))
        .bearer_auth(&token_a)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(twin["tags"]["via"], "cluster", "{twin}");
    let client = a.connect_device("roamer", &device_key, true).await?;
    drop(client);
    Ok(())
}
