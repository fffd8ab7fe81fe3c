//! Route conditions in Azure's routing query syntax, compiled once on the twin query
//! language's expression core (same tokenizer, parser and bounds), and the row a
//! message presents to them: `$body.…` (JSON bodies), `$twin.…`, system properties
//! (`$contentType`, `$connectionDeviceId`, …) and application properties by name.

use std::cell::OnceCell;

use serde_json::{Map, Value};

use crate::telemetry::message::StoredMessage;
use crate::twins::document::TwinDocument;
use crate::twins::query::{self, Expr, MAX_PATH_SEGMENTS, QueryError, Row};

/// A compiled condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// `true` or `false`.
    Constant(bool),
    /// An expression of the query language.
    Expr(Expr),
}

impl Condition {
    /// Compiles `text`: `true`, `false`, or a query-language condition.
    pub fn compile(text: &str) -> Result<Self, QueryError> {
        let trimmed = text.trim();
        if trimmed.eq_ignore_ascii_case("true") {
            return Ok(Condition::Constant(true));
        }
        if trimmed.eq_ignore_ascii_case("false") {
            return Ok(Condition::Constant(false));
        }
        query::parse_condition(text).map(Condition::Expr)
    }

    /// Whether `row` passes: undefined (a missing field, a type mismatch) is false,
    /// as in Azure.
    pub fn matches(&self, row: &dyn Row) -> bool {
        match self {
            Condition::Constant(value) => *value,
            Condition::Expr(expr) => query::evaluate(expr, row) == Some(true),
        }
    }
}

/// Checks the part after `$twin.` of a path: `tags.…` or `properties.desired|reported.…`.
pub fn twin_path(path: &str) -> Result<Vec<String>, String> {
    let segments: Vec<String> = path.split('.').map(str::to_string).collect();
    if segments.iter().any(String::is_empty) || segments.len() + 1 > MAX_PATH_SEGMENTS {
        return Err(format!(
            "$twin.{path} is not a path of at most {MAX_PATH_SEGMENTS} non-empty segments"
        ));
    }
    let known = match segments.as_slice() {
        [first, ..] if first == "tags" => true,
        [first, second, ..] if first == "properties" => second == "desired" || second == "reported",
        _ => false,
    };
    if !known {
        return Err(format!(
            "$twin.{path} must start with tags or properties.desired or properties.reported"
        ));
    }
    Ok(segments)
}

/// The parts of a twin conditions and enrichments read (`tags`, `properties`).
pub fn twin_value(twin: &TwinDocument) -> Value {
    let mut properties = Map::new();
    properties.insert(
        "desired".into(),
        Value::Object(twin.desired.properties.clone()),
    );
    properties.insert(
        "reported".into(),
        Value::Object(twin.reported.properties.clone()),
    );
    let mut out = Map::new();
    out.insert("tags".into(), Value::Object(twin.tags.clone()));
    out.insert("properties".into(), Value::Object(properties));
    Value::Object(out)
}

/// Azure's `$`-names of system properties and the stored names they read.
const SYSTEM_NAMES: [(&str, &str); 10] = [
    ("$contentType", "content-type"),
    ("$contentEncoding", "content-encoding"),
    ("$connectionDeviceId", "iothub-connection-device-id"),
    ("$connectionModuleId", "iothub-connection-module-id"),
    ("$enqueuedTime", "iothub-enqueuedtime"),
    ("$messageId", "message-id"),
    ("$correlationId", "correlation-id"),
    ("$userId", "user-id"),
    ("$expiryTimeUtc", "expiry-time-utc"),
    ("$creationTimeUtc", "iothub-creation-time-utc"),
];

/// The stored name of a system property given by Azure's name, with or without
/// the `$` (`contentType` → `content-type`).
pub fn stored_system_name(name: &str) -> Option<&'static str> {
    let bare = name.strip_prefix('$').unwrap_or(name);
    SYSTEM_NAMES
        .iter()
        .find(|(azure, _)| azure[1..].eq_ignore_ascii_case(bare))
        .map(|(_, stored)| *stored)
}

/// Whether a message's body is JSON text conditions can read (Azure: content type
/// `application/json`, encoding UTF-8, 16 or 32; UTF-8 assumed when none is given).
pub fn body_is_json(message: &StoredMessage) -> bool {
    let system = &message.system_properties;
    system
        .get("content-type")
        .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"))
        && system
            .get("content-encoding")
            .is_none_or(|ce| matches!(ce.to_ascii_lowercase().as_str(), "utf-8" | "utf8"))
}

/// A message as a condition sees it. The body is parsed and the twin looked up at
/// most once, and only if a condition asks.
pub struct MessageRow<'a> {
    message: &'a StoredMessage,
    twin: &'a dyn Fn() -> Option<Value>,
    body: OnceCell<Option<Value>>,
    twin_value: OnceCell<Option<Value>>,
}

impl<'a> MessageRow<'a> {
    /// The row of `message`; `twin` finds the sending device's twin.
    pub fn new(message: &'a StoredMessage, twin: &'a dyn Fn() -> Option<Value>) -> Self {
        Self {
            message,
            twin,
            body: OnceCell::new(),
            twin_value: OnceCell::new(),
        }
    }

    /// The device twin (as [`twin_value`] shapes it).
    pub fn twin(&self) -> Option<&Value> {
        self.twin_value.get_or_init(|| (self.twin)()).as_ref()
    }

    fn body(&self) -> Option<&Value> {
        self.body
            .get_or_init(|| {
                body_is_json(self.message)
                    .then(|| serde_json::from_slice(&self.message.body).ok())
                    .flatten()
            })
            .as_ref()
    }

    fn property(&self, name: &str) -> Option<Value> {
        let message = self.message;
        if name.starts_with('$') {
            let system = SYSTEM_NAMES
                .iter()
                .find(|(azure, _)| azure.eq_ignore_ascii_case(name))
                .and_then(|(_, stored)| message.system_properties.get(*stored));
            if let Some(value) = system {
                return Some(Value::String(value.clone()));
            }
        }
        let bare = name.strip_prefix('$').unwrap_or(name);
        message
            .properties
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(bare))
            .map(|(_, value)| Value::String(value.clone()))
    }
}

fn nested(value: Option<&Value>, rest: &[String]) -> Option<Value> {
    let value = value?;
    if rest.is_empty() {
        return Some(value.clone());
    }
    query::lookup(value.as_object()?, rest).cloned()
}

impl Row for MessageRow<'_> {
    fn get(&self, path: &[String]) -> Option<Value> {
        let (first, rest) = path.split_first()?;
        if first.eq_ignore_ascii_case("$body") {
            return nested(self.body(), rest);
        }
        if first.eq_ignore_ascii_case("$twin") {
            return nested(self.twin(), rest);
        }
        if rest.is_empty() {
            return self.property(first);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    fn message(content_type: Option<&str>, body: &str) -> StoredMessage {
        let mut system = BTreeMap::new();
        if let Some(ct) = content_type {
            system.insert("content-type".to_string(), ct.to_string());
        }
        system.insert("iothub-connection-device-id".into(), "d1".into());
        let mut properties = BTreeMap::new();
        properties.insert("Level".to_string(), "critical".to_string());
        StoredMessage {
            offset: 0,
            enqueued_time: time::OffsetDateTime::UNIX_EPOCH,
            device_id: "d1".into(),
            system_properties: system,
            properties,
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    fn check(condition: &str, message: &StoredMessage) -> bool {
        let twin = || {
            Some(
                json!({"tags": {"site": "oslo"}, "properties": {"desired": {}, "reported": {"fw": 3}}}),
            )
        };
        let row = MessageRow::new(message, &twin);
        Condition::compile(condition).unwrap().matches(&row)
    }

    #[test]
    fn body_twin_system_and_application_properties() {
        let json = message(
            Some("application/json"),
            r#"{"temp": 35, "w": {"h": "Feb"}}"#,
        );
        assert!(check("$body.temp > 30", &json));
        assert!(!check("$body.temp > 40", &json));
        assert!(check("$body.w.h = 'Feb'", &json));
        assert!(check(
            "$twin.tags.site = 'oslo' AND $twin.properties.reported.fw >= 3",
            &json
        ));
        assert!(check("$connectionDeviceId = 'd1'", &json));
        assert!(check("$contentType = 'application/json'", &json));
        assert!(check("level = 'critical'", &json));
        assert!(check("$level = 'critical'", &json));
        assert!(check("true", &json));
        assert!(!check("FALSE", &json));
        assert!(check("NOT is_defined($body.missing)", &json));
        // Without the JSON content type the body is not readable: undefined is false.
        let plain = message(None, r#"{"temp": 35}"#);
        assert!(!check("$body.temp > 30", &plain));
        assert!(!check("NOT ($body.temp > 30)", &plain));
    }

    #[test]
    fn conditions_carry_the_query_bounds() {
        let deep = format!("{}true = true{}", "(".repeat(30), ")".repeat(30));
        assert!(Condition::compile(&deep).is_err());
        let long = "a = 1 OR ".repeat(600) + "a = 1";
        assert!(Condition::compile(&long).is_err());
        assert!(Condition::compile("$body.x > ").is_err());
        assert!(Condition::compile("a = 1 b").is_err());
    }

    #[test]
    fn twin_paths_are_checked() {
        assert!(twin_path("tags.site").is_ok());
        assert!(twin_path("properties.desired.x").is_ok());
        assert!(twin_path("properties.other.x").is_err());
        assert!(twin_path("deviceId").is_err());
        assert!(twin_path("tags..x").is_err());
    }
}
