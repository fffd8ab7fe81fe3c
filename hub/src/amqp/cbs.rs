//! The `$cbs` node: a put-token request (application properties `operation`,
//! `type`, `name`; the token as an amqp-value string body) becomes a [`Claim`] on the
//! connection, and the reply carries `status-code` (an int: 200, 400 or 401) with the
//! request's message-id echoed, AMQP type and all, as correlation-id.

use fe2o3_amqp::types::messaging::{AmqpValue, ApplicationProperties, Body, Message, Properties};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};

use super::AmqpContext;
use super::address;
use super::claims::{Claim, ClaimError, Claims};
use crate::auth::service::Scope;

/// Token types accepted: shared access signatures (JWTs are not issued by this hub's
/// policies).
const SAS_TYPES: [&str; 2] = [
    "servicebus.windows.net:sastoken",
    "azure-devices.net:sastoken",
];

/// Why a put-token failed: the status code and description of the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400 or 401.
    pub status: i32,
    /// Human-readable reason.
    pub description: String,
}

fn refuse(status: i32, description: impl Into<String>) -> Refusal {
    Refusal {
        status,
        description: description.into(),
    }
}

/// A string application property of `message`.
pub fn app_property<'a>(message: &'a Message<Body<Value>>, key: &str) -> Option<&'a str> {
    message
        .application_properties
        .as_ref()?
        .0
        .get(key)
        .and_then(|value| match value {
            SimpleValue::String(s) => Some(s.as_str()),
            SimpleValue::Symbol(s) => Some(s.as_str()),
            _ => None,
        })
}

/// Handles one put-token: verifies the token and records the claim.
pub fn put_token(
    context: &AmqpContext,
    claims: &Claims,
    request: &Message<Body<Value>>,
    now: u64,
) -> Result<Claim, Refusal> {
    match app_property(request, "operation") {
        Some("put-token") => {}
        Some(other) => return Err(refuse(400, format!("unsupported CBS operation {other:?}"))),
        None => return Err(refuse(400, "missing operation")),
    }
    let kind = app_property(request, "type").unwrap_or_default();
    if !SAS_TYPES.contains(&kind) {
        return Err(refuse(
            401,
            format!("unsupported token type {kind:?}: use a shared access signature"),
        ));
    }
    let name = app_property(request, "name").ok_or_else(|| refuse(400, "missing name"))?;
    let token = match &request.body {
        Body::Value(value) => match &value.0 {
            Value::String(token) => token.as_str(),
            _ => return Err(refuse(400, "the token must be an amqp-value string")),
        },
        _ => return Err(refuse(400, "the token must be an amqp-value string")),
    };
    let grant = context
        .policies
        .verify_any_resource(token, now)
        .map_err(|err| refuse(401, err.to_string()))?;
    if !grant.scopes.contains(&Scope::ServiceConnect) {
        return Err(refuse(
            401,
            format!("policy {} lacks ServiceConnect", grant.policy),
        ));
    }
    let signed = address::normalize(&grant.resource);
    let audience = address::normalize(name);
    let host = context.hostname.to_ascii_lowercase();
    if !address::covers(&host, &signed) {
        return Err(refuse(401, "the token's resource (sr) is not this hub"));
    }
    if !address::covers(&signed, &audience) {
        return Err(refuse(
            401,
            "the token's resource (sr) does not cover the audience",
        ));
    }
    let claim = Claim {
        audience,
        policy: grant.policy,
        scopes: grant.scopes,
        expiry: grant.expiry,
    };
    claims.add(claim.clone(), now).map_err(|err| match err {
        ClaimError::TooMany => refuse(400, err.to_string()),
        other => refuse(401, other.to_string()),
    })?;
    Ok(claim)
}

/// A reply to `request` with `status` and `description` (and `body`).
pub fn reply(
    request: &Message<Body<Value>>,
    status: i32,
    description: &str,
    body: Value,
) -> Message<Body<Value>> {
    let correlation_id = request
        .properties
        .as_ref()
        .and_then(|p| p.message_id.clone().or_else(|| p.correlation_id.clone()));
    let mut props = ApplicationProperties::default();
    props
        .0
        .insert("status-code".to_string(), SimpleValue::Int(status));
    props.0.insert(
        "status-description".to_string(),
        SimpleValue::String(description.to_string()),
    );
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            correlation_id,
            to: request.properties.as_ref().and_then(|p| p.reply_to.clone()),
            ..Properties::default()
        }),
        application_properties: Some(props),
        body: Body::Value(AmqpValue(body)),
        footer: None,
    }
}

/// The `reply_to` of a request, if any.
pub fn reply_to(request: &Message<Body<Value>>) -> Option<&str> {
    request
        .properties
        .as_ref()
        .and_then(|p| p.reply_to.as_deref())
}
