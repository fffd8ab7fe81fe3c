//! The routing configuration in Azure's JSON (the IoT Hub resource's
//! `properties.routing`) with the hub's endpoint kinds, and its validation: every
//! error names the JSON path of what is wrong (`routes[2].endpointNames[0]`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::condition::Condition;

/// The built-in endpoint: the telemetry stream every message lands in anyway.
pub const BUILT_IN_ENDPOINT: &str = "events";
/// Names the hub's own streams hold, which no endpoint may take.
pub const RESERVED_NAMES: [&str; 4] = ["events", "telemetry", "device-events", "dead-letters"];
/// Most routes (Azure's limit).
pub const MAX_ROUTES: usize = 100;
/// Most custom endpoints, all kinds together (Azure's limit).
pub const MAX_ENDPOINTS: usize = 10;
/// Most enrichments (Azure's limit).
pub const MAX_ENRICHMENTS: usize = 10;
/// Most headers of a webhook.
pub const MAX_HEADERS: usize = 20;
/// Largest `maxBatchSize` of a webhook.
pub const MAX_BATCH: usize = 1000;
/// Most partitions of a named stream.
pub const MAX_STREAM_PARTITIONS: u32 = 32;

/// Why a routing configuration was refused; the message names the JSON path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Where in the JSON (`routes[0].condition`; `$` for the whole document).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn invalid<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        path: path.into(),
        message: message.into(),
    })
}

/// `properties.routing`: endpoints, routes, the fallback route and enrichments.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingConfig {
    /// The custom endpoints.
    #[serde(default)]
    pub endpoints: Endpoints,
    /// The routes.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Where device messages that match no route go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_route: Option<Route>,
    /// Application properties stamped on messages to given endpoints.
    #[serde(default)]
    pub enrichments: Vec<Enrichment>,
}

/// The custom endpoints by kind. Azure's other kinds are accepted only empty (so
/// `az iot hub show --query properties.routing` output pastes unchanged).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoints {
    /// HTTP(S) POST endpoints.
    #[serde(default)]
    pub webhooks: Vec<WebhookEndpoint>,
    /// Named partitioned streams inside the hub.
    #[serde(default)]
    pub streams: Vec<StreamEndpoint>,
    /// Subjects on NATS servers.
    #[serde(default)]
    pub nats: Vec<NatsEndpoint>,
    /// Azure Event Hubs: not served here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_hubs: Vec<Value>,
    /// Azure Service Bus queues: not served here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_bus_queues: Vec<Value>,
    /// Azure Service Bus topics: not served here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_bus_topics: Vec<Value>,
    /// Azure storage containers: not served here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage_containers: Vec<Value>,
    /// Azure Cosmos DB containers: not served here.
    #[serde(
        default,
        rename = "cosmosDBSqlContainers",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cosmos_db_sql_containers: Vec<Value>,
}

/// The event schema a webhook posts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WebhookSchema {
    /// CloudEvents 1.0, structured JSON mode.
    #[default]
    CloudEvents,
    /// Azure Event Grid's event schema (always an array).
    EventGrid,
}

/// A webhook endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookEndpoint {
    /// The endpoint's name.
    pub name: String,
    /// `http://` or `https://` URL.
    pub url: String,
    /// The event schema.
    #[serde(default)]
    pub schema: WebhookSchema,
    /// Extra request headers (an `Authorization` for the receiver, say).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Most events per POST (1: one event per POST).
    #[serde(default = "one")]
    pub max_batch_size: usize,
}

fn one() -> usize {
    1
}

/// A named stream endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamEndpoint {
    /// The stream's name (its REST path is `/streams/{name}`).
    pub name: String,
    /// Its partition count (default the telemetry stream's); fixed once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
}

/// A NATS endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsEndpoint {
    /// The endpoint's name.
    pub name: String,
    /// `nats://host:port`.
    pub url: String,
    /// The subject messages are published on.
    pub subject: String,
}

/// Where a route takes its messages from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Source {
    /// Telemetry.
    DeviceMessages,
    /// Twin changes.
    TwinChangeEvents,
    /// Devices created and deleted.
    DeviceLifecycleEvents,
    /// Devices connected and disconnected.
    DeviceConnectionStateEvents,
}

impl Source {
    /// Whether the source's messages live in the device-events stream (else in
    /// telemetry).
    pub fn is_event(self) -> bool {
        self != Source::DeviceMessages
    }
}

/// A route (also the fallback route's shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    /// The route's name.
    pub name: String,
    /// What it routes.
    pub source: Source,
    /// Azure's routing query condition (`true` when absent).
    #[serde(default = "always")]
    pub condition: String,
    /// Where matching messages go (one endpoint, as in Azure).
    pub endpoint_names: Vec<String>,
    /// Whether the route is in force.
    pub is_enabled: bool,
}

fn always() -> String {
    "true".into()
}

/// An enrichment: an application property stamped on messages to some endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Enrichment {
    /// The property's name.
    pub key: String,
    /// A static value, `$twin.…` (a path in the device twin) or `$iothubname`.
    pub value: String,
    /// The endpoints whose messages get it.
    pub endpoint_names: Vec<String>,
}

/// Parses the JSON text of a routing configuration; a type error names its path.
pub fn parse(json: &[u8]) -> Result<RoutingConfig, ConfigError> {
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let config: RoutingConfig =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
            let path = err.path().to_string();
            ConfigError {
                path: if path == "." { "$".into() } else { path },
                message: err.into_inner().to_string(),
            }
        })?;
    Ok(config)
}

fn check_name(path: &str, name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return invalid(path, "must be 1 to 64 of letters, digits, '-', '_', '.'");
    }
    Ok(())
}

impl RoutingConfig {
    /// Checks everything serde cannot: names, limits, references, URLs and
    /// conditions. Returns the endpoint names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let e = &self.endpoints;
        for (kind, list) in [
            ("eventHubs", &e.event_hubs),
            ("serviceBusQueues", &e.service_bus_queues),
            ("serviceBusTopics", &e.service_bus_topics),
            ("storageContainers", &e.storage_containers),
            ("cosmosDBSqlContainers", &e.cosmos_db_sql_containers),
        ] {
            if !list.is_empty() {
                return invalid(
                    format!("endpoints.{kind}"),
                    "Azure endpoints of this kind are not served here; use webhooks, streams or nats",
                );
            }
        }
        let count = e.webhooks.len() + e.streams.len() + e.nats.len();
        if count > MAX_ENDPOINTS {
            return invalid(
                "endpoints",
                format!("at most {MAX_ENDPOINTS} custom endpoints"),
            );
        }
        let mut names = BTreeSet::new();
        let mut name = |path: String, value: &str| -> Result<(), ConfigError> {
            check_name(&path, value)?;
            if RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(value)) {
                return invalid(
                    path,
                    format!("{value:?} is reserved for the hub's own streams"),
                );
            }
            if !names.insert(value.to_ascii_lowercase()) {
                return invalid(path, format!("another endpoint is named {value:?}"));
            }
            Ok(())
        };
        for (i, hook) in e.webhooks.iter().enumerate() {
            let at = format!("endpoints.webhooks[{i}]");
            name(format!("{at}.name"), &hook.name)?;
            let url = reqwest::Url::parse(&hook.url)
                .or_else(|err| invalid(format!("{at}.url"), err.to_string()))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return invalid(format!("{at}.url"), "must be an http:// or https:// URL");
            }
            if !(1..=MAX_BATCH).contains(&hook.max_batch_size) {
                return invalid(
                    format!("{at}.maxBatchSize"),
                    format!("must be from 1 to {MAX_BATCH}"),
                );
            }
            if hook.headers.len() > MAX_HEADERS {
                return invalid(
                    format!("{at}.headers"),
                    format!("at most {MAX_HEADERS} headers"),
                );
            }
            for (key, value) in &hook.headers {
                if reqwest::header::HeaderName::from_bytes(key.as_bytes()).is_err()
                    || reqwest::header::HeaderValue::from_str(value).is_err()
                {
                    return invalid(format!("{at}.headers.{key}"), "is not a valid HTTP header");
                }
            }
        }
        for (i, stream) in e.streams.iter().enumerate() {
            let at = format!("endpoints.streams[{i}]");
            name(format!("{at}.name"), &stream.name)?;
            if let Some(p) = stream.partitions
                && !(1..=MAX_STREAM_PARTITIONS).contains(&p)
            {
                return invalid(
                    format!("{at}.partitions"),
                    format!("must be from 1 to {MAX_STREAM_PARTITIONS}"),
                );
            }
        }
        for (i, nats) in e.nats.iter().enumerate() {
            let at = format!("endpoints.nats[{i}]");
            name(format!("{at}.name"), &nats.name)?;
            if !nats.url.starts_with("nats://") || nats.url.len() <= "nats://".len() {
                return invalid(format!("{at}.url"), "must be a nats://host:port URL");
            }
            let subject_ok = !nats.subject.is_empty()
                && nats.subject.len() <= 256
                && !nats
                    .subject
                    .chars()
                    .any(|c| c.is_whitespace() || c == '*' || c == '>')
                && !nats.subject.split('.').any(str::is_empty);
            if !subject_ok {
                return invalid(
                    format!("{at}.subject"),
                    "must be a NATS subject without wildcards or spaces",
                );
            }
        }
        let known = |n: &str| n == BUILT_IN_ENDPOINT || names.contains(&n.to_ascii_lowercase());
        if self.routes.len() > MAX_ROUTES {
            return invalid("routes", format!("at most {MAX_ROUTES} routes"));
        }
        let mut route_names = BTreeSet::new();
        let routes = self
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("routes[{i}]"), r))
            .chain(
                self.fallback_route
                    .iter()
                    .map(|r| ("fallbackRoute".to_string(), r)),
            );
        for (at, route) in routes {
            check_name(&format!("{at}.name"), route.name.trim_start_matches('$'))?;
            if at != "fallbackRoute" && !route_names.insert(route.name.to_ascii_lowercase()) {
                return invalid(
                    format!("{at}.name"),
                    format!("another route is named {:?}", route.name),
                );
            }
            if route.endpoint_names.len() != 1 {
                return invalid(
                    format!("{at}.endpointNames"),
                    "must name exactly one endpoint",
                );
            }
            for (j, endpoint) in route.endpoint_names.iter().enumerate() {
                if !known(endpoint) {
                    return invalid(
                        format!("{at}.endpointNames[{j}]"),
                        format!("no endpoint is named {endpoint:?}"),
                    );
                }
            }
            Condition::compile(&route.condition).map_err(|err| ConfigError {
                path: format!("{at}.condition"),
                message: err.to_string(),
            })?;
        }
        if let Some(fallback) = &self.fallback_route
            && fallback.source != Source::DeviceMessages
        {
            return invalid("fallbackRoute.source", "must be DeviceMessages");
        }
        if self.enrichments.len() > MAX_ENRICHMENTS {
            return invalid(
                "enrichments",
                format!("at most {MAX_ENRICHMENTS} enrichments"),
            );
        }
        for (i, enrichment) in self.enrichments.iter().enumerate() {
            let at = format!("enrichments[{i}]");
            let key_ok = !enrichment.key.is_empty()
                && enrichment.key.len() <= 128
                && !enrichment.key.starts_with('$')
                && enrichment
                    .key
                    .chars()
                    .all(|c| c.is_ascii_graphic() && !matches!(c, '&' | '=' | '/'));
            if !key_ok {
                return invalid(
                    format!("{at}.key"),
                    "must be 1 to 128 printable characters without $ at the start, &, = or /",
                );
            }
            if enrichment.value.is_empty() || enrichment.value.len() > 256 {
                return invalid(format!("{at}.value"), "must be 1 to 256 characters");
            }
            if let Some(path) = enrichment.value.strip_prefix("$twin.") {
                super::condition::twin_path(path).map_err(|message| ConfigError {
                    path: format!("{at}.value"),
                    message,
                })?;
            }
            if enrichment.endpoint_names.is_empty() {
                return invalid(format!("{at}.endpointNames"), "must name an endpoint");
            }
            for (j, endpoint) in enrichment.endpoint_names.iter().enumerate() {
                if !known(endpoint) {
                    return invalid(
                        format!("{at}.endpointNames[{j}]"),
                        format!("no endpoint is named {endpoint:?}"),
                    );
                }
            }
        }
        Ok(())
    }

    /// The custom endpoints' names, in configuration order (webhooks, streams, nats).
    pub fn endpoint_names(&self) -> Vec<String> {
        let e = &self.endpoints;
        e.webhooks
            .iter()
            .map(|w| w.name.clone())
            .chain(e.streams.iter().map(|s| s.name.clone()))
            .chain(e.nats.iter().map(|n| n.name.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(json: &str) -> ConfigError {
        let config = match parse(json.as_bytes()) {
            Ok(config) => config,
            Err(err) => return err,
        };
        config.validate().expect_err("should be refused")
    }

    const HOOK: &str = r#"{"name":"hook","url":"http://127.0.0.1:9/x"}"#;

    #[test]
    fn azures_shape_parses_with_defaults() {
        let json = format!(
            r#"{{"endpoints":{{"webhooks":[{HOOK}],"eventHubs":[],"serviceBusQueues":[],
            "serviceBusTopics":[],"storageContainers":[],"cosmosDBSqlContainers":[]}},
            "routes":[{{"name":"hot","source":"DeviceMessages","condition":"$body.temp > 30",
            "endpointNames":["hook"],"isEnabled":true}}],
            "fallbackRoute":{{"name":"$fallback","source":"DeviceMessages","condition":"true",
            "endpointNames":["events"],"isEnabled":true}},
            "enrichments":[{{"key":"site","value":"$twin.tags.site","endpointNames":["hook"]}}]}}"#
        );
        let config = parse(json.as_bytes()).unwrap();
        config.validate().unwrap();
        let hook = &config.endpoints.webhooks[0];
        assert_eq!(hook.max_batch_size, 1);
        assert_eq!(hook.schema, WebhookSchema::CloudEvents);
        assert_eq!(config.endpoint_names(), vec!["hook".to_string()]);
    }

    #[test]
    fn errors_name_the_json_path() {
        let e = error(
            r#"{"routes":[{"name":"r","source":"Nope","endpointNames":["events"],"isEnabled":true}]}"#,
        );
        assert_eq!(e.path, "routes[0].source");
        let e = error(
            r#"{"routes":[{"name":"r","source":"DeviceMessages","endpointNames":["nowhere"],"isEnabled":true}]}"#,
        );
        assert_eq!(e.path, "routes[0].endpointNames[0]");
        let e = error(
            r#"{"routes":[{"name":"r","source":"DeviceMessages","condition":"$body.x >","endpointNames":["events"],"isEnabled":true}]}"#,
        );
        assert_eq!(e.path, "routes[0].condition");
        let e = error(r#"{"endpoints":{"webhooks":[{"name":"h","url":"ftp://x/"}]}}"#);
        assert_eq!(e.path, "endpoints.webhooks[0].url");
        let e = error(&format!(
            r#"{{"endpoints":{{"webhooks":[{HOOK}],"streams":[{{"name":"HOOK"}}]}}}}"#
        ));
        assert_eq!(e.path, "endpoints.streams[0].name");
        let e = error(r#"{"endpoints":{"streams":[{"name":"telemetry"}]}}"#);
        assert_eq!(e.path, "endpoints.streams[0].name");
        let e = error(r#"{"endpoints":{"eventHubs":[{"name":"eh"}]}}"#);
        assert_eq!(e.path, "endpoints.eventHubs");
        let e = error(r#"{"routes":[],"surprise":1}"#);
        assert_eq!(e.path, "surprise");
        let e = error(r#""text""#);
        assert_eq!(e.path, "$");
        let e =
            error(r#"{"enrichments":[{"key":"k","value":"$twin.","endpointNames":["events"]}]}"#);
        assert_eq!(e.path, "enrichments[0].value");
        let e = error(
            r#"{"fallbackRoute":{"name":"$fallback","source":"TwinChangeEvents","endpointNames":["events"],"isEnabled":true}}"#,
        );
        assert_eq!(e.path, "fallbackRoute.source");
    }

    #[test]
    fn limits_are_enforced() {
        let routes: Vec<String> = (0..=MAX_ROUTES)
            .map(|i| {
                format!(
                    r#"{{"name":"r{i}","source":"DeviceMessages","endpointNames":["events"],"isEnabled":true}}"#
                )
            })
            .collect();
        let e = error(&format!(r#"{{"routes":[{}]}}"#, routes.join(",")));
        assert_eq!(e.path, "routes");
        let hooks: Vec<String> = (0..=MAX_ENDPOINTS)
            .map(|i| format!(r#"{{"name":"h{i}","url":"http://x/"}}"#))
            .collect();
        let e = error(&format!(
            r#"{{"endpoints":{{"webhooks":[{}]}}}}"#,
            hooks.join(",")
        ));
        assert_eq!(e.path, "endpoints");
        let e = error(
            r#"{"endpoints":{"webhooks":[{"name":"h","url":"http://x/","maxBatchSize":0}]}}"#,
        );
        assert_eq!(e.path, "endpoints.webhooks[0].maxBatchSize");
    }
}
