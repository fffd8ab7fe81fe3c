//! One device connection: the thin async task around [`Session`]. It reads bytes,
//! decodes packets, feeds the session, executes its actions (authentication,
//! ingestion, twin requests, deliveries) and writes what the session sends.
//!
//! Backpressure: at most [`MAX_PENDING_INGESTS`] telemetry messages wait for
//! durability per connection; beyond that the task stops reading the socket, so a
//! fast device is slowed down by TCP rather than buffered. PUBACKs go out in the
//! order the PUBLISHes came in (MQTT 4.6), because pending ingests complete in order.
//! The telemetry of one read is submitted to the store as one batch (one hand-off,
//! one wake-up when it is durable), in the order it came in.
//!
//! Once a connection is registered, a [`Registered`] guard holds its place in the
//! shared tables (connections, presence, the services' per-connection state) and
//! gives it back when dropped: on the normal close, on any early return and when the
//! task panics.

use std::collections::{BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, PubAck};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::GatewayContext;
use super::codec::{self, Decoded};
use super::connections::{Connections, Registration};
use super::provisioning;
use super::session::{
    Accepted, Action, CloseReason, ConnectRequest, DeliverError, Outbound, Session,
};
use super::topic;
use crate::auth::device::{AuthMethod, Presented};
use crate::commands::ConnectionEvents;
use crate::delivery::{StoredSession, Subscription};
use crate::registry::{DeviceId, Presence};
use crate::telemetry::{Durable, IngestError, TelemetryMessage};
use crate::twins::{TwinReply, twin_error_code};

/// Telemetry messages of one connection waiting to become durable.
pub const MAX_PENDING_INGESTS: usize = 256;
/// Twin requests of one connection in progress; more get 429.
const MAX_PENDING_TWIN: usize = 8;
/// How long a write may block before the device counts as not reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Read buffer growth step: a streaming device's read carries many messages (a QoS 0
/// batch of ten 256-byte messages is ~3 KB); idle connections hold no buffer.
const READ_CHUNK: usize = 8192;
/// A busy connection marks its device active at most this often (the presence table
/// is shared by every connection).
const ACTIVITY_RESOLUTION: Duration = Duration::from_secs(1);

/// A batch of telemetry messages (those of one read) waiting to become durable, with
/// the packet ids their PUBACKs will carry (none for QoS 0). A plain struct rather
/// than a boxed `async` block: one allocation fewer per batch.
struct PendingIngest {
    acks: Vec<u16>,
    messages: usize,
    durable: Durable,
}

impl Future for PendingIngest {
    type Output = (Vec<u16>, usize, Result<(), IngestError>);

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let result = std::task::ready!(self.durable.as_mut().poll(cx));
        std::task::Poll::Ready((std::mem::take(&mut self.acks), self.messages, result))
    }
}

/// An action that waits for a store.
enum StoreStep {
    Authenticate(ConnectRequest),
    SaveSubscriptions(BTreeSet<Subscription>),
}

/// Telemetry decoded from the read buffer but not yet handed to the store.
#[derive(Default)]
struct Staged {
    messages: Vec<TelemetryMessage>,
    acks: Vec<u16>,
}
type TwinFuture = Pin<Box<dyn Future<Output = (String, TwinReply)> + Send>>;

struct Authenticated {
    device: DeviceId,
    method: AuthMethod,
    registration: Registration,
    /// Gives the registration back when the connection ends, however it ends.
    _registered: Registered,
    /// The subscriptions last reported to [`super::services::ConnectionEvents`].
    reported: Option<BTreeSet<Subscription>>,
    /// The Plug and Play model id from the CONNECT username, stamped on telemetry.
    model_id: Option<String>,
    /// The device's `generationId`: its persisted session is stored with it.
    generation_id: String,
}

/// A registered connection's hold on the shared tables. Dropping it releases them:
/// the connection table entry (if still this connection's), the device's presence
/// (only then: a newer connection of the device may have replaced this one) and the
/// services' per-connection state. Being a guard, it runs on every exit path,
/// including a panic of the connection task, which unwinds through it.
struct Registered {
    connections: Connections,
    presence: Presence,
    events: Arc<dyn ConnectionEvents>,
    device: DeviceId,
    connection: u64,
}

impl Registered {
    /// Marks the device connected; the returned guard undoes it.
    fn connected(
        connections: Connections,
        presence: Presence,
        events: Arc<dyn ConnectionEvents>,
        device: DeviceId,
        connection: u64,
    ) -> Self {
        presence.connected(&device, OffsetDateTime::now_utc());
        Self {
            connections,
            presence,
            events,
            device,
            connection,
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        // Nothing here may panic: this can run while a panic unwinds.
        self.events.disconnected(&self.device, self.connection);
        let presence = &self.presence;
        let device = &self.device;
        self.connections
            .unregister_with(device, self.connection, || presence.disconnected(device));
    }
}

struct Connection<S> {
    stream: S,
    certificates: Vec<CertificateDer<'static>>,
    ctx: Arc<GatewayContext>,
    session: Session,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// What the session asked for and the connection has not done yet.
    actions: Vec<Action>,
    /// The actions being run (taken from `actions`), oldest first.
    batch: VecDeque<Action>,
    /// Oldest first. One connection's batches go to one partition, whose commits
    /// complete in order, so only the oldest is polled (no per-batch task node).
    ingests: VecDeque<PendingIngest>,
    /// Messages in `ingests` (each entry is a batch).
    pending_messages: usize,
    staged: Staged,
    /// Created with the first twin request: most connections make none.
    twins: Option<FuturesUnordered<TwinFuture>>,
    device: Option<Authenticated>,
    closing: Option<CloseReason>,
    /// The session's next deadline as one long-lived timer: creating a `Sleep` per
    /// loop turn registered and removed a timer-wheel entry for every packet. It may
    /// fire early (the keep-alive deadline only moves later; the session re-checks).
    timer: Pin<Box<tokio::time::Sleep>>,
    /// When `timer` fires; `None` when it is not armed.
    timer_at: Option<Instant>,
    /// A CONNECT, SUBSCRIBE or UNSUBSCRIBE was handled since the subscriptions were
    /// last compared with what was reported.
    subscriptions_touched: bool,
    /// When the device was last marked active.
    last_activity: Option<Instant>,
}

/// A stream that can say when it has bytes to read without a buffer to read into,
/// so idle connections hold no read buffer.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// Completes when a read would not block (or at once if the stream cannot tell).
    fn ready(&self) -> impl Future<Output = std::io::Result<()>> + Send;
}

impl Transport for tokio::net::TcpStream {
    fn ready(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        self.readable()
    }
}

impl Transport for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn ready(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        // Decrypted bytes may already be buffered inside rustls: read directly.
        std::future::ready(Ok(()))
    }
}

/// Reads into `buf`, allocating it only once the stream has bytes.
pub(super) async fn read_some<S: Transport>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 512 {
        stream.ready().await?;
        buf.reserve(READ_CHUNK);
    }
    stream.read_buf(buf).await
}

/// Serves one accepted connection until it closes. `accepted_at` starts the
/// first-CONNECT deadline: for TLS it is before the handshake, so handshake and
/// CONNECT share one budget.
pub async fn serve<S: Transport>(
    stream: S,
    certificates: Vec<CertificateDer<'static>>,
    ctx: Arc<GatewayContext>,
    mut shutdown: watch::Receiver<bool>,
    accepted_at: Instant,
) {
    let mut stream = stream;
    let mut rbuf = BytesMut::new();
    if ctx.provisioning.is_some() {
        // Read the CONNECT first: a provisioning client's goes to its own session.
        // The device path then decodes the same bytes; nothing read is lost, and a
        // timeout, close or garbage here is met there as before. Boxed, once per
        // connection: its timer and read would otherwise stay in the task for the
        // connection's life.
        let read = Box::pin(read_connect(
            &mut stream,
            &mut rbuf,
            &ctx,
            accepted_at,
            &mut shutdown,
        ));
        if !read.await {
            // The hub is shutting down (the signal is consumed here): close.
            return;
        }
        if provisioning::is_provisioning_connect(&rbuf, ctx.max_packet_size) {
            // Boxed: inline, the provisioning session's future would be part of every
            // device connection's task for as long as it is open.
            Box::pin(provisioning::serve(
                stream,
                rbuf,
                certificates,
                ctx,
                shutdown,
            ))
            .await;
            return;
        }
    }
    let session = Session::new(ctx.limits, accepted_at);
    let mut connection = Connection {
        stream,
        certificates,
        ctx,
        session,
        rbuf,
        wbuf: BytesMut::new(),
        actions: Vec::new(),
        batch: VecDeque::new(),
        ingests: VecDeque::new(),
        pending_messages: 0,
        staged: Staged::default(),
        twins: None,
        device: None,
        closing: None,
        timer: Box::pin(tokio::time::sleep_until(accepted_at)),
        timer_at: None,
        subscriptions_touched: false,
        last_activity: None,
    };
    let reason = connection.run(shutdown).await;
    connection.finish(reason).await;
}

/// Reads until `rbuf` holds a whole first packet (or what can be told of it), the
/// CONNECT deadline passes or the peer closes; `false` when the hub shuts down.
async fn read_connect<S: Transport>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    ctx: &GatewayContext,
    accepted_at: Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let deadline = accepted_at + ctx.limits.connect_timeout;
    loop {
        let mut probe = rbuf.clone();
        match codec::decode(&mut probe, ctx.max_packet_size, true) {
            Ok(Decoded::Incomplete(needed)) => rbuf.reserve(needed),
            _ => return true,
        }
        tokio::select! {
            // Cancel-safe: read_buf loses nothing; the device path reads on.
            _ = shutdown.changed() => return false,
            () = tokio::time::sleep_until(deadline) => return true,
            read = read_some(stream, rbuf) => match read {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            },
        }
    }
}

/// The outcome of the oldest pending batch, once it has one (pending while there is
/// none). The caller removes it.
fn oldest_durable(
    ingests: &mut VecDeque<PendingIngest>,
) -> impl Future<Output = (Vec<u16>, usize, Result<(), IngestError>)> + '_ {
    std::future::poll_fn(move |cx| match ingests.front_mut() {
        Some(oldest) => Pin::new(oldest).poll(cx),
        None => std::task::Poll::Pending,
    })
}

/// The next twin reply; pending while there are no twin requests.
async fn next_twin(
    twins: &mut Option<FuturesUnordered<TwinFuture>>,
) -> Option<(String, TwinReply)> {
    match twins {
        Some(twins) => twins.next().await,
        None => std::future::pending().await,
    }
}

/// Completes when the mailbox signal fires; never without one (before CONNECT).
async fn mail_wait(signal: &mut Option<Pin<Box<dyn Future<Output = ()> + Send>>>) {
    match signal {
        Some(signal) => signal.await,
        None => std::future::pending().await,
    }
}

impl<S: Transport> Connection<S> {
    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> CloseReason {
        // Long-lived wait futures, like the timer: one made per loop turn registered
        // and removed a waiter under the shutdown channel's lock, which every
        // connection shares, for every packet.
        let mut shutdown_signal = std::pin::pin!(
            async move {
                let _ = shutdown.changed().await;
            }
            .fuse()
        );
        let mut mail_signal: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
        loop {
            if mail_signal.is_none() {
                // Only after the mailbox signalled (or before its first wait): a
                // push after this drain stores a permit that ends the next wait.
                self.take_mail();
            }
            self.decode_buffered().await;
            self.run_all_actions().await;
            // Before a close is honoured: what was read is stored (and, QoS 1,
            // acknowledged if the connection is still there when it is durable).
            self.submit_staged().await;
            self.report_subscriptions();
            if let Some(reason) = self.closing.take() {
                return reason;
            }
            if let Err(reason) = self.flush().await {
                self.session.close(reason, &mut self.actions);
                continue;
            }
            if mail_signal.is_none()
                && let Some(device) = &self.device
            {
                let mailbox = Arc::clone(&device.registration.mailbox);
                mail_signal = Some(Box::pin(async move { mailbox.wait().await }));
            }
            let read_allowed = self.pending_messages < MAX_PENDING_INGESTS;
            self.arm_timer();
            tokio::select! {
                // Every branch is cancel-safe: the mailbox is drained at the top of the
                // loop, completed futures stay in their sets, read_buf loses nothing.
                () = &mut shutdown_signal => self.session.close(CloseReason::Shutdown, &mut self.actions),
                () = mail_wait(&mut mail_signal) => mail_signal = None,
                (acks, messages, result) = oldest_durable(&mut self.ingests), if !self.ingests.is_empty() => {
                    self.ingests.pop_front();
                    let mut stored = self.ingested(&acks, messages, result);
                    // A commit releases many messages at once: acknowledge all that are
                    // ready in one write, and count them (and the device's activity)
                    // once.
                    while let Some((acks, messages, result)) =
                        self.ingests.front_mut().and_then(FutureExt::now_or_never)
                    {
                        self.ingests.pop_front();
                        stored += self.ingested(&acks, messages, result);
                    }
                    self.count_stored(stored);
                }
                Some((rid, reply)) = next_twin(&mut self.twins), if self.twins.as_ref().is_some_and(|t| !t.is_empty()) => {
                    self.twin_reply(&rid, reply);
                }
                () = &mut self.timer, if self.timer_at.is_some() => {
                    self.timer_at = None;
                    self.session.on_deadline(Instant::now(), &mut self.actions);
                }
                read = read_some(&mut self.stream, &mut self.rbuf), if read_allowed => match read {
                    Ok(0) => self.session.close(CloseReason::PeerClosed, &mut self.actions),
                    Ok(_) => {}
                    Err(err) => self.session.close(CloseReason::Io(err.to_string()), &mut self.actions),
                },
            }
        }
    }

    /// Points the timer at the session's next deadline unless it already fires at or
    /// before it.
    fn arm_timer(&mut self) {
        match (self.session.next_deadline(), self.timer_at) {
            (Some(next), Some(armed)) if armed <= next => {}
            (Some(next), _) => {
                self.timer.as_mut().reset(next);
                self.timer_at = Some(next);
            }
            (None, _) => self.timer_at = None,
        }
    }

    /// Tells the services when this connection's subscriptions changed (and first
    /// after the CONNACK).
    fn report_subscriptions(&mut self) {
        if !std::mem::take(&mut self.subscriptions_touched) {
            return;
        }
        let (Some(device), Some(current)) = (self.device.as_mut(), self.session.subscriptions())
        else {
            return;
        };
        if device.reported.as_ref() != Some(current) {
            self.ctx.services.events.subscriptions(
                &device.device,
                device.registration.connection,
                current,
            );
            device.reported = Some(current.clone());
        }
    }

    /// Moves queued deliveries into the session and honours close requests.
    fn take_mail(&mut self) {
        let Some(device) = &self.device else { return };
        let (messages, close) = device.registration.mailbox.drain();
        for message in messages {
            match self.session.deliver(message, &mut self.actions) {
                Ok(()) => {}
                Err(DeliverError::QueueFull) => {
                    self.session
                        .close(CloseReason::SlowConsumer, &mut self.actions);
                    return;
                }
                Err(err) => {
                    tracing::debug!(device = %device.device, error = %err, "delivery dropped")
                }
            }
        }
        if let Some(reason) = close {
            self.session.close(reason, &mut self.actions);
        }
    }

    /// Decodes and handles complete packets while telemetry may still be queued.
    async fn decode_buffered(&mut self) {
        while !self.session.is_closed()
            && self.pending_messages + self.staged.messages.len() < MAX_PENDING_INGESTS
        {
            let expect_connect = self.session.awaits_connect();
            match codec::decode(&mut self.rbuf, self.ctx.max_packet_size, expect_connect) {
                Ok(Decoded::Packet(packet)) => {
                    self.subscriptions_touched |= matches!(
                        packet,
                        Packet::Connect(..) | Packet::Subscribe(_) | Packet::Unsubscribe(_)
                    );
                    self.session
                        .on_packet(packet, Instant::now(), &mut self.actions);
                    // Authentication must finish before the next packet is read.
                    self.run_all_actions().await;
                }
                Ok(Decoded::UnsupportedProtocol(level)) => {
                    tracing::info!(level, "refused CONNECT: unsupported protocol level");
                    self.session.on_unsupported_protocol(&mut self.actions);
                }
                Ok(Decoded::Incomplete(needed)) => {
                    self.rbuf.reserve(needed);
                    break;
                }
                Err(err) => {
                    self.ctx.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(error = %err, "closing connection: undecodable bytes");
                    self.session
                        .close(CloseReason::Malformed(err.to_string()), &mut self.actions);
                }
            }
        }
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 && self.pending_messages == 0 {
            // Idle connections hold no read buffer; the next read allocates one once
            // the socket has bytes. One still waiting for telemetry to become durable
            // is streaming: it keeps its buffer rather than free and allocate one per
            // read.
            self.rbuf = BytesMut::new();
        }
    }

    /// Runs the session's actions, in order, including those they lead to.
    async fn run_all_actions(&mut self) {
        while let Some(step) = self.run_actions() {
            // Boxed: these steps are rare (once per CONNECT, per SUBSCRIBE of a
            // persistent session), and inline their futures would grow every
            // connection's task for its whole life.
            Box::pin(self.run_store_step(step)).await;
        }
    }

    /// Runs actions until one waits for a store: that one is returned (the actions
    /// after it stay queued and run next).
    fn run_actions(&mut self) -> Option<StoreStep> {
        loop {
            if self.batch.is_empty() {
                if self.actions.is_empty() {
                    return None;
                }
                self.batch = std::mem::take(&mut self.actions).into();
            }
            while let Some(action) = self.batch.pop_front() {
                if let Some(step) = self.run_action(action) {
                    return Some(step);
                }
            }
            // Idle connections hold no action queues.
            self.batch = VecDeque::new();
        }
    }

    async fn run_store_step(&mut self, step: StoreStep) {
        match step {
            StoreStep::Authenticate(request) => {
                let result = self.authenticate(request).await;
                self.session
                    .on_auth(result, Instant::now(), &mut self.actions);
            }
            StoreStep::SaveSubscriptions(subscriptions) => {
                if let Some(device) = &self.device
                    && let Err(err) = self
                        .ctx
                        .sessions
                        .save(
                            &device.device,
                            &StoredSession {
                                generation_id: device.generation_id.clone(),
                                subscriptions,
                            },
                        )
                        .await
                {
                    tracing::warn!(device = %device.device, error = %err, "cannot persist subscriptions");
                }
            }
        }
    }

    /// Runs one action; one that waits for a store is handed back instead.
    fn run_action(&mut self, action: Action) -> Option<StoreStep> {
        match action {
            Action::Send(packet) => {
                if matches!(packet, Packet::Publish(_)) {
                    self.ctx
                        .metrics
                        .messages_out
                        .fetch_add(1, Ordering::Relaxed);
                }
                if let Err(err) = codec::encode(&packet, &mut self.wbuf) {
                    tracing::warn!(error = %err, "cannot encode packet");
                }
            }
            Action::Authenticate(request) => return Some(StoreStep::Authenticate(request)),
            Action::Ingest {
                properties,
                payload,
                ack,
                will,
            } => {
                let Some(device) = &self.device else {
                    return None;
                };
                let message = TelemetryMessage {
                    device_id: device.device.clone(),
                    auth_method: device.method,
                    properties,
                    body: payload,
                    enqueued_at: OffsetDateTime::now_utc(),
                    model_id: device.model_id.clone(),
                };
                if will {
                    let telemetry = Arc::clone(&self.ctx.services.telemetry);
                    // The connection is ending; the will is stored on its own.
                    let id = device.device.clone();
                    tokio::spawn(async move {
                        let stored = match telemetry.submit(vec![message]).await {
                            Ok(durable) => durable.await,
                            Err(err) => Err(err),
                        };
                        if let Err(err) = stored {
                            tracing::warn!(device = %id, error = %err, "cannot store will message");
                        }
                    });
                    return None;
                }
                // Staged in packet order and submitted once the read buffer is
                // decoded (submit_staged).
                self.staged.messages.push(message);
                self.staged.acks.extend(ack);
            }
            Action::Twin { rid, op } => {
                let Some(device) = &self.device else {
                    return None;
                };
                if self
                    .twins
                    .as_ref()
                    .is_some_and(|t| t.len() >= MAX_PENDING_TWIN)
                {
                    let reply = TwinReply::error(
                        429,
                        twin_error_code::THROTTLED,
                        "too many twin requests in flight",
                    );
                    self.twin_reply(&rid, reply);
                    return None;
                }
                let service = Arc::clone(&self.ctx.services.twins);
                let id = device.device.clone();
                let twins = self.twins.get_or_insert_with(FuturesUnordered::new);
                twins.push(Box::pin(async move {
                    let reply = service.request(&id, op).await;
                    (rid, reply)
                }));
            }
            Action::MethodResponse {
                rid,
                status,
                payload,
            } => {
                if let Some(device) = &self.device {
                    self.ctx
                        .services
                        .methods
                        .respond(&device.device, &rid, status, payload);
                }
            }
            Action::Delivered(id) => {
                if let Some(device) = &self.device {
                    self.ctx.services.deliveries.delivered(&device.device, id);
                }
            }
            Action::SaveSubscriptions(subscriptions) => {
                return Some(StoreStep::SaveSubscriptions(subscriptions));
            }
            Action::Close(reason) => {
                self.closing.get_or_insert(reason);
            }
        }
        None
    }

    async fn authenticate(
        &mut self,
        request: ConnectRequest,
    ) -> Result<Accepted, ConnectReturnCode> {
        let presented = Presented {
            client_id: &request.client_id,
            username: request.username.as_deref(),
            password: request.password.as_deref(),
            certificates: &self.certificates,
        };
        let authenticated = match self.ctx.authenticator.authenticate(presented).await {
            Ok(authenticated) => authenticated,
            Err(failure) => {
                self.ctx.metrics.auth_failure(failure.label());
                // Debug formatting escapes control characters: a client id cannot forge
                // log lines.
                tracing::info!(client_id = ?request.client_id, reason = %failure, "refused CONNECT");
                return Err(ConnectReturnCode::NotAuthorized);
            }
        };
        let device = authenticated.device.device_id.clone();
        let generation_id = authenticated.device.generation_id.clone();
        let sessions = &self.ctx.sessions;
        let restored = if request.clean_session {
            sessions.remove(&device).await.map(|()| None)
        } else {
            sessions.load(&device).await
        };
        let (session_present, subscriptions) = match restored {
            Ok(Some(session)) if session.belongs_to(&generation_id) => {
                (true, session.subscriptions)
            }
            // A session left by an earlier device under this id (deleted, then created
            // again) is not this device's: it starts afresh, and the save below
            // replaces the stale record.
            Ok(Some(_)) | Ok(None) => (false, BTreeSet::new()),
            Err(err) => {
                tracing::warn!(%device, error = %err, "cannot load session");
                return Err(ConnectReturnCode::ServiceUnavailable);
            }
        };
        let fresh = StoredSession {
            generation_id: generation_id.clone(),
            subscriptions: BTreeSet::new(),
        };
        if !request.clean_session
            && !session_present
            && let Err(err) = sessions.save(&device, &fresh).await
        {
            tracing::warn!(%device, error = %err, "cannot create session");
            return Err(ConnectReturnCode::ServiceUnavailable);
        }
        // Checked: `se` is bounded by the authenticator, but a deadline that cannot be
        // represented must refuse the CONNECT, never panic the task.
        let expires_at = match authenticated.expires_at {
            Some(expiry) => {
                let left = Duration::from_secs(expiry.saturating_sub(crate::auth::unix_now()));
                match Instant::now().checked_add(left) {
                    Some(at) => Some(at),
                    None => {
                        self.ctx.metrics.auth_failure("token_lifetime_too_long");
                        tracing::info!(%device, "refused CONNECT: credential expiry out of range");
                        return Err(ConnectReturnCode::NotAuthorized);
                    }
                }
            }
            None => None,
        };
        let credential = authenticated.credential;
        let registration = self.ctx.connections.register(&device, credential.clone());
        let registered = Registered::connected(
            self.ctx.connections.clone(),
            self.ctx.presence.clone(),
            Arc::clone(&self.ctx.services.events),
            device.clone(),
            registration.connection,
        );
        // A disable, delete or credential change that landed after the registry read
        // above but before the registration found no connection to close: look again
        // now that revocations can see this one.
        if let Err(failure) = self.ctx.authenticator.recheck(&device, &credential).await {
            drop(registered);
            self.ctx.metrics.auth_failure(failure.label());
            tracing::info!(%device, reason = %failure, "refused CONNECT: device changed while connecting");
            return Err(ConnectReturnCode::NotAuthorized);
        }
        tracing::debug!(%device, method = ?authenticated.method, session_present, "device connected");
        self.device = Some(Authenticated {
            device: device.clone(),
            method: authenticated.method,
            registration,
            _registered: registered,
            reported: None,
            generation_id,
            model_id: request
                .username
                .as_deref()
                .and_then(topic::connect_model_id),
        });
        Ok(Accepted {
            device_id: device,
            expires_at,
            session_present,
            subscriptions,
        })
    }

    /// Acknowledges one message once it is durable; whether it was stored.
    /// Hands the staged telemetry to the store as one batch. Submitting in packet
    /// order keeps the device's messages in order; it waits while the store is
    /// behind, which stops this connection reading.
    async fn submit_staged(&mut self) {
        if self.staged.messages.is_empty() {
            return;
        }
        let Staged { messages, acks } = std::mem::take(&mut self.staged);
        let count = messages.len();
        let telemetry = Arc::clone(&self.ctx.services.telemetry);
        match telemetry.submit(messages).await {
            Ok(durable) => {
                self.pending_messages += count;
                self.ingests.push_back(PendingIngest {
                    acks,
                    messages: count,
                    durable,
                });
            }
            Err(err) => {
                self.ingested(&acks, 0, Err(err));
            }
        }
    }

    /// Acknowledges a batch that became durable (or closes the connection when it
    /// did not) and returns how many messages were stored.
    fn ingested(&mut self, acks: &[u16], messages: usize, result: Result<(), IngestError>) -> u64 {
        self.pending_messages = self.pending_messages.saturating_sub(messages);
        match result {
            Ok(()) => {
                for &pkid in acks {
                    self.actions
                        .push(Action::Send(Packet::PubAck(PubAck::new(pkid))));
                }
                messages as u64
            }
            Err(err) => {
                // Never acknowledge what is not durable: the device will resend.
                tracing::warn!(error = %err, "telemetry not stored; closing without PUBACK");
                self.session
                    .close(CloseReason::IngestFailed, &mut self.actions);
                0
            }
        }
    }

    /// Counts `stored` messages and marks the device active, once per batch of
    /// completions rather than per message and at most once per
    /// [`ACTIVITY_RESOLUTION`] (the presence table is shared by every connection).
    fn count_stored(&mut self, stored: u64) {
        if stored == 0 {
            return;
        }
        self.ctx
            .metrics
            .messages_in
            .fetch_add(stored, Ordering::Relaxed);
        let now = Instant::now();
        if self
            .last_activity
            .is_some_and(|last| now.duration_since(last) < ACTIVITY_RESOLUTION)
        {
            return;
        }
        if let Some(device) = &self.device {
            self.last_activity = Some(now);
            self.ctx
                .presence
                .touch(&device.device, OffsetDateTime::now_utc());
        }
    }

    fn twin_reply(&mut self, rid: &str, reply: TwinReply) {
        let message = Outbound {
            topic: topic::twin_response(reply.status, rid, reply.version),
            payload: reply.body,
            qos: QoS::AtMostOnce,
            requires: None::<Subscription>,
            id: 0,
        };
        if let Err(err) = self.session.deliver(message, &mut self.actions) {
            tracing::debug!(error = %err, "twin reply dropped");
        }
    }

    async fn flush(&mut self) -> Result<(), CloseReason> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {
                self.wbuf.clear();
                Ok(())
            }
            Ok(Err(err)) => Err(CloseReason::Io(err.to_string())),
            Err(_) => Err(CloseReason::SlowConsumer),
        }
    }

    async fn finish(&mut self, reason: CloseReason) {
        // What the session sent last (a refusing CONNACK) still goes out.
        if self.flush().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
        }
        // Dropping the registration guard releases the connection's place.
        self.device = None;
        match &reason {
            CloseReason::ClientDisconnected | CloseReason::PeerClosed | CloseReason::Shutdown => {
                tracing::debug!(?reason, "connection closed");
            }
            _ => tracing::info!(?reason, "connection closed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::auth::device::{Credential, Proof};

    /// Records `disconnected` calls.
    #[derive(Default)]
    struct Events(Mutex<Vec<(DeviceId, u64)>>);

    impl ConnectionEvents for Events {
        fn subscriptions(&self, _: &DeviceId, _: u64, _: &BTreeSet<Subscription>) {}
        fn disconnected(&self, device: &DeviceId, connection: u64) {
            self.0.lock().unwrap().push((device.clone(), connection));
        }
    }

    fn credential() -> Credential {
        Credential {
            generation_id: "g".into(),
            proof: Proof::DeviceCa,
        }
    }

    #[test]
    fn the_registration_guard_releases_everything_when_the_task_panics() {
        let connections = Connections::default();
        let presence = Presence::default();
        let events = Arc::new(Events::default());
        let device = DeviceId::parse("d").unwrap();
        let registration = connections.register(&device, credential());
        let guard = Registered::connected(
            connections.clone(),
            presence.clone(),
            events.clone(),
            device.clone(),
            registration.connection,
        );
        assert!(presence.get(&device).unwrap().connected);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _guard = guard;
            panic!("connection task failed");
        }));
        assert!(panicked.is_err());
        assert!(!connections.is_connected(&device));
        assert!(!presence.get(&device).unwrap().connected);
        assert_eq!(
            *events.0.lock().unwrap(),
            vec![(device, registration.connection)]
        );
    }

    #[test]
    fn a_replaced_connection_leaves_its_successor_in_place() {
        let connections = Connections::default();
        let presence = Presence::default();
        let events = Arc::new(Events::default());
        let device = DeviceId::parse("d").unwrap();
        let old = connections.register(&device, credential());
        let old_guard = Registered::connected(
            connections.clone(),
            presence.clone(),
            events.clone(),
            device.clone(),
            old.connection,
        );
        let new = connections.register(&device, credential());
        let _new_guard = Registered::connected(
            connections.clone(),
            presence.clone(),
            events.clone(),
            device.clone(),
            new.connection,
        );
        drop(old_guard);
        assert!(connections.is_connected(&device));
        assert!(presence.get(&device).unwrap().connected);
        // The services hear about the old connection only; they keep the new one's state.
        assert_eq!(*events.0.lock().unwrap(), vec![(device, old.connection)]);
    }
}
