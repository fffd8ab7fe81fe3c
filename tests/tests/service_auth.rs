//! Service bearer tokens against a real hub: missing, malformed, badly signed,
//! expired and under-scoped tokens are refused with 401002, 401003 or 403001.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use hub_tests::Hub;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The Ed25519 private key from RFC 8410 section 10.3: a key the hub never issued.
const FOREIGN_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sign(pem: &[u8], claims: &Value) -> Result<String> {
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        claims,
        &EncodingKey::from_ed_pem(pem)?,
    )?)
}

async fn expect(response: reqwest::Response, status: StatusCode, code: u64) -> Result<()> {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await?;
    assert_eq!(body["errorCode"], json!(code), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    Ok(())
}

#[tokio::test]
async fn tokens_are_checked_for_signature_expiry_and_scope() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let url = format!("{}/devices/d1", hub.url());
    let http = hub.http();

    // `hub token` prints the bare token and nothing else.
    let owner = hub.owner_token().await?;
    assert_eq!(owner.split('.').count(), 3, "a JWT: {owner}");
    assert!(!owner.contains(char::is_whitespace));
    let created = http
        .put(&url)
        .bearer_auth(&owner)
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(created.status(), StatusCode::OK);

    // No token, a non-bearer scheme, garbage.
    expect(
        http.get(&url).send().await?,
        StatusCode::UNAUTHORIZED,
        401002,
    )
    .await?;
    let basic = http
        .get(&url)
        .header("Authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await?;
    assert_eq!(
        basic
            .headers()
            .get("www-authenticate")
            .map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    expect(basic, StatusCode::UNAUTHORIZED, 401002).await?;
    expect(
        http.get(&url).bearer_auth("garbage").send().await?,
        StatusCode::UNAUTHORIZED,
        401002,
    )
    .await?;

    // A signature that does not verify: tampered, and from a foreign key.
    let (head, signature) = owner.rsplit_once('.').expect("three parts");
    let mut flipped: Vec<char> = signature.chars().collect();
    flipped[10] = if flipped[10] == 'A' { 'B' } else { 'A' };
    let tampered = format!("{head}.{}", flipped.into_iter().collect::<String>());
    expect(
        http.get(&url).bearer_auth(&tampered).send().await?,
        StatusCode::UNAUTHORIZED,
        401002,
    )
    .await?;
    let foreign = sign(
        FOREIGN_KEY.as_bytes(),
        &json!({"sub": "x", "iat": now(), "exp": now() + 600, "scope": "registry:read"}),
    )?;
    expect(
        http.get(&url).bearer_auth(&foreign).send().await?,
        StatusCode::UNAUTHORIZED,
        401002,
    )
    .await?;

    // An unsigned token (`alg: none`) with a valid-looking payload.
    let payload = head.split('.').nth(1).expect("payload");
    let unsigned = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
    expect(
        http.get(&url).bearer_auth(&unsigned).send().await?,
        StatusCode::UNAUTHORIZED,
        401002,
    )
    .await?;

    // Expired, signed by the hub's own key: 401003, with zero leeway.
    let owner_key = std::fs::read(dir.path().join("service.key"))?;
    let expired = sign(
        &owner_key,
        &json!({"sub": "x", "iat": now() - 60, "exp": now() - 1, "scope": "registry:read"}),
    )?;
    expect(
        http.get(&url).bearer_auth(&expired).send().await?,
        StatusCode::UNAUTHORIZED,
        401003,
    )
    .await?;
    let no_exp = sign(
        &owner_key,
        &json!({"sub": "x", "iat": now(), "scope": "registry:read"}),
    )?;
    expect(
        http.get(&url).bearer_auth(&no_exp).send().await?,
        StatusCode::UNAUTHORIZED,
        401002,
    )
    .await?;

    // Scopes: read cannot write, write cannot read.
    let reader = hub.token("registry:read").await?;
    let writer = hub.token("registry:write").await?;
    assert_eq!(
        http.get(&url).bearer_auth(&reader).send().await?.status(),
        StatusCode::OK
    );
    let put = http
        .put(&url)
        .bearer_auth(&reader)
        .header("If-Match", "*")
        .json(&json!({}))
        .send();
    expect(put.await?, StatusCode::FORBIDDEN, 403001).await?;
    expect(
        http.delete(&url).bearer_auth(&reader).send().await?,
        StatusCode::FORBIDDEN,
        403001,
    )
    .await?;
    expect(
        http.get(&url).bearer_auth(&writer).send().await?,
        StatusCode::FORBIDDEN,
        403001,
    )
    .await?;
    let list = format!("{}/devices", hub.url());
    expect(
        http.get(&list).bearer_auth(&writer).send().await?,
        StatusCode::FORBIDDEN,
        403001,
    )
    .await?;

    // Authentication comes before body parsing: a bad body without a token is 401.
    let unauth = http
        .put(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    expect(unauth, StatusCode::UNAUTHORIZED, 401002).await?;

    // Nothing above changed the device.
    let device: Value = http
        .get(&url)
        .bearer_auth(&reader)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(device["etag"], created_etag(&hub, &owner).await?);
    Ok(())
}

async fn created_etag(hub: &Hub, token: &str) -> Result<Value> {
    let list: Vec<Value> = hub
        .http()
        .get(format!("{}/devices", hub.url()))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    Ok(list[0]["etag"].clone())
}

#[tokio::test]
async fn hub_token_refuses_unknown_scopes_and_a_missing_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dir_arg = dir.path().to_string_lossy().into_owned();
    let out =
        hub_tests::run_hub(&["token", "--data-dir", &dir_arg, "--scope", "registry:read"]).await?;
    assert!(!out.status.success());
    assert!(out.stderr.contains("service.key"), "{}", out.stderr);
    assert!(out.stdout.is_empty());

    let hub = Hub::start(dir.path()).await?;
    let out = hub_tests::run_hub(&["token", "--data-dir", &dir_arg, "--scope", "admin"]).await?;
    assert!(!out.status.success());
    assert!(out.stderr.contains("unknown scope"), "{}", out.stderr);
    drop(hub);
    Ok(())
}
