//! `POST /devices/query` over a few hundred twins against the real binary: filters,
//! projections, TOP, COUNT, GROUP BY, registry fields, paging with continuation
//! tokens, and malformed queries refused with 400 naming the position.

use anyhow::{Context, Result};
use hub_tests::Hub;
use reqwest::StatusCode;
use serde_json::{Value, json};

const DEVICES: usize = 300;

struct Api {
    hub: Hub,
    token: String,
}

impl Api {
    async fn query(
        &self,
        query: &str,
        page: Option<usize>,
        continuation: Option<&str>,
    ) -> Result<(StatusCode, Value, Option<String>)> {
        let mut request = self
            .hub
            .http()
            .post(format!("{}/devices/query", self.hub.url()))
            .bearer_auth(&self.token)
            .json(&json!({ "query": query }));
        if let Some(page) = page {
            request = request.header("x-ms-max-item-count", page.to_string());
        }
        if let Some(token) = continuation {
            request = request.header("x-ms-continuation", token);
        }
        let response = request.send().await?;
        let status = response.status();
        let next = response
            .headers()
            .get("x-ms-continuation")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((status, response.json().await?, next))
    }

    async fn all(&self, query: &str, page: usize) -> Result<(Vec<Value>, usize)> {
        let mut items = Vec::new();
        let mut continuation: Option<String> = None;
        let mut pages = 0;
        loop {
            let (status, body, next) = self
                .query(query, Some(page), continuation.as_deref())
                .await?;
            anyhow::ensure!(status == StatusCode::OK, "{query}: {status} {body}");
            items.extend(body.as_array().context("array")?.iter().cloned());
            pages += 1;
            match next {
                Some(next) => continuation = Some(next),
                None => return Ok((items, pages)),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_filter_project_count_group_and_page() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub.owner_token().await?;
    let api = Api { hub, token };
    let sites = ["oslo", "bergen", "tromso"];
    let http = api.hub.http().clone();
    let base = api.hub.url();
    let mut tasks = Vec::new();
    for chunk in (0..DEVICES).collect::<Vec<_>>().chunks(DEVICES / 6) {
        let (http, base, token, chunk) = (
            http.clone(),
            base.clone(),
            api.token.clone(),
            chunk.to_vec(),
        );
        tasks.push(tokio::spawn(async move {
            for i in chunk {
                let id = format!("dev-{i:03}");
                let created = http
                    .put(format!("{base}/devices/{id}"))
                    .bearer_auth(&token)
                    .json(&json!({}))
                    .send()
                    .await?;
                anyhow::ensure!(created.status() == StatusCode::OK);
                let patch = json!({
                    "tags": {"site": sites[i % 3], "floor": i % 10},
                    "properties": {"desired": {"interval": if i % 2 == 0 { 30 } else { 60 }}}
                });
                let patched = http
                    .patch(format!("{base}/twins/{id}"))
                    .bearer_auth(&token)
                    .json(&patch)
                    .send()
                    .await?;
                anyhow::ensure!(patched.status() == StatusCode::OK);
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }

    let (oslo, pages) = api
        .all("SELECT * FROM devices WHERE tags.site = 'oslo'", 30)
        .await?;
    assert_eq!(oslo.len(), 100);
    assert_eq!(pages, 4);
    assert!(oslo.iter().all(
        |t| t["tags"]["site"] == "oslo" && t["properties"]["desired"]["$metadata"].is_object()
    ));
    let ids: Vec<&str> = oslo.iter().filter_map(|t| t["deviceId"].as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 100, "no duplicates across pages");

    let (_, count, _) = api.query("SELECT COUNT() AS n FROM devices WHERE tags.floor >= 5 AND properties.desired.interval = 30", None, None).await?;
    assert_eq!(
        count,
        json!([{"n": 60}]),
        "floors 6 and 8 of the even devices"
    );

    let (groups, _) = api
        .all(
            "SELECT tags.site AS site, COUNT() AS n FROM devices GROUP BY tags.site",
            100,
        )
        .await?;
    let mut groups: Vec<(String, u64)> = groups
        .iter()
        .map(|g| {
            (
                g["site"].as_str().unwrap_or("").to_string(),
                g["n"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    groups.sort();
    assert_eq!(
        groups,
        [
            ("bergen".to_string(), 100),
            ("oslo".to_string(), 100),
            ("tromso".to_string(), 100)
        ]
    );

    let (top, _) = api.all("SELECT TOP 7 deviceId, tags.floor FROM devices WHERE tags.site IN ['bergen', 'tromso']", 5).await?;
    assert_eq!(top.len(), 7);
    assert!(
        top.iter()
            .all(|row| row.as_object().is_some_and(|o| o.len() == 2) && row["floor"].is_number())
    );

    let (nin, _) = api
        .all(
            "SELECT deviceId FROM devices WHERE tags.site NIN ['oslo'] AND tags.floor < 1",
            100,
        )
        .await?;
    assert_eq!(nin.len(), 20);

    // Registry fields: a fresh device has no tags; a disabled one is found by status.
    api.hub
        .http()
        .put(format!("{}/devices/bare", api.hub.url()))
        .bearer_auth(&api.token)
        .json(&json!({"status": "disabled"}))
        .send()
        .await?;
    let (bare, _) = api
        .all(
            "SELECT deviceId FROM devices WHERE NOT IS_DEFINED(tags.site)",
            100,
        )
        .await?;
    assert_eq!(bare, vec![json!({"deviceId": "bare"})]);
    let (disabled, _) = api
        .all(
            "SELECT deviceId, status FROM devices WHERE status = 'disabled'",
            100,
        )
        .await?;
    assert_eq!(
        disabled,
        vec![json!({"deviceId": "bare", "status": "disabled"})]
    );

    for (query, fragment) in [
        ("SELECT * FROM devices WHERE tags.site = ", "position 40"),
        (
            "SELECT * FROM devices WHERE tags.site = 'oslo",
            "unterminated",
        ),
        ("SELECT * FROM gadgets", "position 14"),
        ("DELETE FROM devices", "position 0"),
    ] {
        let (status, body, _) = api.query(query, None, None).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(body["errorCode"], 400004);
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains(fragment)),
            "{query}: {body}"
        );
    }
    let (status, _, _) = api.query("SELECT * FROM devices", Some(0), None).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = api
        .query("SELECT * FROM devices", None, Some("bogus"))
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    Ok(())
}

/// Hostile queries (deep nesting, long NOT and AND chains, all well under the body
/// limit) used to overflow a worker's stack and abort the hub. Each now gets a 400
/// naming the position, and the hub keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_queries_get_a_400_and_the_hub_keeps_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Hub::start(dir.path()).await?;
    let token = hub.token("registry:read").await?;
    let api = Api { hub, token };
    let prefix = "SELECT * FROM devices WHERE ";
    let and_chain = vec!["tags.a = 1"; 4_000].join(" AND ");
    let hostile = [
        (
            format!(
                "{prefix}{}tags.a = 1{}",
                "(".repeat(20_000),
                ")".repeat(20_000)
            ),
            "nested too deeply",
        ),
        (
            format!("{prefix}{}tags.a = 1", "NOT ".repeat(10_000)),
            "nested too deeply",
        ),
        (format!("{prefix}{and_chain}"), "too many terms"),
        (
            format!("{prefix}tags.a = '{}'", "x".repeat(200_000)),
            "query too long",
        ),
    ];
    for (query, fragment) in &hostile {
        let (status, body, _) = api.query(query, None, None).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{fragment}: {body}");
        assert_eq!(body["errorCode"], 400004);
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(fragment) && message.contains("position"),
            "{body}"
        );
    }
    let health = api
        .hub
        .http()
        .get(format!("{}/healthz", api.hub.url()))
        .send()
        .await?;
    assert_eq!(health.status(), StatusCode::OK);
    let (status, body, _) = api
        .query("SELECT COUNT() AS n FROM devices", None, None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!([{"n": 0}]));
    Ok(())
}
