//! The device registry over HTTP against a real hub: create, read, list with paging,
//! update with and without a matching etag, disable, delete, and every refusal with
//! its status and JSON error body.

use anyhow::Result;
use hub_tests::Hub;
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Api {
    hub: Hub,
    token: String,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let hub = Hub::start(dir.path()).await?;
        let token = hub.owner_token().await?;
        Ok(Self {
            hub,
            token,
            _dir: dir,
        })
    }

    fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.hub
            .http()
            .put(format!("{}{path}", self.hub.url()))
            .bearer_auth(&self.token)
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.hub
            .http()
            .get(format!("{}{path}", self.hub.url()))
            .bearer_auth(&self.token)
    }

    fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.hub
            .http()
            .delete(format!("{}{path}", self.hub.url()))
            .bearer_auth(&self.token)
    }

    fn patch(&self, path: &str) -> reqwest::RequestBuilder {
        self.hub
            .http()
            .patch(format!("{}{path}", self.hub.url()))
            .bearer_auth(&self.token)
    }

    async fn create(&self, id: &str) -> Result<Value> {
        let response = self
            .put(&format!("/devices/{id}"))
            .json(&json!({}))
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::OK, "create {id}");
        Ok(response.json().await?)
    }
}

/// Asserts status and `errorCode`, and that the body has a non-empty message.
async fn assert_error(response: reqwest::Response, status: StatusCode, code: u64) -> Result<()> {
    assert_eq!(response.status(), status);
    let content_type = response.headers().get("content-type").cloned();
    let body: Value = response.json().await?;
    assert_eq!(body["errorCode"], json!(code), "body: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message in {body}"
    );
    assert_eq!(
        content_type.as_ref().and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    Ok(())
}

#[tokio::test]
async fn create_read_update_disable_and_delete_a_device() -> Result<()> {
    let api = Api::start().await?;

    let created = api.create("sensor-1").await?;
    assert_eq!(created["deviceId"], "sensor-1");
    assert_eq!(created["status"], "enabled");
    assert_eq!(created["authentication"]["type"], "sas");
    assert_eq!(created["connectionState"], "Disconnected");
    let primary = created["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .expect("generated primary key");
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD.decode(primary)?;
    assert_eq!(key.len(), 32, "32 random bytes");
    let etag = created["etag"].as_str().expect("etag").to_string();

    let fetched = api
        .get("/devices/sensor-1?api-version=2021-04-12")
        .send()
        .await?;
    assert_eq!(fetched.status(), StatusCode::OK);
    let header_etag = fetched.headers()["etag"].to_str()?.to_string();
    assert_eq!(header_etag, format!("\"{etag}\""));
    let fetched: Value = fetched.json().await?;
    assert_eq!(fetched, created);

    // Update with the matching etag (quoted, as an HTTP client sends it).
    let disabled = api
        .put("/devices/sensor-1")
        .header("If-Match", &header_etag)
        .json(
            &json!({"deviceId": "sensor-1", "status": "disabled", "statusReason": "maintenance",
                      "etag": "ignored", "connectionState": "Connected"}),
        )
        .send()
        .await?;
    assert_eq!(disabled.status(), StatusCode::OK);
    let disabled: Value = disabled.json().await?;
    assert_eq!(disabled["status"], "disabled");
    assert_eq!(disabled["statusReason"], "maintenance");
    assert_eq!(
        disabled["connectionState"], "Disconnected",
        "read-only fields ignored"
    );
    assert_eq!(
        disabled["authentication"], created["authentication"],
        "keys kept"
    );
    assert_ne!(disabled["etag"], created["etag"]);

    // The old etag no longer matches: 412, and nothing changed.
    let stale = api
        .put("/devices/sensor-1")
        .header("If-Match", &etag)
        .json(&json!({"status": "enabled"}))
        .send()
        .await?;
    assert_error(stale, StatusCode::PRECONDITION_FAILED, 412001).await?;
    let current: Value = api.get("/devices/sensor-1").send().await?.json().await?;
    assert_eq!(current["status"], "disabled");

    // `*` forces, unquoted etags work too.
    let forced = api
        .put("/devices/sensor-1")
        .header("If-Match", "*")
        .json(&json!({"status": "enabled"}))
        .send()
        .await?;
    assert_eq!(forced.status(), StatusCode::OK);
    let forced: Value = forced.json().await?;
    assert_eq!(forced["status"], "enabled");

    // Azure's service SDKs send the wildcard quoted by default: it forces too, for
    // devices and twins.
    let quoted = api
        .put("/devices/sensor-1")
        .header("If-Match", "\"*\"")
        .json(&json!({"status": "enabled", "statusReason": "quoted wildcard"}))
        .send()
        .await?;
    assert_eq!(quoted.status(), StatusCode::OK);
    let forced: Value = quoted.json().await?;
    assert_eq!(forced["statusReason"], "quoted wildcard");
    let twin = api
        .patch("/twins/sensor-1")
        .header("If-Match", "\"*\"")
        .json(&json!({"tags": {"site": "oslo"}}))
        .send()
        .await?;
    assert_eq!(twin.status(), StatusCode::OK);

    let stale_delete = api
        .delete("/devices/sensor-1")
        .header("If-Match", "\"nope\"")
        .send()
        .await?;
    assert_error(stale_delete, StatusCode::PRECONDITION_FAILED, 412001).await?;
    let deleted = api
        .delete("/devices/sensor-1")
        .header("If-Match", forced["etag"].as_str().expect("etag"))
        .send()
        .await?;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let gone = api.get("/devices/sensor-1").send().await?;
    assert_error(gone, StatusCode::NOT_FOUND, 404001).await?;
    let gone = api.delete("/devices/sensor-1").send().await?;
    assert_error(gone, StatusCode::NOT_FOUND, 404001).await?;
    Ok(())
}

#[tokio::test]
async fn update_of_an_unknown_device_is_404() -> Result<()> {
    let api = Api::start().await?;
    let response = api
        .put("/devices/ghost")
        .header("If-Match", "*")
        .json(&json!({"status": "disabled"}))
        .send()
        .await?;
    assert_error(response, StatusCode::NOT_FOUND, 404001).await
}

#[tokio::test]
async fn duplicate_create_is_409_with_and_without_if_none_match() -> Result<()> {
    let api = Api::start().await?;
    api.create("dup").await?;
    let again = api.put("/devices/dup").json(&json!({})).send().await?;
    assert_error(again, StatusCode::CONFLICT, 409001).await?;
    let again = api
        .put("/devices/dup")
        .header("If-None-Match", "*")
        .json(&json!({}))
        .send()
        .await?;
    assert_error(again, StatusCode::CONFLICT, 409001).await?;
    let fresh = api
        .put("/devices/fresh")
        .header("If-None-Match", "*")
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(fresh.status(), StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn listing_pages_with_continuation_tokens() -> Result<()> {
    let api = Api::start().await?;
    for n in 0..7 {
        api.create(&format!("dev-{n}")).await?;
    }
    let mut seen = Vec::new();
    let mut continuation: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut request = api.get("/devices").header("x-ms-max-item-count", "3");
        if let Some(token) = &continuation {
            request = request.header("x-ms-continuation", token);
        }
        let response = request.send().await?;
        assert_eq!(response.status(), StatusCode::OK);
        continuation = response
            .headers()
            .get("x-ms-continuation")
            .map(|v| v.to_str().map(str::to_string))
            .transpose()?;
        let page: Vec<Value> = response.json().await?;
        assert!(page.len() <= 3);
        seen.extend(
            page.iter()
                .map(|d| d["deviceId"].as_str().unwrap_or("").to_string()),
        );
        pages += 1;
        if continuation.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..7).map(|n| format!("dev-{n}")).collect();
    assert_eq!(seen, expected);

    let bad = api
        .get("/devices")
        .header("x-ms-max-item-count", "0")
        .send()
        .await?;
    assert_error(bad, StatusCode::BAD_REQUEST, 400004).await?;
    let bad = api
        .get("/devices")
        .header("x-ms-continuation", "%%%")
        .send()
        .await?;
    assert_error(bad, StatusCode::BAD_REQUEST, 400004).await?;
    Ok(())
}

#[tokio::test]
async fn bad_device_ids_are_400() -> Result<()> {
    let api = Api::start().await?;
    let long = "x".repeat(129);
    // `..%2Fx` reaches the hub as the single segment `../x` (clients normalise a
    // literal `../`).
    for path in [
        "/devices/..%2Fx",
        &format!("/devices/{long}"),
        "/devices/a%20b",
    ] {
        let response = api.put(path).json(&json!({})).send().await?;
        assert_error(response, StatusCode::BAD_REQUEST, 400004).await?;
        let response = api.get(path).send().await?;
        assert_error(response, StatusCode::BAD_REQUEST, 400004).await?;
    }
    let ok = api.create(&"y".repeat(128)).await?;
    assert_eq!(ok["deviceId"].as_str().map(str::len), Some(128));
    // Ids with every allowed punctuation character round-trip (percent-encoded).
    let response = api
        .put("/devices/a-%3A.%2B%25_%23%2A%3F%21%28%29%2C%3D%40%3B%24%27")
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await?;
    assert_eq!(body["deviceId"], "a-:.+%_#*?!(),=@;$'");
    Ok(())
}

#[tokio::test]
async fn malformed_bodies_are_refused_with_json_errors() -> Result<()> {
    let api = Api::start().await?;
    let url = |p: &str| format!("{}{p}", api.hub.url());

    let malformed = api
        .put("/devices/d")
        .header("content-type", "application/json")
        .body("{\"status\": ")
        .send()
        .await?;
    assert_error(malformed, StatusCode::BAD_REQUEST, 400004).await?;

    for body in [
        json!({"status": 5}),
        json!({"status": "sleeping"}),
        json!({"authentication": {"type": "password"}}),
        json!({"authentication": "sas"}),
        json!({"statusReason": ["a"]}),
    ] {
        let response = api.put("/devices/d").json(&body).send().await?;
        assert_error(response, StatusCode::BAD_REQUEST, 400004).await?;
    }

    let mismatched = api
        .put("/devices/d")
        .json(&json!({"deviceId": "other"}))
        .send()
        .await?;
    assert_error(mismatched, StatusCode::BAD_REQUEST, 400004).await?;

    let short_key = api
        .put("/devices/d")
        .json(
            &json!({"authentication": {"type": "sas", "symmetricKey": {"primaryKey": "c2hvcnQ="}}}),
        )
        .send()
        .await?;
    assert_error(short_key, StatusCode::BAD_REQUEST, 400004).await?;

    let no_thumbprint = api
        .put("/devices/d")
        .json(&json!({"authentication": {"type": "selfSigned"}}))
        .send()
        .await?;
    assert_error(no_thumbprint, StatusCode::BAD_REQUEST, 400004).await?;

    let not_json = api.put("/devices/d").body("{}").send().await?;
    assert_error(not_json, StatusCode::UNSUPPORTED_MEDIA_TYPE, 415001).await?;

    // The default limit is 1 MiB.
    let huge = json!({ "statusReason": "x".repeat(2 * 1024 * 1024) });
    let too_large = api.put("/devices/d").json(&huge).send().await?;
    assert_eq!(
        too_large.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "the unread body makes the connection unusable"
    );
    assert_error(too_large, StatusCode::PAYLOAD_TOO_LARGE, 413001).await?;

    // None of the refusals created the device.
    let missing = api.get("/devices/d").send().await?;
    assert_error(missing, StatusCode::NOT_FOUND, 404001).await?;

    let unknown = api.hub.http().get(url("/no/such/route")).send().await?;
    assert_error(unknown, StatusCode::NOT_FOUND, 404000).await?;
    let wrong_method = api
        .hub
        .http()
        .post(url("/devices/d"))
        .bearer_auth(&api.token)
        .send()
        .await?;
    assert_error(wrong_method, StatusCode::METHOD_NOT_ALLOWED, 405000).await?;
    Ok(())
}

#[tokio::test]
async fn devices_of_every_auth_type_are_stored() -> Result<()> {
    let api = Api::start().await?;
    let thumbprint = "AB:".repeat(31) + "AB";
    let response = api
        .put("/devices/x509-self")
        .json(&json!({"authentication": {"type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": thumbprint}}}))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await?;
    assert_eq!(
        body["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        "ab".repeat(32)
    );
    assert_eq!(body["authentication"]["symmetricKey"], Value::Null);

    let response = api
        .put("/devices/x509-ca")
        .json(&json!({"authentication": {"type": "certificateAuthority"}}))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);

    let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
    let response = api
        .put("/devices/jwt-1")
        .json(&json!({"authentication": {"type": "jwt", "symmetricKey": {"primaryKey": key}}}))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await?;
    assert_eq!(body["authentication"]["symmetricKey"]["primaryKey"], key);
    assert!(body["authentication"]["symmetricKey"]["secondaryKey"].is_string());

    let bad_pem = api
        .put("/devices/jwt-2")
        .json(&json!({"authentication": {"type": "jwt", "publicKeys": ["not a pem"]}}))
        .send()
        .await?;
    assert_error(bad_pem, StatusCode::BAD_REQUEST, 400004).await
}

#[tokio::test]
async fn health_and_readiness_answer_without_a_token() -> Result<()> {
    let api = Api::start().await?;
    for path in ["/healthz", "/readyz"] {
        let response = api
            .hub
            .http()
            .get(format!("{}{path}", api.hub.url()))
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    Ok(())
}
