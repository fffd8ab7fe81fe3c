//! A small REST client for the CLI: finds the hub, mints a short-lived token, and
//! turns the API's JSON errors into readable messages.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use hub::auth::service::{Scope, ServiceKey};
use hub::data_dir::{self, Endpoints};
use reqwest::{Method, RequestBuilder, Response};

use super::Target;

/// Lifetime of the tokens the CLI mints for itself.
const CLI_TOKEN_TTL: Duration = Duration::from_secs(300);

/// An authorized client of one hub's REST API.
pub struct ApiClient {
    base: String,
    token: String,
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
            .timeout(Duration::from_secs(30))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self { base, token, http })
    }

    /// A request to `path` (already percent-encoded), authorized.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
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
    fn ids_are_escaped_into_one_segment() {
        assert_eq!(path_segment("a/b?c#d%e"), "a%2Fb%3Fc%23d%25e");
        assert_eq!(path_segment("plain-id_1.x"), "plain-id_1.x");
    }
}
