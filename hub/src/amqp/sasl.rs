//! SASL for AMQP clients that send the SASL header: ANONYMOUS (the Event Hubs SDKs),
//! MSSBCBS and EXTERNAL all succeed and leave authorisation to CBS; PLAIN with
//! `{policy}@sas.root.{hub}` and a policy SAS token as password authenticates the
//! whole connection (Azure's documented form).

use std::sync::Arc;

use fe2o3_amqp::acceptor::SaslAcceptor;
use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};

use super::AmqpContext;
use super::address;
use super::claims::{Claim, Claims, now};
use crate::auth::service::Scope;

/// The mechanisms offered, in the order offered.
pub const MECHANISMS: [&str; 4] = ["MSSBCBS", "ANONYMOUS", "PLAIN", "EXTERNAL"];

/// The hub's SASL acceptor for one connection: a PLAIN success lands in `claims`.
#[derive(Debug, Clone)]
pub struct HubSasl {
    context: Arc<AmqpContext>,
    claims: Arc<Claims>,
}

impl HubSasl {
    /// An acceptor granting into `claims`.
    pub fn new(context: Arc<AmqpContext>, claims: Arc<Claims>) -> Self {
        Self { context, claims }
    }

    fn plain(&self, response: &[u8]) -> SaslCode {
        let mut parts = response.split(|b| *b == 0);
        let (Some(_authzid), Some(user), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return SaslCode::Auth;
        };
        let (Ok(user), Ok(password)) = (std::str::from_utf8(user), std::str::from_utf8(password))
        else {
            return SaslCode::Auth;
        };
        match plain_claim(&self.context, user, password, now()) {
            Some(claim) => match self.claims.add(claim, now()) {
                Ok(()) => SaslCode::Ok,
                Err(_) => SaslCode::Auth,
            },
            None => SaslCode::Auth,
        }
    }
}

/// The claim a PLAIN `user` / `password` earns: `{policy}@sas.root.{hub}` and a SAS
/// token of that policy for the hub (or a path of it), with ServiceConnect.
pub fn plain_claim(context: &AmqpContext, user: &str, password: &str, now: u64) -> Option<Claim> {
    let (policy, hub) = user.split_once("@sas.root.")?;
    let host_label = context.hostname.split('.').next().unwrap_or_default();
    if !hub.eq_ignore_ascii_case(host_label)
        && !hub.eq_ignore_ascii_case(&context.hostname)
        && !hub.eq_ignore_ascii_case(&context.entity)
    {
        return None;
    }
    let grant = context.policies.verify_any_resource(password, now).ok()?;
    if grant.policy != policy || !grant.scopes.contains(&Scope::ServiceConnect) {
        return None;
    }
    let audience = address::normalize(&grant.resource);
    if !address::covers(&context.hostname.to_ascii_lowercase(), &audience) {
        return None;
    }
    Some(Claim {
        audience,
        policy: grant.policy,
        scopes: grant.scopes,
        expiry: grant.expiry,
    })
}

fn outcome(code: SaslCode) -> SaslServerFrame {
    SaslServerFrame::Outcome(SaslOutcome {
        code,
        additional_data: None,
    })
}

impl SaslAcceptor for HubSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(
            MECHANISMS
                .iter()
                .map(|m| Symbol::from(*m))
                .collect::<Vec<_>>(),
        )
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        match init.mechanism.as_str() {
            "ANONYMOUS" | "MSSBCBS" | "EXTERNAL" => outcome(SaslCode::Ok),
            "PLAIN" => {
                let response = init
                    .initial_response
                    .map(|r| r.into_vec())
                    .unwrap_or_default();
                outcome(self.plain(&response))
            }
            _ => outcome(SaslCode::Auth),
        }
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // No mechanism offered here sends a challenge, so no response is expected.
        outcome(SaslCode::Auth)
    }
}
