//! What Azure's service SDKs send and expect, checked at the REST level against a real
//! hub (issue 16): keys generated for empty ones, `GET /devices/` with `top` and up to
//! 1000 in one answer, the bulk `POST /devices` (≤ 100, importMode, Azure's result
//! shape), query answers with `x-ms-item-type` and clamped page sizes, Azure's error
//! fields, the twin's registry fields, `api-version`, `GET /statistics/devices` and
//! feedback abandon.

use anyhow::Result;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hub_tests::Hub;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};

const API: &str = "api-version=2021-04-12";

struct Api {
    hub: Hub,
    token: String,
}

impl Api {
    async fn start(dir: &std::path::Path) -> Result<Self> {
        let hub = Hub::start(dir).await?;
        let token = hub.owner_token().await?;
        Ok(Self { hub, token })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.hub
            .http()
            .request(method, format!("{}{path}{sep}{API}", self.hub.url()))
            .bearer_auth(&self.token)
    }

    async fn bulk(&self, entries: Value) -> Result<(StatusCode, Value)> {
        let response = self
            .request(Method::POST, "/devices")
            .json(&entries)
            .send()
            .await?;
        let status = response.status();
        Ok((status, response.json().await?))
    }
}

fn creates(prefix: &str, range: std::ops::Range<usize>) -> Value {
    Value::Array(
        range
            .map(|n| json!({"id": format!("{prefix}{n:03}"), "importMode": "create"}))
            .collect(),
    )
}

#[tokio::test]
async fn empty_keys_are_generated_and_the_list_answers_up_to_1000_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::start(dir.path()).await?;

    // Node's registry.create sends empty keys for "generate them".
    let created = api
        .request(Method::PUT, "/devices/gen")
        .json(&json!({"deviceId": "gen", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": ""}}}))
        .send()
        .await?;
    assert_eq!(created.status(), StatusCode::OK);
    let created: Value = created.json().await?;
    let keys = &created["authentication"]["symmetricKey"];
    for slot in ["primaryKey", "secondaryKey"] {
        let key = keys[slot].as_str().unwrap_or_default();
        assert_eq!(STANDARD.decode(key)?.len(), 32, "{slot}: {key}");
    }
    assert_ne!(keys["primaryKey"], keys["secondaryKey"]);

    // 150 devices: more than the old page of 100.
    for range in [0..100, 100..149] {
        let (status, body) = api.bulk(creates("d", range)).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Without paging headers, everything up to 1000 in one array (the SDK path has a
    // trailing slash).
    for path in ["/devices/", "/devices"] {
        let response = api.request(Method::GET, path).send().await?;
        assert_eq!(response.status(), StatusCode::OK);
        let devices: Vec<Value> = response.json().await?;
        assert_eq!(devices.len(), 150, "{path}");
    }
    // top=N answers N; out of 1..=1000 is refused.
    let response = api.request(Method::GET, "/devices?top=7").send().await?;
    let devices: Vec<Value> = response.json().await?;
    assert_eq!(devices.len(), 7);
    for bad in ["0", "1001", "x"] {
        let response = api
            .request(Method::GET, &format!("/devices?top={bad}"))
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "top={bad}");
    }
    // Asking for paging still pages.
    let response = api
        .request(Method::GET, "/devices")
        .header("x-ms-max-item-count", "100")
        .send()
        .await?;
    assert!(response.headers().contains_key("x-ms-continuation"));
    let devices: Vec<Value> = response.json().await?;
    assert_eq!(devices.len(), 100);

    // Registry statistics.
    let disabled = api
        .request(Method::PUT, "/devices/d000")
        .header("if-match", "\"*\"")
        .json(&json!({"status": "disabled"}))
        .send()
        .await?;
    assert_eq!(disabled.status(), StatusCode::OK);
    let stats: Value = api
        .request(Method::GET, "/statistics/devices")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        stats,
        json!({"totalDeviceCount": 150, "enabledDeviceCount": 149, "disabledDeviceCount": 1})
    );
    api.hub.stop().await?;
    Ok(())
}

#[tokio::test]
async fn bulk_operations_follow_azures_modes_bounds_and_result_shape() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::start(dir.path()).await?;

    // Bounds: 1 to 100 entries.
    for entries in [creates("b", 0..101), json!([])] {
        let (status, body) = api.bulk(entries).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["errorCode"], json!(400004));
    }
    let (status, body) = api.bulk(creates("b", 0..100)).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"isSuccessful": true, "errors": [], "warnings": []})
    );

    // Create with tags and desired properties; they land in the twin.
    let (status, body) = api
        .bulk(
            json!([{"id": "t1", "importMode": "create", "status": "disabled",
            "tags": {"site": "oslo"}, "properties": {"desired": {"rate": 5}}}]),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let twin: Value = api
        .request(Method::GET, "/twins/t1")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(twin["tags"], json!({"site": "oslo"}));
    assert_eq!(twin["properties"]["desired"]["rate"], json!(5));
    assert_eq!(twin["status"], json!("disabled"));

    // A mixed batch: each entry on its own, errors listed per device, 400.
    let b001: Value = api
        .request(Method::GET, "/devices/b001")
        .send()
        .await?
        .json()
        .await?;
    let (status, body) = api
        .bulk(json!([
            {"id": "b000", "importMode": "create"},
            {"id": "new1", "importMode": "create"},
            {"id": "b001", "importMode": "UpdateIfMatchETag", "eTag": "stale", "status": "disabled"},
            {"id": "b002", "importMode": "Update", "status": "disabled"},
            {"id": "b003", "importMode": "DeleteIfMatchETag", "eTag": "stale"},
            {"id": "b004", "importMode": "Delete"},
            {"id": "ghost", "importMode": "Delete"},
            {"id": "b005", "importMode": "updateTwin"},
            {"id": "bad id/", "importMode": "create"},
        ]))
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["isSuccessful"], json!(false));
    assert_eq!(body["warnings"], json!([]));
    let errors: Vec<(String, String)> = body["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    assert!(
                        e["errorStatus"].as_str().is_some_and(|s| !s.is_empty()),
                        "{e}"
                    );
                    (
                        e["deviceId"].as_str().unwrap_or_default().to_string(),
                        e["errorCode"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let expected: Vec<(String, String)> = [
        ("b000", "DeviceAlreadyExists"),
        ("b001", "PreconditionFailed"),
        ("b003", "PreconditionFailed"),
        ("ghost", "DeviceNotFound"),
        ("b005", "ArgumentInvalid"),
        ("bad id/", "ArgumentInvalid"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(errors, expected);
    let status_of = |id: &'static str| {
        let request = api.request(Method::GET, &format!("/devices/{id}"));
        async move {
            let response = request.send().await?;
            let code = response.status();
            let body: Value = response.json().await?;
            anyhow::Ok((code, body["status"].clone()))
        }
    };
    assert_eq!(status_of("new1").await?, (StatusCode::OK, json!("enabled")));
    assert_eq!(status_of("b001").await?, (StatusCode::OK, json!("enabled")));
    assert_eq!(
        status_of("b002").await?,
        (StatusCode::OK, json!("disabled"))
    );
    assert_eq!(status_of("b003").await?.0, StatusCode::OK);
    assert_eq!(status_of("b004").await?.0, StatusCode::NOT_FOUND);

    // The matching etag applies.
    let (status, body) = api
        .bulk(json!([
            // `etag` as the Node SDK's updateDevices passes it, for Azure's `eTag`.
            {"id": "b001", "importMode": "updateIfMatchETag", "etag": b001["etag"], "status": "disabled"},
        ]))
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(status_of("b001").await?.1, json!("disabled"));
    api.hub.stop().await?;
    Ok(())
}

#[tokio::test]
async fn queries_errors_and_twins_carry_what_the_sdks_read() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::start(dir.path()).await?;
    let (status, _) = api.bulk(creates("q", 0..30)).await?;
    assert_eq!(status, StatusCode::OK);

    // Item type; a page size above 1000 is clamped, not refused; STARTSWITH.
    let response = api
        .request(Method::POST, "/devices/query")
        .header("x-ms-max-item-count", "5000")
        .json(&json!({"query": "SELECT * FROM devices WHERE STARTSWITH(deviceId, 'q01')"}))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-ms-item-type"], "twin");
    let twins: Vec<Value> = response.json().await?;
    assert_eq!(twins.len(), 10);
    let response = api
        .request(Method::POST, "/devices/query")
        .json(&json!({"query": "SELECT COUNT() AS n FROM devices WHERE ENDSWITH(deviceId, '7') AND IS_STRING(deviceId)"}))
        .send()
        .await?;
    assert_eq!(response.headers()["x-ms-item-type"], "raw");
    let rows: Value = response.json().await?;
    assert_eq!(rows, json!([{"n": 3}]));
    let refused = api
        .request(Method::POST, "/devices/query")
        .header("x-ms-max-item-count", "0")
        .json(&json!({"query": "SELECT * FROM devices"}))
        .send()
        .await?;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);

    // Twins carry Azure's registry fields.
    let sent = api
        .request(Method::POST, "/devices/q000/messages/deviceBound")
        .json(&json!({"body": "hi"}))
        .send()
        .await?;
    assert_eq!(sent.status(), StatusCode::ACCEPTED);
    let twin: Value = api
        .request(Method::GET, "/twins/q000")
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(twin["authenticationType"], json!("sas"));
    assert_eq!(
        twin["x509Thumbprint"],
        json!({"primaryThumbprint": null, "secondaryThumbprint": null})
    );
    assert_eq!(twin["cloudToDeviceMessageCount"], json!(1));
    assert!(
        twin["statusUpdateTime"]
            .as_str()
            .is_some_and(|t| t.contains('T'))
    );
    assert_eq!(twin["modelId"], json!(""));
    assert_eq!(twin["capabilities"], json!({"iotEdge": false}));
    let queried: Vec<Value> = api
        .request(Method::POST, "/devices/query")
        .json(&json!({"query": "SELECT * FROM devices WHERE deviceId = 'q000' AND authenticationType = 'sas'"}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(queried.len(), 1);
    assert_eq!(queried[0]["cloudToDeviceMessageCount"], json!(1));

    // Errors: the hub's fields and Azure's, and the header.
    let missing = api.request(Method::GET, "/devices/nobody").send().await?;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(missing.headers()["iothub-errorcode"], "DeviceNotFound");
    let body: Value = missing.json().await?;
    assert_eq!(body["errorCode"], json!(404001));
    assert_eq!(body["message"], json!("device nobody not found"));
    assert_eq!(
        body["Message"],
        json!("ErrorCode:DeviceNotFound;device nobody not found")
    );
    assert_eq!(body["ExceptionMessage"], json!("device nobody not found"));
    let unauthorized = api
        .hub
        .http()
        .get(format!("{}/devices/q000?{API}", api.hub.url()))
        .send()
        .await?;
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        unauthorized.headers()["iothub-errorcode"],
        "IotHubUnauthorizedAccess"
    );
    api.hub.stop().await?;
    Ok(())
}

#[tokio::test]
async fn abandoned_feedback_is_offered_again_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let api = Api::start(dir.path()).await?;
    let (status, _) = api.bulk(creates("f", 0..1)).await?;
    assert_eq!(status, StatusCode::OK);
    let sent = api
        .request(Method::POST, "/devices/f000/messages/deviceBound")
        .json(&json!({"body": "x", "messageId": "m1", "ack": "full"}))
        .send()
        .await?;
    assert_eq!(sent.status(), StatusCode::ACCEPTED);
    // Purging writes Purged feedback for a message that asked for it.
    let purged = api
        .request(Method::DELETE, "/devices/f000/commands")
        .send()
        .await?;
    assert!(purged.status().is_success());

    let receive = || {
        api.request(Method::GET, "/messages/serviceBound/feedback?waitMs=5000")
            .send()
    };
    let first: Value = receive().await?.json().await?;
    assert_eq!(first["records"][0]["originalMessageId"], json!("m1"));
    let token = first["lockToken"].as_str().unwrap_or_default().to_string();
    // Locked: nothing else to offer right now.
    let none = api
        .request(Method::GET, "/messages/serviceBound/feedback?waitMs=0")
        .send()
        .await?;
    assert_eq!(none.status(), StatusCode::NO_CONTENT);

    let abandoned = api
        .request(
            Method::POST,
            &format!("/messages/serviceBound/feedback/{token}/abandon"),
        )
        .send()
        .await?;
    assert_eq!(abandoned.status(), StatusCode::NO_CONTENT);
    // Offered again at once, not after the 60 s lock.
    let again = api
        .request(Method::GET, "/messages/serviceBound/feedback?waitMs=0")
        .send()
        .await?;
    assert_eq!(again.status(), StatusCode::OK);
    let again: Value = again.json().await?;
    assert_eq!(again["records"], first["records"]);
    let second = again["lockToken"].as_str().unwrap_or_default().to_string();
    assert_ne!(second, token);
    // The abandoned token is spent.
    let stale = api
        .request(
            Method::POST,
            &format!("/messages/serviceBound/feedback/{token}/abandon"),
        )
        .send()
        .await?;
    assert_eq!(stale.status(), StatusCode::BAD_REQUEST);
    let completed = api
        .request(
            Method::DELETE,
            &format!("/messages/serviceBound/feedback/{second}"),
        )
        .send()
        .await?;
    assert_eq!(completed.status(), StatusCode::NO_CONTENT);
    api.hub.stop().await?;
    Ok(())
}
