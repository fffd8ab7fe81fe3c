//! The hub's service REST API as the simulator uses it: where the hub is
//! (endpoints.json), a service token (given, or minted by `hub token` from the data
//! dir), idempotent provisioning of the fleet, and reading the telemetry stream back.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::{Value, json};

/// Failures talking to the hub's service API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// endpoints.json is missing or malformed.
    #[error("cannot read {path}: {reason} (is `hub serve --data-dir` running?)")]
    Endpoints {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `hub token` could not be run or failed.
    #[error("cannot mint a service token with {bin}: {reason}")]
    Token {
        /// The hub binary.
        bin: PathBuf,
        /// Why.
        reason: String,
    },
    /// The request did not complete.
    #[error("{what}: {source}")]
    Http {
        /// The request.
        what: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// The hub answered with an unexpected status.
    #[error("{what}: HTTP {status}: {body}")]
    Status {
        /// The request.
        what: String,
        /// The status.
        status: u16,
        /// The error body.
        body: String,
    },
    /// The hub answered with a body of the wrong shape.
    #[error("{what}: unexpected answer {body}")]
    Shape {
        /// The request.
        what: String,
        /// The body.
        body: String,
    },
}

/// The addresses in a data dir's endpoints.json.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct Endpoints {
    /// The REST API.
    pub http: SocketAddr,
    /// MQTT over TCP, when the hub bound it.
    #[serde(default)]
    pub mqtt: Option<SocketAddr>,
    /// MQTT over TLS, when the hub bound it.
    #[serde(default)]
    pub mqtts: Option<SocketAddr>,
}

/// Reads `DIR/endpoints.json`.
pub fn read_endpoints(data_dir: &Path) -> Result<Endpoints, ApiError> {
    let path = data_dir.join("endpoints.json");
    let fail = |reason: String| ApiError::Endpoints {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|err| fail(err.to_string()))?;
    serde_json::from_str(&text).map_err(|err| fail(err.to_string()))
}

/// The `hub` binary: `explicit`, else the one beside this executable, else `hub`
/// on PATH.
pub fn hub_binary(explicit: Option<&Path>) -> PathBuf {
    if let Some(path) = explicit {
        return path.to_path_buf();
    }
    let beside = std::env::current_exe().ok().and_then(|exe| {
        let candidate = exe
            .parent()?
            .join(format!("hub{}", std::env::consts::EXE_SUFFIX));
        candidate.exists().then_some(candidate)
    });
    beside.unwrap_or_else(|| PathBuf::from("hub"))
}

/// Mints a one-hour owner token with `hub token --data-dir DIR` (the hub's key format
/// stays the hub's business: the simulator does not link the hub crate).
/// `scopes` is a comma-separated list (`registry:read,…`).
pub async fn mint_token(hub_bin: &Path, data_dir: &Path, scopes: &str) -> Result<String, ApiError> {
    let fail = |reason: String| ApiError::Token {
        bin: hub_bin.to_path_buf(),
        reason,
    };
    let output = tokio::process::Command::new(hub_bin)
        .arg("token")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--scope", scopes])
        .args(["--ttl", "86400"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|err| fail(err.to_string()))?;
    if !output.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    let token = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if token.is_empty() {
        return Err(fail("it printed no token".into()));
    }
    Ok(token)
}

/// A device's credentials, as provisioning found or made them.
#[derive(Debug, Clone)]
pub struct DeviceCredentials {
    /// The device id.
    pub id: String,
    /// The primary SAS key (base64).
    pub key: String,
}

/// One partition's offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffsets {
    /// The partition id.
    pub id: u64,
    /// The last offset written, −1 when empty.
    pub last: i64,
}

/// A client of the service API.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    token: Arc<str>,
    http: reqwest::Client,
}

/// How many provisioning requests run at once: enough to hide the round trip,
/// few enough not to compete with the devices for the hub.
const PROVISION_CONCURRENCY: usize = 32;

impl Api {
    /// A client of the API at `base` (`http://host:port`).
    pub fn new(base: &str, token: String) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.into(),
            http: reqwest::Client::new(),
        }
    }

    /// The API's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn request(
        &self,
        what: String,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, Value), ApiError> {
        let response = request
            .bearer_auth(&*self.token)
            .send()
            .await
            .map_err(|source| ApiError::Http {
                what: what.clone(),
                source,
            })?;
        let status = response.status().as_u16();
        let body = response.text().await.map_err(|source| ApiError::Http {
            what: what.clone(),
            source,
        })?;
        let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
        Ok((status, value))
    }

    /// `GET url`'s body; a status other than 2xx is [`ApiError::Status`].
    async fn get_ok(&self, what: String, url: &str) -> Result<Value, ApiError> {
        let (status, body) = self.request(what.clone(), self.http.get(url)).await?;
        if !(200..=299).contains(&status) {
            return Err(ApiError::Status {
                what,
                status,
                body: body.to_string(),
            });
        }
        Ok(body)
    }

    /// Creates the device, or reads it when it exists; returns its primary key.
    pub async fn ensure_device(&self, id: &str) -> Result<DeviceCredentials, ApiError> {
        self.ensure_device_as(id, false).await
    }

    /// [`Api::ensure_device`]; with `x509` the device authenticates with a certificate
    /// from the hub's CA (`certificateAuthority`) and the key returned is empty.
    pub async fn ensure_device_as(
        &self,
        id: &str,
        x509: bool,
    ) -> Result<DeviceCredentials, ApiError> {
        let url = format!("{}/devices/{id}", self.base);
        let what = format!("PUT /devices/{id}");
        let create = if x509 {
            json!({"authentication": {"type": "certificateAuthority"}})
        } else {
            json!({})
        };
        let (status, body) = self
            .request(what.clone(), self.http.put(&url).json(&create))
            .await?;
        let (what, body) = match status {
            200..=299 => (what, body),
            409 => {
                let what = format!("GET /devices/{id}");
                let body = self.get_ok(what.clone(), &url).await?;
                (what, body)
            }
            _ => {
                return Err(ApiError::Status {
                    what,
                    status,
                    body: body.to_string(),
                });
            }
        };
        if x509 {
            return match body["authentication"]["type"].as_str() {
                Some("certificateAuthority") => Ok(DeviceCredentials {
                    id: id.to_string(),
                    key: String::new(),
                }),
                _ => Err(ApiError::Shape {
                    what: format!("{what} (an existing device that is not certificateAuthority?)"),
                    body: body.to_string(),
                }),
            };
        }
        match body["authentication"]["symmetricKey"]["primaryKey"].as_str() {
            Some(key) => Ok(DeviceCredentials {
                id: id.to_string(),
                key: key.to_string(),
            }),
            None => Err(ApiError::Shape {
                what: format!("{what} (an existing device without a SAS key?)"),
                body: body.to_string(),
            }),
        }
    }

    /// Provisions every id (a few requests at a time), in order.
    pub async fn provision(&self, ids: Vec<String>) -> Result<Vec<DeviceCredentials>, ApiError> {
        self.provision_as(ids.into_iter().map(|id| (id, false)).collect())
            .await
    }

    /// The primary key of the symmetric-key enrollment group `name` (provisioning
    /// service API; the token needs `provisioning:read`).
    pub async fn enrollment_group_key(&self, name: &str) -> Result<String, ApiError> {
        let url = format!(
            "{}/enrollmentGroups/{name}?api-version=2021-10-01",
            self.base
        );
        let what = format!("GET /enrollmentGroups/{name}");
        let body = self.get_ok(what.clone(), &url).await?;
        match body["attestation"]["symmetricKey"]["primaryKey"].as_str() {
            Some(key) => Ok(key.to_string()),
            None => Err(ApiError::Shape {
                what: format!("{what} (not a symmetric-key group?)"),
                body: body.to_string(),
            }),
        }
    }

    /// Provisions every `(id, x509)` (see [`Api::ensure_device_as`]), in order.
    pub async fn provision_as(
        &self,
        ids: Vec<(String, bool)>,
    ) -> Result<Vec<DeviceCredentials>, ApiError> {
        futures_util::stream::iter(ids)
            .map(|(id, x509)| async move { self.ensure_device_as(&id, x509).await })
            .buffered(PROVISION_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// Invokes direct method `name` on `device` (`POST /twins/{id}/methods`): the
    /// status the device answered with and its payload.
    pub async fn invoke_method(
        &self,
        device: &str,
        name: &str,
        payload: &Value,
        timeout_secs: u64,
    ) -> Result<(u16, Value), ApiError> {
        let what = format!("POST /twins/{device}/methods");
        let url = format!("{}/twins/{device}/methods", self.base);
        let body = json!({
            "methodName": name,
            "payload": payload,
            "responseTimeoutInSeconds": timeout_secs,
        });
        let (status, body) = self
            .request(what.clone(), self.http.post(url).json(&body))
            .await?;
        if !(200..=299).contains(&status) {
            return Err(ApiError::Status {
                what,
                status,
                body: body.to_string(),
            });
        }
        match body["status"].as_u64().and_then(|s| u16::try_from(s).ok()) {
            Some(answered) => Ok((answered, body["payload"].clone())),
            None => Err(ApiError::Shape {
                what,
                body: body.to_string(),
            }),
        }
    }

    /// Every partition's last offset.
    pub async fn partitions(&self) -> Result<Vec<PartitionOffsets>, ApiError> {
        let what = "GET /streams/telemetry".to_string();
        let url = format!("{}/streams/telemetry", self.base);
        let body = self.get_ok(what.clone(), &url).await?;
        let shape = || ApiError::Shape {
            what: what.clone(),
            body: body.to_string(),
        };
        body["partitions"]
            .as_array()
            .ok_or_else(shape)?
            .iter()
            .map(|p| {
                Ok(PartitionOffsets {
                    id: p["id"].as_u64().ok_or_else(shape)?,
                    last: p["lastOffset"].as_i64().ok_or_else(shape)?,
                })
            })
            .collect()
    }

    /// Up to 1,000 messages of `partition` from offset `from` (inclusive), and the
    /// offset to read next. Offsets may be sparse (cluster mode): callers follow
    /// `nextOffset`, never `from + count`.
    pub async fn read(&self, partition: u64, from: u64) -> Result<(Vec<Value>, u64), ApiError> {
        let what = format!("GET /streams/telemetry/partitions/{partition}/messages?from={from}");
        let url = format!(
            "{}/streams/telemetry/partitions/{partition}/messages?from={from}&max=1000",
            self.base
        );
        let (status, mut body) = self.request(what.clone(), self.http.get(url)).await?;
        if !(200..=299).contains(&status) {
            return Err(ApiError::Status {
                what,
                status,
                body: body.to_string(),
            });
        }
        let next = body["nextOffset"].as_u64();
        match (body.get_mut("messages").map(Value::take), next) {
            (Some(Value::Array(messages)), Some(next)) => Ok((messages, next)),
            _ => Err(ApiError::Shape {
                what,
                body: body.to_string(),
            }),
        }
    }
}
