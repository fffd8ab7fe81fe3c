//! One AMQP connection: TLS and the header sniff, the acceptor, then a task per
//! session that routes each attach by address to a link task — `$cbs` and
//! `$management` request/reply pairs, the C2D receiver, the feedback and file
//! notification senders, partition senders — after checking the connection's
//! claims. Refusals are an attach answered and then detached with an AMQP error; a
//! failed link never takes its session or connection down.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp::link::delivery::Delivery;
use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::link::{RecvError, SendError};
use fe2o3_amqp::types::definitions::{self, AmqpError, ErrorCondition, Fields, LinkError, Role};
use fe2o3_amqp::types::messaging::{Body, FilterSet, Message, Outcome, TargetArchetype};
use fe2o3_amqp::types::primitives::{Symbol, Value};
use fe2o3_amqp::{Receiver, Sendable, Sender};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use super::address::{self, Node};
use super::claims::{Claims, now};
use super::io::{Header, Rewind, classify, read_header};
use super::sasl::HubSasl;
use super::{AmqpContext, c2d, cbs, eventhub, feedback};

/// The idle time-out the hub announces: clients send a frame at least this often
/// (the Event Hubs SDKs announce 60 s and heartbeat at half of it).
const IDLE_TIMEOUT_MS: u32 = 120_000;
/// How long closing a link or connection waits for the peer's answer.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Telemetry messages read per page for a partition receiver.
const READ_PAGE: usize = 128;
/// How long a partition read waits for new messages before looking again.
const READ_WAIT: Duration = Duration::from_secs(10);
/// Most deliveries a partition sender leaves unsettled (clients that ask for
/// unsettled transfers settle them as they arrive).
pub const MAX_UNSETTLED: usize = 1024;
/// How long a reply waits for its reply link to attach (clients attach both links of
/// a request/reply pair before sending, but the attaches race the request here).
const REPLY_LINK_WAIT: Duration = Duration::from_secs(2);

/// Serves one accepted TCP connection, with TLS when `tls` is set.
pub async fn serve_tcp(
    context: Arc<AmqpContext>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    stopped: watch::Receiver<bool>,
) {
    let handshake = context.limits.handshake_timeout;
    match tls {
        Some(tls) => match timeout(handshake, tls.accept(stream)).await {
            Ok(Ok(stream)) => serve_stream(context, stream, peer, stopped).await,
            Ok(Err(err)) => tracing::debug!(%peer, %err, "amqps TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "amqps TLS handshake timed out"),
        },
        None => serve_stream(context, stream, peer, stopped).await,
    }
}

/// Serves one AMQP connection over `stream` (after TLS or WebSocket).
pub async fn serve_stream<S>(
    context: Arc<AmqpContext>,
    mut stream: S,
    peer: SocketAddr,
    mut stopped: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Debug + Send + Unpin + 'static,
{
    let limits = context.limits;
    let header = match timeout(limits.handshake_timeout, read_header(&mut stream)).await {
        Ok(Ok(header)) => header,
        _ => {
            tracing::debug!(%peer, "amqp: no protocol header");
            return;
        }
    };
    let claims = Arc::new(Claims::default());
    let stream = Rewind::new(header, stream);
    let acceptor = ConnectionAcceptor::builder()
        .container_id(format!("hub-{}", context.hostname))
        .max_frame_size(limits.max_frame_size)
        .channel_max(limits.max_sessions.saturating_sub(1))
        .idle_time_out(IDLE_TIMEOUT_MS)
        .properties(product_properties());
    let opened = timeout(limits.handshake_timeout, async {
        match classify(&header) {
            Header::Sasl => {
                acceptor
                    .sasl_acceptor(HubSasl::new(Arc::clone(&context), Arc::clone(&claims)))
                    .build()
                    .accept(stream)
                    .await
            }
            Header::Amqp | Header::Other => acceptor.build().accept(stream).await,
        }
    })
    .await;
    let mut connection = match opened {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) => {
            tracing::debug!(%peer, %err, "amqp open refused");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "amqp open timed out");
            return;
        }
    };
    tracing::debug!(%peer, "amqp connection open");
    let state = Arc::new(ConnectionState {
        claims,
        replies: Replies::default(),
    });
    // `handle-max` is announced (pyamqp needs it in `begin`); the bound itself is
    // enforced by the session task (`run_session`), which refuses with a condition.
    let session_acceptor = SessionAcceptor::builder()
        .handle_max(limits.max_links_per_session.saturating_sub(1))
        .properties(product_properties())
        .build();
    let mut sessions = JoinSet::new();
    let mut session_ids = 0u64;
    loop {
        tokio::select! {
            incoming = connection.next_incoming_session() => {
                let Some(incoming) = incoming else { break };
                while sessions.try_join_next().is_some() {}
                // fe2o3 does not hold a peer to the channel-max it was sent: over the
                // bound, the connection is closed with the condition.
                if sessions.len() >= usize::from(limits.max_sessions) {
                    tracing::debug!(%peer, "amqp: too many sessions; closing the connection");
                    let err = error(
                        AmqpError::ResourceLimitExceeded,
                        format!("at most {} sessions per connection", limits.max_sessions),
                    );
                    let _ = timeout(CLOSE_WAIT, connection.close_with_error(err)).await;
                    sessions.abort_all();
                    return;
                }
                match session_acceptor.accept_incoming_session(incoming, &mut connection).await {
                    Ok(session) => {
                        session_ids += 1;
                        sessions.spawn(run_session(
                            Arc::clone(&context),
                            Arc::clone(&state),
                            session,
                            session_ids,
                        ));
                    }
                    Err(err) => {
                        tracing::debug!(%peer, %err, "amqp session refused");
                        break;
                    }
                }
                while sessions.try_join_next().is_some() {}
            }
            // The hub is stopping: close the connection below.
            () = super::stopping(&mut stopped) => break,
        }
    }
    let _ = timeout(CLOSE_WAIT, connection.close()).await;
    sessions.abort_all();
    tracing::debug!(%peer, "amqp connection closed");
}

/// The `properties` of the hub's open, begin and attach. Never empty: fe2o3 leaves
/// trailing null fields out of a performative, and Python's pyamqp reads `open`,
/// `begin` and `attach` by index up to their last field (`properties`), so without it
/// the Python Event Hubs SDK fails with an IndexError.
fn product_properties() -> Fields {
    let mut fields = Fields::new();
    fields.insert(Symbol::from("product"), Value::String("hub".to_string()));
    fields.insert(
        Symbol::from("version"),
        Value::String(env!("CARGO_PKG_VERSION").to_string()),
    );
    fields
}

/// What the links of one connection share.
#[derive(Debug)]
struct ConnectionState {
    claims: Arc<Claims>,
    replies: Replies,
}

/// Which request/reply node a reply link serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyNode {
    Cbs,
    Management,
}

/// A reply link of the connection.
#[derive(Debug)]
struct Route {
    id: u64,
    session: u64,
    node: ReplyNode,
    name: String,
    address: Option<String>,
    tx: mpsc::Sender<Message<Body<Value>>>,
}

/// The connection's reply links, to route each reply: the one in the request's
/// session whose name or address is the request's `reply_to`, else any whose is,
/// else the one in the same session (Python's management link sets no `reply_to`).
#[derive(Debug, Default)]
struct Replies {
    routes: Mutex<Vec<Route>>,
    ids: AtomicU64,
}

impl Replies {
    fn add(
        &self,
        session: u64,
        node: ReplyNode,
        name: String,
        address: Option<String>,
        tx: mpsc::Sender<Message<Body<Value>>>,
    ) -> u64 {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        self.lock().push(Route {
            id,
            session,
            node,
            name,
            address,
            tx,
        });
        id
    }

    fn remove(&self, id: u64) {
        self.lock().retain(|route| route.id != id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Route>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn find(
        &self,
        session: u64,
        node: ReplyNode,
        reply_to: Option<&str>,
    ) -> Option<mpsc::Sender<Message<Body<Value>>>> {
        let routes = self.lock();
        let named = |route: &&Route| {
            reply_to.is_some_and(|to| route.name == to || route.address.as_deref() == Some(to))
        };
        let candidates = || routes.iter().filter(|route| route.node == node);
        candidates()
            .filter(|route| route.session == session)
            .find(named)
            .or_else(|| candidates().find(named))
            .or_else(|| candidates().find(|route| route.session == session))
            .map(|route| route.tx.clone())
    }

    /// Sends `reply` on its route, waiting a moment for the reply link to attach.
    async fn send(
        &self,
        session: u64,
        node: ReplyNode,
        reply_to: Option<&str>,
        reply: Message<Body<Value>>,
    ) {
        let deadline = tokio::time::Instant::now() + REPLY_LINK_WAIT;
        loop {
            if let Some(tx) = self.find(session, node, reply_to) {
                let _ = tx.send(reply).await;
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::debug!(?node, ?reply_to, "amqp: no reply link for a request");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The parts of an attach a link task needs.
#[derive(Debug)]
struct AttachInfo {
    name: String,
    node: Option<Node>,
    address: Option<String>,
    target_address: Option<String>,
    filter: Option<FilterSet>,
    /// The receiver accepts pre-settled transfers (its sender settle mode is not
    /// `unsettled`).
    presettled: bool,
}

/// Accepts the session's links until it ends.
async fn run_session(
    context: Arc<AmqpContext>,
    state: Arc<ConnectionState>,
    mut session: ListenerSessionHandle,
    session_id: u64,
) {
    let acceptor = LinkAcceptor::builder()
        .max_message_size(context.limits.max_message_bytes)
        .properties(product_properties())
        .build();
    let mut links = JoinSet::new();
    while let Some(attach) = session.next_incoming_attach().await {
        let target_address = attach
            .target
            .as_ref()
            .and_then(|target| match target.as_ref() {
                TargetArchetype::Target(target) => target.address.clone(),
            });
        let source_address = attach
            .source
            .as_ref()
            .and_then(|source| source.address.clone());
        let address = match attach.role {
            // The client sends: the address is the target.
            Role::Sender => target_address.clone(),
            Role::Receiver => source_address,
        };
        let info = AttachInfo {
            name: attach.name.clone(),
            node: address
                .as_deref()
                .and_then(|address| address::parse(address, &context.entity)),
            address,
            target_address,
            filter: attach
                .source
                .as_ref()
                .and_then(|source| source.filter.clone()),
            presettled: !matches!(
                attach.snd_settle_mode,
                definitions::SenderSettleMode::Unsettled
            ),
        };
        let link = match acceptor.accept_incoming_attach(attach, &mut session).await {
            Ok(link) => link,
            Err(err) => {
                tracing::debug!(%err, name = %info.name, "amqp attach failed");
                continue;
            }
        };
        while links.try_join_next().is_some() {}
        tracing::debug!(name = %info.name, node = ?info.node, links = links.len(), "amqp attach");
        // fe2o3 does not hold a peer to the handle-max it was sent: over the bound,
        // the new link is refused and the others stay.
        if links.len() >= context.limits.max_links_per_session as usize {
            let err = error(
                AmqpError::ResourceLimitExceeded,
                format!(
                    "at most {} links per session",
                    context.limits.max_links_per_session
                ),
            );
            links.spawn(refuse(link, err));
            continue;
        }
        links.spawn(run_link(
            Arc::clone(&context),
            Arc::clone(&state),
            session_id,
            link,
            info,
        ));
        while links.try_join_next().is_some() {}
    }
    links.abort_all();
    let _ = timeout(CLOSE_WAIT, session.end()).await;
}

/// An AMQP error.
fn error(
    condition: impl Into<ErrorCondition>,
    description: impl Into<String>,
) -> definitions::Error {
    definitions::Error::new(condition, Some(description.into()), None)
}

/// Detaches `link` (closing it) with `err`.
async fn refuse(link: LinkEndpoint, err: definitions::Error) {
    tracing::debug!(condition = ?err.condition, description = ?err.description, "amqp link refused");
    match link {
        LinkEndpoint::Sender(sender) => {
            let _ = timeout(CLOSE_WAIT, sender.close_with_error(err)).await;
        }
        LinkEndpoint::Receiver(receiver) => {
            let _ = timeout(CLOSE_WAIT, receiver.close_with_error(err)).await;
        }
    }
}

/// Routes a link to its node, after checking the claims that node needs.
async fn run_link(
    context: Arc<AmqpContext>,
    state: Arc<ConnectionState>,
    session: u64,
    link: LinkEndpoint,
    info: AttachInfo,
) {
    let Some(node) = info.node.clone() else {
        let what = info.address.as_deref().unwrap_or("(none)");
        return refuse(
            link,
            error(AmqpError::NotFound, format!("no node at address {what:?}")),
        )
        .await;
    };
    // `$cbs` is open to all: it is how a connection gets its claims.
    if node != Node::Cbs {
        let resource = address::resource_of(&node, &context.hostname, &context.entity);
        if let Err(err) = state.claims.check(&resource, now()) {
            return refuse(link, error(AmqpError::UnauthorizedAccess, err.to_string())).await;
        }
    }
    match (link, node) {
        (LinkEndpoint::Receiver(receiver), Node::Cbs) => {
            cbs_requests(context, state, session, receiver).await;
        }
        (LinkEndpoint::Sender(sender), Node::Cbs) => {
            reply_link(state, session, ReplyNode::Cbs, sender, info).await;
        }
        (LinkEndpoint::Receiver(receiver), Node::Management) => {
            management_requests(context, state, session, receiver).await;
        }
        (LinkEndpoint::Sender(sender), Node::Management) => {
            reply_link(state, session, ReplyNode::Management, sender, info).await;
        }
        (LinkEndpoint::Receiver(receiver), Node::DeviceBound) => {
            c2d_link(context, state, receiver).await;
        }
        (LinkEndpoint::Sender(sender), Node::Feedback) => {
            feedback_link(context, sender).await;
        }
        (LinkEndpoint::Sender(mut sender), Node::FileNotifications) => {
            // File upload does not exist yet: the link stays open and empty.
            let _ = sender.on_detach().await;
            let _ = timeout(CLOSE_WAIT, sender.close()).await;
        }
        (LinkEndpoint::Sender(sender), Node::Partition { group, partition }) => {
            partition_link(context, state, sender, group, partition, info).await;
        }
        (link, node) => {
            let direction = match &link {
                LinkEndpoint::Sender(_) => "sent from",
                LinkEndpoint::Receiver(_) => "sent to",
            };
            refuse(
                link,
                error(
                    AmqpError::NotAllowed,
                    format!("{node:?} cannot be {direction}"),
                ),
            )
            .await;
        }
    }
}

/// Ends a receiver after `recv` failed: quietly when the peer detached, with the
/// matching condition when what it sent was wrong.
async fn end_receiver(receiver: Receiver, err: RecvError) {
    let err = match err {
        RecvError::LinkStateError(_) => {
            let _ = timeout(CLOSE_WAIT, receiver.close()).await;
            return;
        }
        RecvError::MessageSizeExceeded(err) => {
            error(LinkError::MessageSizeExceeded, err.to_string())
        }
        RecvError::TransferLimitExceeded => {
            error(LinkError::TransferLimitExceeded, err.to_string())
        }
        RecvError::MessageDecode(err) => error(AmqpError::DecodeError, err.to_string()),
        other => error(AmqpError::InvalidField, other.to_string()),
    };
    refuse(LinkEndpoint::Receiver(receiver), err).await;
}

/// `$cbs` requests: each put-token verified into a claim and answered.
async fn cbs_requests(
    context: Arc<AmqpContext>,
    state: Arc<ConnectionState>,
    session: u64,
    mut receiver: Receiver,
) {
    loop {
        let delivery: Delivery<Body<Value>> = match receiver.recv().await {
            Ok(delivery) => delivery,
            Err(err) => return end_receiver(receiver, err).await,
        };
        let _ = receiver.accept(&delivery).await;
        let request = delivery.message();
        let reply = match cbs::put_token(&context, &state.claims, request, now()) {
            Ok(claim) => {
                tracing::debug!(audience = %claim.audience, policy = %claim.policy, "amqp CBS token accepted");
                cbs::reply(request, 200, "OK", Value::Null)
            }
            Err(refusal) => {
                tracing::debug!(status = refusal.status, reason = %refusal.description, "amqp CBS token refused");
                cbs::reply(request, refusal.status, &refusal.description, Value::Null)
            }
        };
        state
            .replies
            .send(session, ReplyNode::Cbs, cbs::reply_to(request), reply)
            .await;
    }
}

/// `$management` READ requests, answered on the management reply link.
async fn management_requests(
    context: Arc<AmqpContext>,
    state: Arc<ConnectionState>,
    session: u64,
    mut receiver: Receiver,
) {
    loop {
        let delivery: Delivery<Body<Value>> = match receiver.recv().await {
            Ok(delivery) => delivery,
            Err(err) => return end_receiver(receiver, err).await,
        };
        let _ = receiver.accept(&delivery).await;
        let request = delivery.message();
        let reply = match eventhub::read(
            &context.telemetry,
            &context.entity,
            context.created,
            request,
        )
        .await
        {
            Ok(value) => cbs::reply(request, 200, "OK", value),
            Err(err) => cbs::reply(request, err.status, &err.description, Value::Null),
        };
        state
            .replies
            .send(
                session,
                ReplyNode::Management,
                cbs::reply_to(request),
                reply,
            )
            .await;
    }
}

/// A reply link: sends what the request handlers route to it, pre-settled.
async fn reply_link(
    state: Arc<ConnectionState>,
    session: u64,
    node: ReplyNode,
    mut sender: Sender,
    info: AttachInfo,
) {
    let (tx, mut rx) = mpsc::channel(16);
    let id = state
        .replies
        .add(session, node, info.name, info.target_address, tx);
    loop {
        tokio::select! {
            reply = rx.recv() => {
                let Some(reply) = reply else { break };
                let sendable = Sendable::builder().message(reply).settled(true).build();
                if sender.send_batchable(sendable).await.is_err() {
                    break;
                }
            }
            // The client detached; cancelling this wait loses nothing.
            _ = sender.on_detach() => break,
        }
    }
    state.replies.remove(id);
    let _ = timeout(CLOSE_WAIT, sender.close()).await;
}

/// `/messages/devicebound`: each message into the C2D queues, settled accepted or
/// rejected with the refusal's condition; the link stays attached either way.
async fn c2d_link(context: Arc<AmqpContext>, state: Arc<ConnectionState>, mut receiver: Receiver) {
    let resource = address::resource_of(&Node::DeviceBound, &context.hostname, &context.entity);
    loop {
        let delivery: Delivery<Body<Value>> = match receiver.recv().await {
            Ok(delivery) => delivery,
            Err(err) => return end_receiver(receiver, err).await,
        };
        let result = async {
            state
                .claims
                .check(&resource, now())
                .map_err(|err| c2d::Refused::Unauthorized(err.to_string()))?;
            let now_ms =
                (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
            let (device, request) = c2d::to_request(delivery.message(), now_ms)?;
            context
                .commands
                .send(&device, request)
                .await
                .map_err(c2d::Refused::from)
        }
        .await;
        let disposed = match result {
            Ok(_) => receiver.accept(&delivery).await,
            Err(refused) => {
                tracing::debug!(%refused, "amqp C2D message rejected");
                receiver
                    .reject(&delivery, error(refused.condition(), refused.to_string()))
                    .await
            }
        };
        if disposed.is_err() {
            let _ = timeout(CLOSE_WAIT, receiver.close()).await;
            return;
        }
    }
}

/// `/messages/serviceBound/feedback`: feedback batches, each completed or returned
/// by the client's outcome.
async fn feedback_link(context: Arc<AmqpContext>, mut sender: Sender) {
    let hub_name = context
        .hostname
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    loop {
        let batch = tokio::select! {
            // Cancelling the wait for a batch at worst leaves one locked until its
            // lock expires, when it is offered again.
            batch = context.commands.receive_feedback(Duration::from_secs(15)) => batch,
            _ = sender.on_detach() => break,
        };
        let batch = match batch {
            Ok(Some(batch)) => batch,
            Ok(None) => continue,
            Err(err) => {
                tracing::warn!(%err, "amqp feedback: cannot read feedback");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let message = feedback::message(&batch, &hub_name, now_ms);
        let sendable = Sendable::builder().message(message).settled(false).build();
        let outcome = match sender.send_batchable(sendable).await {
            Ok(delivery) => timeout(Duration::from_secs(60), delivery).await,
            Err(_) => {
                let _ = context.commands.abandon_feedback(&batch.lock_token).await;
                break;
            }
        };
        let settle = match &outcome {
            Ok(Ok(outcome)) => feedback::settle(outcome),
            _ => feedback::Settle::Abandon,
        };
        let _ = match settle {
            feedback::Settle::Complete => {
                context
                    .commands
                    .acknowledge_feedback(&batch.lock_token)
                    .await
            }
            feedback::Settle::Abandon => context.commands.abandon_feedback(&batch.lock_token).await,
        };
        if matches!(outcome, Ok(Err(_))) {
            break;
        }
    }
    let _ = timeout(CLOSE_WAIT, sender.close()).await;
}

/// A partition receiver: events from the filter's position on, as they become
/// durable, within the client's credit.
async fn partition_link(
    context: Arc<AmqpContext>,
    state: Arc<ConnectionState>,
    mut sender: Sender,
    group: String,
    partition: u32,
    info: AttachInfo,
) {
    let telemetry = &context.telemetry;
    let argument_error = |text: String| {
        error(
            ErrorCondition::Custom(Symbol::from("com.microsoft:argument-error")),
            text,
        )
    };
    let position = match eventhub::selector(info.filter.as_ref())
        .and_then(|expression| eventhub::position(expression.as_deref()))
    {
        Ok(position) => position,
        Err(err) => {
            return refuse(
                LinkEndpoint::Sender(sender),
                argument_error(err.to_string()),
            )
            .await;
        }
    };
    let partition_info = match telemetry.partition_info(partition).await {
        Ok(info) => info,
        Err(err) => {
            return refuse(
                LinkEndpoint::Sender(sender),
                error(AmqpError::NotFound, err.to_string()),
            )
            .await;
        }
    };
    let mut next = match eventhub::start_offset(telemetry, &partition_info, position).await {
        Ok(offset) => offset,
        Err(err) => {
            return refuse(
                LinkEndpoint::Sender(sender),
                error(AmqpError::InternalError, err.to_string()),
            )
            .await;
        }
    };
    tracing::debug!(%group, partition, next, "amqp partition receiver attached");
    let resource = address::resource_of(
        &Node::Partition { group, partition },
        &context.hostname,
        &context.entity,
    );
    let mut unsettled: VecDeque<DeliveryFut<Result<Outcome, SendError>>> = VecDeque::new();
    loop {
        if let Err(err) = state.claims.check(&resource, now()) {
            return refuse(
                LinkEndpoint::Sender(sender),
                error(AmqpError::UnauthorizedAccess, err.to_string()),
            )
            .await;
        }
        let read = tokio::select! {
            read = telemetry.read(partition, next, READ_PAGE, READ_WAIT) => read,
            // The client detached; the read holds no state worth keeping.
            _ = sender.on_detach() => break,
        };
        let messages = match read {
            Ok(messages) => messages,
            Err(err) => match telemetry.partition_info(partition).await {
                // Retention removed what was next: go on from the first retained.
                Ok(now_info) if next < now_info.first_offset => {
                    next = now_info.first_offset;
                    continue;
                }
                _ => {
                    return refuse(
                        LinkEndpoint::Sender(sender),
                        error(AmqpError::InternalError, err.to_string()),
                    )
                    .await;
                }
            },
        };
        for message in messages {
            next = message.offset + 1;
            let sendable = Sendable::builder()
                .message(eventhub::event(&message))
                .settled(info.presettled)
                .build();
            match sender.send_batchable(sendable).await {
                Ok(delivery) if !info.presettled => {
                    unsettled.push_back(delivery);
                    if unsettled.len() >= MAX_UNSETTLED
                        && let Some(oldest) = unsettled.pop_front()
                        && timeout(Duration::from_secs(60), oldest).await.is_err()
                    {
                        return refuse(
                            LinkEndpoint::Sender(sender),
                            error(
                                LinkError::TransferLimitExceeded,
                                format!("more than {MAX_UNSETTLED} deliveries left unsettled"),
                            ),
                        )
                        .await;
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(%err, partition, "amqp partition send failed");
                    return;
                }
            }
        }
    }
    let _ = timeout(CLOSE_WAIT, sender.close()).await;
}
