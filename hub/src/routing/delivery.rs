//! Delivery: the compiled route table, and one worker per endpoint, source log and
//! partition that reads the durable log behind its own durable cursor, picks the
//! messages routed to its endpoint, adds enrichments, delivers them in order with
//! exponential backoff up to `routing.retry_for`, then dead-letters. Ingest never
//! waits for a worker, and a slow endpoint only holds up its own workers.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

use super::condition::{Condition, MessageRow, twin_path, twin_value};
use super::config::{BUILT_IN_ENDPOINT, ConfigError, Route, RoutingConfig, Source};
use super::endpoints::{self, Endpoint, Outgoing, to_ingest};
use super::events::{EventKind, OP_TYPE_PROPERTY};
use super::metrics::EndpointMetrics;
use crate::registry::DeviceId;
use crate::telemetry::message::StoredMessage;
use crate::telemetry::{Telemetry, TelemetryError};
use crate::twins::Twins;
use crate::twins::query::Row;

/// A route, compiled.
#[derive(Debug, Clone)]
pub struct CompiledRoute {
    /// As configured.
    pub route: Route,
    condition: Condition,
    /// Its endpoint, lower-cased.
    endpoint: String,
}

impl CompiledRoute {
    fn compile(route: &Route) -> Result<Self, ConfigError> {
        Ok(Self {
            route: route.clone(),
            condition: Condition::compile(&route.condition).map_err(|err| ConfigError {
                path: "condition".into(),
                message: err.to_string(),
            })?,
            endpoint: route
                .endpoint_names
                .first()
                .map(|n| n.to_ascii_lowercase())
                .unwrap_or_default(),
        })
    }
}

/// What an enrichment's value is.
#[derive(Debug, Clone)]
enum EnrichmentValue {
    Static(String),
    Twin(Vec<String>),
    HubName,
}

#[derive(Debug, Clone)]
struct CompiledEnrichment {
    key: String,
    value: EnrichmentValue,
    endpoints: BTreeSet<String>,
}

/// The routes, fallback and enrichments of one configuration, compiled once.
#[derive(Debug, Clone)]
pub struct Table {
    routes: Vec<CompiledRoute>,
    fallback: Option<CompiledRoute>,
    enrichments: Vec<CompiledEnrichment>,
    hostname: String,
}

/// Which routes a message takes (the routing test's answer).
#[derive(Debug, Clone)]
pub struct Matched {
    /// The enabled routes whose source and condition match.
    pub routes: Vec<Route>,
    /// Whether it went to the fallback route (a device message matching no route).
    pub fallback: bool,
}

impl Table {
    /// Compiles a validated configuration.
    pub fn compile(config: &RoutingConfig, hostname: &str) -> Result<Self, ConfigError> {
        let routes = config
            .routes
            .iter()
            .filter(|r| r.is_enabled)
            .map(CompiledRoute::compile)
            .collect::<Result<_, _>>()?;
        let fallback = config
            .fallback_route
            .as_ref()
            .filter(|r| r.is_enabled)
            .map(CompiledRoute::compile)
            .transpose()?;
        let enrichments = config
            .enrichments
            .iter()
            .map(|e| {
                let value = if e.value.eq_ignore_ascii_case("$iothubname") {
                    EnrichmentValue::HubName
                } else if let Some(path) = e.value.strip_prefix("$twin.") {
                    EnrichmentValue::Twin(twin_path(path).map_err(|message| ConfigError {
                        path: "enrichments".into(),
                        message,
                    })?)
                } else {
                    EnrichmentValue::Static(e.value.clone())
                };
                Ok(CompiledEnrichment {
                    key: e.key.clone(),
                    value,
                    endpoints: e
                        .endpoint_names
                        .iter()
                        .map(|n| n.to_ascii_lowercase())
                        .collect(),
                })
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(Self {
            routes,
            fallback,
            enrichments,
            hostname: hostname.to_string(),
        })
    }

    /// Which routes a message of `source` takes.
    pub fn matched(&self, source: Source, row: &dyn Row) -> Matched {
        let routes: Vec<Route> = self
            .routes
            .iter()
            .filter(|r| r.route.source == source && r.condition.matches(row))
            .map(|r| r.route.clone())
            .collect();
        let fallback = routes.is_empty()
            && source == Source::DeviceMessages
            && self
                .fallback
                .as_ref()
                .is_some_and(|f| f.condition.matches(row));
        Matched { routes, fallback }
    }

    /// The fallback route, when enabled.
    pub fn fallback(&self) -> Option<&Route> {
        self.fallback.as_ref().map(|f| &f.route)
    }

    /// Whether a message of `source` goes to `endpoint` (lower-case).
    pub fn routes_to(&self, endpoint: &str, source: Source, row: &dyn Row) -> bool {
        let mut matched_any = false;
        for route in self.routes.iter().filter(|r| r.route.source == source) {
            if route.endpoint != endpoint && matched_any {
                continue;
            }
            if route.condition.matches(row) {
                if route.endpoint == endpoint {
                    return true;
                }
                matched_any = true;
            }
        }
        !matched_any
            && source == Source::DeviceMessages
            && self
                .fallback
                .as_ref()
                .is_some_and(|f| f.endpoint == endpoint && f.condition.matches(row))
    }

    /// The sources whose messages may go to `endpoint` (lower-case).
    pub fn sources_for(&self, endpoint: &str) -> BTreeSet<Source> {
        self.routes
            .iter()
            .chain(self.fallback.iter())
            .filter(|r| r.endpoint == endpoint)
            .map(|r| r.route.source)
            .collect()
    }

    /// The enrichments of messages to `endpoint` (lower-case), resolved for `row`. An
    /// enrichment whose twin path is not set is left out.
    pub fn enrichments_for(&self, endpoint: &str, row: &MessageRow<'_>) -> Vec<(String, String)> {
        self.enrichments
            .iter()
            .filter(|e| e.endpoints.contains(endpoint))
            .filter_map(|e| {
                let value = match &e.value {
                    EnrichmentValue::Static(value) => value.clone(),
                    EnrichmentValue::HubName => self.hostname.clone(),
                    EnrichmentValue::Twin(path) => {
                        match crate::twins::query::lookup(row.twin()?.as_object()?, path)? {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        }
                    }
                };
                Some((e.key.clone(), value))
            })
            .collect()
    }
}

/// The event kind of a message of the device-events stream.
pub fn event_kind(message: &StoredMessage) -> Option<EventKind> {
    message
        .properties
        .get(OP_TYPE_PROPERTY)
        .and_then(|op| EventKind::from_op_type(op))
}

/// One source log a worker reads.
#[derive(Clone)]
pub struct SourceLog {
    /// `telemetry` or `device-events`.
    pub name: &'static str,
    /// The log.
    pub log: Arc<Telemetry>,
}

/// Everything one worker needs.
pub struct Worker {
    /// The route table it was started with (a new configuration restarts workers).
    pub table: Arc<Table>,
    /// The endpoint's name, lower-case.
    pub endpoint_name: String,
    /// The endpoint.
    pub endpoint: Arc<dyn Endpoint>,
    /// The log it reads.
    pub source: SourceLog,
    /// The partition it reads.
    pub partition: u32,
    /// Twins, for `$twin` conditions and enrichments.
    pub twins: Twins,
    /// The endpoint's counters.
    pub metrics: Arc<EndpointMetrics>,
    /// Where messages go after `retry_for`.
    pub dead_letters: Arc<Telemetry>,
    /// How long a message is retried.
    pub retry_for: Duration,
    /// The longest pause between attempts.
    pub max_backoff: Duration,
}

/// The cursor (consumer group) of an endpoint in a source log.
pub fn cursor_group(endpoint: &str) -> String {
    format!("$routing/{endpoint}")
}

/// Most messages read at once.
const READ_MAX: usize = 512;
/// How long a read waits for new messages before the worker looks at its stop signal.
const READ_WAIT: Duration = Duration::from_secs(1);
/// How often an advancing cursor is stored (a crash redelivers at most this much).
const CURSOR_EVERY: Duration = Duration::from_millis(200);
/// The first pause after a failed attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A worker's position in its log: the next offset to look at, and what is stored.
struct Cursor {
    group: String,
    next: u64,
    stored: u64,
    last_store: Instant,
}

impl Cursor {
    /// Stores the position if it moved and [`CURSOR_EVERY`] passed (or `now`).
    async fn store(&mut self, log: &Telemetry, partition: u32, endpoint: &str, now: bool) {
        if self.next == self.stored || !(now || self.last_store.elapsed() >= CURSOR_EVERY) {
            return;
        }
        match log.set_checkpoint(&self.group, partition, self.next).await {
            Ok(()) => self.stored = self.next,
            Err(err) => tracing::error!(%endpoint, %err, "routing: cannot store the cursor"),
        }
        self.last_store = Instant::now();
    }
}

/// Why a worker stopped delivering a batch.
enum Interrupted {
    /// Told to stop.
    Stopped,
}

impl Worker {
    fn label(&self) -> String {
        format!("{}/{}", self.source.name, self.partition)
    }

    /// Reads, routes and delivers until `stop` turns true; stores its cursor on the way
    /// and when stopping.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let group = cursor_group(&self.endpoint_name);
        let log = Arc::clone(&self.source.log);
        let partition = self.partition;
        let cursor = loop {
            let stored = log.checkpoint(&group, partition).await;
            let end = log.partition_info(partition).await;
            match (stored, end) {
                (Ok(Some(cursor)), _) => break cursor,
                // A new endpoint starts at the end: it gets what arrives from now on.
                (Ok(None), Ok(info)) => {
                    let _ = log.set_checkpoint(&group, partition, info.end_offset).await;
                    break info.end_offset;
                }
                (Err(err), _) | (_, Err(err)) => {
                    tracing::error!(endpoint = %self.endpoint_name, %err, "routing: cannot read the cursor");
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            }
        };
        let mut cursor = Cursor {
            group,
            next: cursor,
            stored: cursor,
            last_store: Instant::now(),
        };
        let label = self.label();
        loop {
            let read = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                read = log.read(partition, cursor.next, READ_MAX, READ_WAIT) => read,
            };
            let messages = match read {
                Ok(messages) => messages,
                Err(TelemetryError::BeforeRetention { first, requested }) => {
                    tracing::error!(endpoint = %self.endpoint_name, lost = first - requested, "routing: messages removed by retention before delivery");
                    cursor.next = first;
                    continue;
                }
                Err(err) => {
                    tracing::error!(endpoint = %self.endpoint_name, %err, "routing: cannot read the log");
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let Some(last) = messages.last() else {
                cursor
                    .store(&log, partition, &self.endpoint_name, false)
                    .await;
                continue;
            };
            let end_of_read = last.offset + 1;
            let outgoing = self.select(messages);
            let mut interrupted = false;
            for batch in outgoing.chunks(self.endpoint.max_batch().max(1)) {
                if let Err(Interrupted::Stopped) = self.deliver(batch, &mut stop).await {
                    interrupted = true;
                    break;
                }
                if let Some(last) = batch.last() {
                    cursor.next = last.message.offset + 1;
                    cursor
                        .store(&log, partition, &self.endpoint_name, false)
                        .await;
                }
            }
            if interrupted {
                break;
            }
            cursor.next = end_of_read;
            let idle = !self.busy(cursor.next).await;
            cursor
                .store(&log, partition, &self.endpoint_name, idle)
                .await;
            if let Ok(info) = log.partition_info(partition).await {
                self.metrics
                    .set_lag(&label, info.end_offset.saturating_sub(cursor.next));
            }
        }
        cursor
            .store(&log, partition, &self.endpoint_name, true)
            .await;
    }

    /// Whether more is waiting behind `cursor`.
    async fn busy(&self, cursor: u64) -> bool {
        self.source
            .log
            .partition_info(self.partition)
            .await
            .is_ok_and(|info| info.end_offset > cursor)
    }

    /// The messages of a read that go to this endpoint, enrichments added.
    fn select(&self, messages: Vec<StoredMessage>) -> Vec<Outgoing> {
        let twins = &self.twins;
        let mut out = Vec::new();
        for mut message in messages {
            let (source, event) = if self.source.name == "telemetry" {
                (Source::DeviceMessages, None)
            } else {
                match event_kind(&message) {
                    Some(kind) => (kind.source(), Some(kind)),
                    None => continue,
                }
            };
            let device = message.device_id.clone();
            let twin = move || {
                DeviceId::parse(&device)
                    .ok()
                    .map(|id| twin_value(&twins.twin_of(&id)))
            };
            let row = MessageRow::new(&message, &twin);
            if !self.table.routes_to(&self.endpoint_name, source, &row) {
                continue;
            }
            let enrichments = self.table.enrichments_for(&self.endpoint_name, &row);
            drop(row);
            message.properties.extend(enrichments);
            let id = format!("{}-{}-{}", self.source.name, self.partition, message.offset);
            out.push(Outgoing { message, event, id });
        }
        out
    }

    /// Delivers one batch, retrying with exponential backoff; after `retry_for` the
    /// batch goes to the dead-letter stream instead.
    async fn deliver(
        &self,
        batch: &[Outgoing],
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Interrupted> {
        let mut first_failure: Option<Instant> = None;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let attempt = tokio::select! {
                _ = stop.wait_for(|s| *s) => return Err(Interrupted::Stopped),
                attempt = self.endpoint.deliver(batch) => attempt,
            };
            let err = match attempt {
                Ok(()) => {
                    let now = time::OffsetDateTime::now_utc();
                    for outgoing in batch {
                        let waited = now - outgoing.message.enqueued_time;
                        self.metrics
                            .observe(waited.try_into().unwrap_or(Duration::ZERO));
                    }
                    return Ok(());
                }
                Err(err) => err,
            };
            self.metrics
                .retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let first = first_failure.is_none();
            let since = *first_failure.get_or_insert_with(Instant::now);
            if first {
                tracing::warn!(endpoint = %self.endpoint_name, %err, "routing: delivery failed; retrying with backoff");
            }
            if since.elapsed() >= self.retry_for {
                return self.dead_letter(batch, &err.to_string(), stop).await;
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return Err(Interrupted::Stopped),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }

    /// Puts `batch` in the dead-letter stream (retrying that until it is stored).
    async fn dead_letter(
        &self,
        batch: &[Outgoing],
        reason: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Interrupted> {
        let extra = [
            ("deadLetterEndpoint".to_string(), self.endpoint_name.clone()),
            ("deadLetterReason".to_string(), reason.to_string()),
            ("deadLetterSource".to_string(), self.source.name.to_string()),
        ];
        let messages: Vec<_> = batch
            .iter()
            .filter_map(|o| to_ingest(&o.message, &extra))
            .collect();
        loop {
            let appended = tokio::select! {
                _ = stop.wait_for(|s| *s) => return Err(Interrupted::Stopped),
                appended = endpoints::append(&self.dead_letters, messages.clone()) => appended,
            };
            match appended {
                Ok(()) => {
                    self.metrics
                        .dead_lettered
                        .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(endpoint = %self.endpoint_name, messages = batch.len(), %reason, "routing: gave up after routing.retry_for; dead-lettered");
                    return Ok(());
                }
                Err(err) => {
                    tracing::error!(%err, "routing: cannot store in the dead-letter stream");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Whether `name` is the built-in endpoint (always holds every message: nothing to
/// deliver).
pub fn is_built_in(name: &str) -> bool {
    name.eq_ignore_ascii_case(BUILT_IN_ENDPOINT)
}
