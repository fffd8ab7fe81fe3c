//! A small REST client for the CLI: finds the hub, mints a short-lived token, and
//! turns the API's JSON errors into readable messages.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hub::auth::service::{Scope, ServiceKey};
use hub::data_dir::{self, Endpoints};
use reqwest::{Method, RequestBuilder, Response};

use super::Target;

/// Lifetime of the tokens the CLI mints for itself.
const CLI_TOKEN_TTL: Duration = Duration::from_secs(300);
/// A token older than this is replaced before the next request, so a long-running
/// command (`hub tail`) never sends one that is about to expire.
const CLI_TOKEN_RENEW_AFTER: Duration = Duration::from_secs(150);
/// Timeout of an ordinary request (long-polls ask the hub for at most 30 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// What `hub invoke` waits beyond the method's own timeouts: the hub answers 404103 or
/// 504101 itself when those pass, and the answer must still reach the CLI.
const INVOKE_MARGIN: Duration = Duration::from_secs(10);

/// The client timeout of a direct-method call that may wait `connect_timeout` seconds
/// for the device to come online and then `response_timeout` seconds for its answer.
pub fn invoke_timeout(connect_timeout_secs: u64, response_timeout_secs: u64) -> Duration {
    Duration::from_secs(connect_timeout_secs.saturating_add(response_timeout_secs))
        .saturating_add(INVOKE_MARGIN)
}

/// An authorized client of one hub's REST API.
pub struct ApiClient {
    base: String,
    key: ServiceKey,
    scopes: Vec<Scope>,
    /// The current token and when it was minted.
    token: Mutex<(String, Instant)>,
    http: reqwest::Client,
}

impl ApiClient {
    /// Resolves the hub's address and mints a token with `scopes`.
    pub fn connect(target: &Target, scopes: &[Scope]) -> Result<Self> {
        let base = match &target.url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                let endpoints = Endpoints::read(&target.data_dir).with_context(|| {
                    format!(
                        "is a hub running on {}? (or pass --url)",
                        target.data_dir.display()
                    )
                })?;
                format!("http://{}", endpoints.http)
            }
        };
        let key = ServiceKey::load(&data_dir::service_key_path(&target.data_dir))?;
        let token = key.mint("cli", scopes, CLI_TOKEN_TTL)?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            base,
            key,
            scopes: scopes.to_vec(),
            token: Mutex::new((token, Instant::now())),
            http,
        })
    }

    /// A request to `path` (already percent-encoded), authorized with a token that
    /// has at least half its lifetime left.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token_at(Instant::now()))
    }

    /// The token to send at `now`, minting a new one when the current one is older
    /// than [`CLI_TOKEN_RENEW_AFTER`].
    fn token_at(&self, now: Instant) -> String {
        let mut current = match self.token.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if now.saturating_duration_since(current.1) >= CLI_TOKEN_RENEW_AFTER {
            match self.key.mint("cli", &self.scopes, CLI_TOKEN_TTL) {
                Ok(token) => *current = (token, now),
                // Keep the old token: the hub's 401 then says what went wrong.
                Err(err) => eprintln!("cannot renew the CLI token: {err}"),
            }
        }
        current.0.clone()
    }

    /// Sends `request`; a non-success status becomes an error carrying the API's
    /// `errorCode` and message.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the hub at {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        match (
            body.get("errorCode"),
            body.get("message").and_then(|m| m.as_str()),
        ) {
            (Some(code), Some(message)) => bail!("{status} (errorCode {code}): {message}"),
            _ => bail!("{status}"),
        }
    }
}

impl ApiClient {
    /// Sends the request `build` makes for each page, following `x-ms-continuation`
    /// until the last page; returns every item of every page.
    pub async fn all_pages(
        &self,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Vec<serde_json::Value>> {
        let mut all = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut request = build();
            if let Some(token) = &continuation {
                request = request.header("x-ms-continuation", token);
            }
            let response = self.send(request).await?;
            continuation = response
                .headers()
                .get("x-ms-continuation")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let page: Vec<serde_json::Value> = response.json().await?;
            all.extend(page);
            if continuation.is_none() {
                return Ok(all);
            }
        }
    }
}

/// Percent-encodes a device id for use as one path segment.
pub fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_renewed_before_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("service.key");
        let key = ServiceKey::load_or_create(&path).unwrap();
        let client = ApiClient {
            base: "http://127.0.0.1:1".into(),
            scopes: vec![Scope::ServiceConnect],
            token: Mutex::new(("old".into(), Instant::now())),
            key: ServiceKey::load(&path).unwrap(),
            http: reqwest::Client::new(),
        };
        let start = client.token.lock().unwrap().1;
        assert_eq!(client.token_at(start + Duration::from_secs(149)), "old");
        // Well inside the 5-minute lifetime, so a long `hub tail` never sends an
        // expired one.
        let renewed = client.token_at(start + Duration::from_secs(150));
        assert_ne!(renewed, "old");
        assert!(key.verify(&renewed).is_ok(), "a valid token");
        assert_eq!(client.token_at(start + Duration::from_secs(200)), renewed);
        assert!(CLI_TOKEN_RENEW_AFTER < CLI_TOKEN_TTL);
    }

    #[test]
    fn invoke_waits_longer_than_both_method_timeouts() {
        assert_eq!(invoke_timeout(0, 30), Duration::from_secs(40));
        assert_eq!(invoke_timeout(300, 300), Duration::from_secs(610));
        assert!(invoke_timeout(0, 30) > REQUEST_TIMEOUT);
        assert_eq!(invoke_timeout(u64::MAX, 1), Duration::MAX, "no overflow");
    }

    #[test]
    fn ids_are_escaped_into_one_segment() {
        assert_eq!(path_segment("a/b?c#d%e"), "a%2Fb%3Fc%23d%25e");
        assert_eq!(path_segment("plain-id_1.x"), "plain-id_1.x");
    }
}
