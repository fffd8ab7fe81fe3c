//! Provisioning rules without an SDK: the `hub dps` CLI over a real hub; a
//! registration whose initial twin the twins capability refuses leaves no device
//! behind; `reprovisionPolicy.migrateDeviceData = false` resets the twin on
//! re-registration (substatus `deviceDataReset`). Devices talk the HTTPS device routes
//! with SAS tokens signed here.

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hub_tests::Hub;
use serde_json::{Value, json};

/// Registers `id` with `key` over the HTTPS device routes and polls the operation
/// once; returns the register status and the outcome (when accepted).
async fn register(hub: &Hub, scope: &str, id: &str, key: &str) -> Result<(u16, Value)> {
    let token = hub::auth::sas::sign_resource(
        &format!("{scope}/registrations/{id}"),
        &STANDARD.decode(key)?,
        hub::auth::unix_now() + 600,
    );
    let auth = format!("{token}&skn=registration");
    let response = hub
        .http()
        .put(format!("{}/{scope}/registrations/{id}/register", hub.url()))
        .header("Authorization", &auth)
        .json(&json!({ "registrationId": id }))
        .send()
        .await?;
    let status = response.status().as_u16();
    let body: Value = response.json().await?;
    if status != 202 {
        return Ok((status, body));
    }
    let operation = body["operationId"].as_str().context("operationId")?;
    let outcome: Value = hub
        .http()
        .get(format!(
            "{}/{scope}/registrations/{id}/operations/{operation}",
            hub.url()
        ))
        .header("Authorization", &auth)
        .send()
        .await?
        .json()
        .await?;
    Ok((status, outcome))
}

#[tokio::test]
async fn the_dps_cli_manages_groups_enrollments_and_keys() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let scope = hub.cli(&["dps", "scope"]).await?;
    assert!(scope.status.success(), "{}", scope.stderr);
    let again = hub.cli(&["dps", "scope"]).await?;
    assert_eq!(scope.stdout, again.stdout, "the scope is kept");

    let created = hub
        .cli(&[
            "dps",
            "group",
            "create",
            "line-a",
            "--initial-twin",
            r#"{"tags": {"line": "a"}}"#,
            "--reset-on-reprovision",
        ])
        .await?;
    assert!(created.status.success(), "{}", created.stderr);
    let group: Value = serde_json::from_str(&created.stdout)?;
    assert_eq!(group["enrollmentGroupId"], "line-a");
    assert_eq!(group["reprovisionPolicy"]["migrateDeviceData"], false);
    assert_eq!(group["initialTwin"]["tags"]["line"], "a");
    let got: Value =
        serde_json::from_str(&hub.cli(&["dps", "group", "get", "line-a"]).await?.stdout)?;
    assert_eq!(got["etag"], group["etag"]);
    let enrollment = hub
        .cli(&["dps", "enrollment", "create", "solo-1", "--disabled"])
        .await?;
    assert!(enrollment.status.success(), "{}", enrollment.stderr);
    let listed: Value =
        serde_json::from_str(&hub.cli(&["dps", "enrollment", "list"]).await?.stdout)?;
    assert_eq!(listed[0]["registrationId"], "solo-1");
    assert_eq!(listed[0]["provisioningStatus"], "disabled");

    // The derived key registers the device; the registration is listed.
    let key = hub.cli(&["dps", "device-key", "line-a", "unit-9"]).await?;
    assert!(key.status.success(), "{}", key.stderr);
    let scope = scope.stdout.trim();
    let (status, outcome) = register(&hub, scope, "unit-9", key.stdout.trim()).await?;
    assert_eq!(status, 202, "{outcome}");
    assert_eq!(outcome["status"], "assigned", "{outcome}");
    let registrations: Value =
        serde_json::from_str(&hub.cli(&["dps", "registrations"]).await?.stdout)?;
    assert_eq!(
        registrations[0]["registrationId"], "unit-9",
        "{registrations}"
    );

    let deleted = hub.cli(&["dps", "group", "delete", "line-a"]).await?;
    assert!(deleted.status.success(), "{}", deleted.stderr);
    let missing = hub.cli(&["dps", "group", "get", "line-a"]).await?;
    assert!(!missing.status.success());
    assert!(missing.stderr.contains("404"), "{}", missing.stderr);
    assert!(hub.stop().await?.success());
    Ok(())
}

#[tokio::test]
async fn a_refused_initial_twin_leaves_nothing_and_reset_policies_reset() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let scope = hub.cli(&["dps", "scope"]).await?.stdout.trim().to_string();
    let token = hub
        .token("registry:read,registry:write,provisioning:write")
        .await?;
    let put = |path: String, body: Value| {
        hub.http()
            .put(format!("{}{path}", hub.url()))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };

    // The twins capability refuses a desired property named with `$`: the device the
    // registration created is taken back, and no registration is stored.
    let key = STANDARD.encode([3u8; 32]);
    let response = put(
        "/enrollments/bad-twin".into(),
        json!({
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}},
            "initialTwin": {"properties": {"desired": {"$nope": 1}}}
        }),
    )
    .await?;
    assert_eq!(response.status().as_u16(), 200);
    let (status, body) = register(&hub, &scope, "bad-twin", &key).await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errorCode"], 400_004);
    let device = hub
        .http()
        .get(format!("{}/devices/bad-twin", hub.url()))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(device.status().as_u16(), 404, "nothing half created");

    // A registration token valid for longer than mqtt.sas_max_lifetime_secs (a year
    // by default) is refused like a device token.
    let forever = hub::auth::sas::sign_resource(
        &format!("{scope}/registrations/bad-twin"),
        &STANDARD.decode(&key)?,
        u64::MAX / 2,
    );
    let response = hub
        .http()
        .put(format!(
            "{}/{scope}/registrations/bad-twin/register",
            hub.url()
        ))
        .header("Authorization", format!("{forever}&skn=registration"))
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 401);

    // migrateDeviceData = false: a second registration resets the twin.
    let response = put(
        "/enrollments/resettable".into(),
        json!({
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key}},
            "initialTwin": {"properties": {"desired": {"level": 1}}},
            "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": false}
        }),
    )
    .await?;
    assert_eq!(response.status().as_u16(), 200);
    let (_, first) = register(&hub, &scope, "resettable", &key).await?;
    assert_eq!(first["registrationState"]["substatus"], "initialAssignment");
    let patched = hub
        .http()
        .patch(format!("{}/twins/resettable", hub.url()))
        .bearer_auth(&token)
        .json(&json!({"properties": {"desired": {"level": 7, "extra": true}}}))
        .send()
        .await?;
    assert_eq!(patched.status().as_u16(), 200);
    let (_, second) = register(&hub, &scope, "resettable", &key).await?;
    assert_eq!(second["status"], "assigned", "{second}");
    assert_eq!(second["registrationState"]["substatus"], "deviceDataReset");
    let twin: Value = hub
        .http()
        .get(format!("{}/twins/resettable", hub.url()))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(twin["properties"]["desired"]["level"], 1, "{twin}");
    assert!(
        twin["properties"]["desired"].get("extra").is_none(),
        "{twin}"
    );
    assert!(hub.stop().await?.success());
    Ok(())
}
