//! The log as an audit trail: `GET /v1/events` reads it, `GET /v1/events/stream` follows it
//! (server-sent events).
//!
//! Old events are read from the log file over a read-only SQLite connection of their own,
//! not through the engine: an audit query over a long log must not hold up the one task
//! that decides. New events come from the engine's broadcast of durable events
//! ([`Engine::subscribe_events`](crate::engine::Engine::subscribe_events)); whatever a
//! subscriber misses (it lagged, or the event was decided before it subscribed) is in the
//! log, so a gap in the sequence numbers is filled from there.

use super::{ApiError, AppState, Route, ServerCode};
use crate::auth::Principal;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::{Extension, Json};
use hale_core::health::QuarantineAction;
use hale_core::{AgentName, Event, Timestamp};
use hale_proto::EventInfo;
use hale_store::{Log, Record, RecordError, StoreError};
use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// Events one `GET /v1/events` answers at most, and by default.
pub const EVENTS_LIMIT_MAX: usize = 10_000;
const EVENTS_LIMIT_DEFAULT: usize = 1_000;
/// Events read from the log at a time while a stream catches up.
const STREAM_PAGE: usize = 1_000;
/// Server-sent events a stream may have queued for a slow client before it waits.
const STREAM_QUEUE: usize = 256;

pub fn routes() -> Vec<Route> {
    vec![Route::get("/v1/events", list), Route::get("/v1/events/stream", stream)]
}

/// The query of `GET /v1/events` and `GET /v1/events/stream`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Documents the query; the handlers read it for typed errors.
struct EventsQuery {
    /// Only events about this agent.
    agent: Option<String>,
    /// Only events of these kinds, separated by commas.
    kind: Option<String>,
    /// Only events logged at or after this time: ms since the epoch, or RFC 3339.
    since: Option<String>,
    /// Only events after this sequence number.
    after: Option<u64>,
    /// At most this many, 1 to 10000 (default 1000; `GET /v1/events` only).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u64>,
}

// The document's maximum above is a literal; keep it the limit.
const _: () = assert!(EVENTS_LIMIT_MAX == 10_000);

/// Which events a reader wants.
#[derive(Clone, Debug, Default)]
struct Filter {
    agent: Option<AgentName>,
    /// Any of these kinds (all if empty).
    kinds: Vec<String>,
    /// Logged at or after this time (ms since the epoch).
    since_ms: Option<u64>,
}

impl Filter {
    fn parse(query: &HashMap<String, String>) -> Result<Filter, ApiError> {
        let agent = query.get("agent").filter(|agent| !agent.is_empty()).map(AgentName::new).transpose()?;
        let kinds = query
            .get("kind")
            .map(|kinds| kinds.split(',').map(str::trim).filter(|kind| !kind.is_empty()).map(str::to_string).collect())
            .unwrap_or_default();
        let since_ms = match query.get("since").filter(|since| !since.is_empty()) {
            None => None,
            Some(since) => Some(parse_time_ms(since).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "since {since:?} is neither milliseconds since the epoch nor an RFC 3339 time (2025-01-31T12:00:00Z)"
                ))
            })?),
        };
        Ok(Filter { agent, kinds, since_ms })
    }

    fn matches(&self, info: &EventInfo, event: Option<&Event>) -> bool {
        if self.since_ms.is_some_and(|since| info.at_ms < since) {
            return false;
        }
        if !self.kinds.is_empty() && !self.kinds.contains(&info.kind) {
            return false;
        }
        match (&self.agent, event) {
            (None, _) => true,
            (Some(agent), Some(event)) => concerns(event, agent),
            (Some(_), None) => false,
        }
    }
}

fn number(query: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    match query.get(name).filter(|text| !text.is_empty()) {
        None => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("{name} {text:?} is not a non-negative whole number"))),
    }
}

/// `GET /v1/events?agent=A&kind=K[,K…]&since=T&after=SEQ&limit=N`: events in log order.
#[utoipa::path(get, path = "/v1/events", tag = "operations", params(EventsQuery),
    responses((status = 200, description = "events in log order (admin)", body = Vec<EventInfo>)))]
async fn list(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Vec<EventInfo>>, ApiError> {
    principal.require_admin("reading the event log")?;
    let filter = Filter::parse(&query)?;
    let after = number(&query, "after")?.unwrap_or(0);
    let limit = number(&query, "limit")?.map_or(EVENTS_LIMIT_DEFAULT, |limit| limit as usize);
    if limit == 0 || limit > EVENTS_LIMIT_MAX {
        return Err(ApiError::bad_request(format!(
            "limit {limit} is out of range: ask for 1 to {EVENTS_LIMIT_MAX} events and page on with after=SEQ"
        )));
    }
    if app.events_copied.is_some() {
        // A node of a cluster: only the leader answers (linearizably), once its copy of
        // the committed records has everything it has acknowledged.
        app.engine.read(|_| ()).await?;
        copied_up_to_durable(&app).await?;
    }
    let (path, keys) = (app.log_path.clone(), app.keys.clone());
    let page = tokio::task::spawn_blocking(move || read_log(&path, keys.as_deref(), after, None, &filter, limit))
        .await
        .map_err(|_| log_unreadable("the reading task failed"))??;
    Ok(Json(page.events))
}

/// `GET /v1/events/stream`: server-sent events, from `after=SEQ` (or the `Last-Event-ID`
/// header, or `since`), else from now. Each event is `id: SEQ` and `data: EventInfo`;
/// a reader that falls too far behind gets `event: lagged` with `{"after": SEQ}` and the
/// stream ends: reconnect with that `after`.
#[utoipa::path(get, path = "/v1/events/stream", tag = "operations", params(EventsQuery),
    responses((status = 200, description = "server-sent events: `id: SEQ`, `data: EventInfo`; `event: lagged` ends it (admin)",
        body = EventInfo, content_type = "text/event-stream")))]
async fn stream(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    principal.require_admin("following the event log")?;
    let filter = Filter::parse(&query)?;
    let last_event_id =
        headers.get("last-event-id").and_then(|value| value.to_str().ok()).and_then(|id| id.parse().ok());
    let after = number(&query, "after")?.or(last_event_id);
    // Subscribe first, then wait until everything decided before is durable: from here on
    // every event is either in the log already or will be broadcast.
    let live = app.engine.subscribe_events();
    app.engine.read(|_| ()).await?;
    copied_up_to_durable(&app).await?;
    let path = app.log_path.clone();
    let start = match (after, filter.since_ms) {
        (Some(after), _) => after,
        (None, Some(_)) => 0,
        (None, None) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Log::open_read_only(&path)?.last_seq())
                .await
                .map_err(|_| log_unreadable("the reading task failed"))?
                .map_err(|error| log_unreadable(&error.to_string()))?
        }
    };
    let (sender, receiver) = mpsc::channel(STREAM_QUEUE);
    let keys = app.keys.clone();
    let follower = Follower { path, keys, filter, last: start, sender, shutdown: app.shutdown.clone() };
    tokio::spawn(follower.run(live));
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|event| (Ok(event), receiver))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// One stream's reader: catches up from the log, then follows the broadcast.
struct Follower {
    path: PathBuf,
    /// Opens sealed records (encryption at rest).
    keys: Option<std::sync::Arc<hale_store::Keyring>>,
    filter: Filter,
    /// The last sequence number dealt with (sent or filtered out).
    last: u64,
    sender: mpsc::Sender<SseEvent>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Why a follower stops.
struct Gone;

impl Follower {
    async fn run(mut self, mut live: broadcast::Receiver<Arc<crate::engine::DurableEvent>>) {
        if self.catch_up(None).await.is_err() {
            return;
        }
        let mut shutdown = self.shutdown.clone();
        loop {
            let received = tokio::select! {
                _ = self.sender.closed() => return,
                _ = shutdown.wait_for(|stopping| *stopping) => return,
                received = live.recv() => received,
            };
            match received {
                Ok(durable) => {
                    if durable.seq <= self.last {
                        continue;
                    }
                    if durable.seq > self.last + 1 && self.catch_up(Some(durable.seq - 1)).await.is_err() {
                        return;
                    }
                    self.last = durable.seq;
                    let info = info(durable.seq, durable.at, &durable.event);
                    if self.filter.matches(&info, Some(&durable.event)) && self.send(&info).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let data = serde_json::json!({ "after": self.last, "missed": missed }).to_string();
                    let _ = self.sender.send(SseEvent::default().event("lagged").data(data)).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Sends what the log holds after `last` (up to `until`), page by page.
    async fn catch_up(&mut self, until: Option<u64>) -> Result<(), Gone> {
        loop {
            let (path, keys, filter, after) = (self.path.clone(), self.keys.clone(), self.filter.clone(), self.last);
            let page = tokio::task::spawn_blocking(move || {
                read_log(&path, keys.as_deref(), after, until, &filter, STREAM_PAGE)
            })
            .await;
            let page = match page {
                Ok(Ok(page)) => page,
                Ok(Err(error)) => return Err(self.fail(error).await),
                Err(_) => return Err(self.fail(log_unreadable("the reading task failed")).await),
            };
            for info in &page.events {
                self.send(info).await?;
            }
            self.last = self.last.max(page.scanned_to);
            if !page.full {
                return Ok(());
            }
        }
    }

    async fn send(&self, info: &EventInfo) -> Result<(), Gone> {
        let data = serde_json::to_string(info).expect("event infos serialize");
        self.sender.send(SseEvent::default().id(info.seq.to_string()).data(data)).await.map_err(|_| Gone)
    }

    async fn fail(&self, error: ApiError) -> Gone {
        let data = serde_json::to_string(&hale_proto::HttpError { error: error.body }).expect("errors serialize");
        let _ = self.sender.send(SseEvent::default().event("error").data(data)).await;
        Gone
    }
}

/// On a node of a cluster, waits until the events table holds every record the engine
/// has made durable (the copy follows the state machine by a few milliseconds).
async fn copied_up_to_durable(app: &AppState) -> Result<(), ApiError> {
    let Some(copied) = &app.events_copied else {
        return Ok(());
    };
    let target = app.engine.durability().durable_seq;
    let mut copied = copied.clone();
    match tokio::time::timeout(Duration::from_secs(5), copied.wait_for(|copied| *copied >= target)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(log_unreadable(&format!(
            "this node's events table has not caught up with the committed log (record {target}); try again"
        ))),
    }
}

fn log_unreadable(reason: &str) -> ApiError {
    ApiError::coded(
        StatusCode::SERVICE_UNAVAILABLE,
        ServerCode::LogUnavailable,
        format!("the log cannot be read: {reason}"),
        true,
    )
}

/// What one read of the log found.
struct Page {
    events: Vec<EventInfo>,
    /// The last record read (`after` if none).
    scanned_to: u64,
    /// Stopped at the limit: there may be more.
    full: bool,
}

enum Stop {
    Full,
    Until,
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(error: StoreError) -> Stop {
        Stop::Store(error)
    }
}

/// Reads the records after `after` (up to `until`) that pass `filter`, at most `limit`.
fn read_log(
    path: &Path,
    keys: Option<&hale_store::Keyring>,
    after: u64,
    until: Option<u64>,
    filter: &Filter,
    limit: usize,
) -> Result<Page, ApiError> {
    let log = Log::open_read_only(path).map_err(|error| log_unreadable(&error.to_string()))?;
    // Records before `since` are skipped without being read.
    let after = match filter.since_ms {
        Some(since) => {
            let skip_to = log.seq_before_time(after, since).map_err(|error| log_unreadable(&error.to_string()))?;
            until.map_or(skip_to, |until| skip_to.min(until.max(after)))
        }
        None => after,
    };
    let mut page = Page { events: Vec::new(), scanned_to: after, full: false };
    let scanned = log.scan(after, |record: Record| {
        if until.is_some_and(|until| record.seq > until) {
            return Err(Stop::Until);
        }
        page.scanned_to = record.seq;
        let (info, event) = match record.open(keys) {
            Ok(event) => (info(record.seq, record.at, &event), Some(event)),
            Err(error) => (damaged(&record, &error), None),
        };
        if filter.matches(&info, event.as_ref()) {
            page.events.push(info);
            if page.events.len() >= limit {
                page.full = true;
                return Err(Stop::Full);
            }
        }
        Ok(())
    });
    match scanned {
        Ok(()) | Err(Stop::Full) | Err(Stop::Until) => Ok(page),
        Err(Stop::Store(error)) => Err(log_unreadable(&error.to_string())),
    }
}

/// The one place records become events here: hale-store's decode (which checks the
/// checksum and, once records are encrypted at rest, decrypts).
fn damaged(record: &Record, error: &RecordError) -> EventInfo {
    EventInfo {
        seq: record.seq,
        at_ms: record.at.0,
        kind: "damaged".to_string(),
        agent: None,
        summary: format!("record {} cannot be read: {error} (`hale verify` says more)", record.seq),
        event: serde_json::Value::Null,
    }
}

/// An event as readers see it.
pub fn info(seq: u64, at: Timestamp, event: &Event) -> EventInfo {
    // The log's shape is `{"kind": {fields}}`: show the fields; the kind has its own field.
    let event_json = match serde_json::to_value(event).expect("events serialize") {
        serde_json::Value::Object(map) if map.len() == 1 => map.into_iter().next().map(|(_, fields)| fields).unwrap(),
        other => other,
    };
    EventInfo {
        seq,
        at_ms: at.0,
        kind: event.kind().to_string(),
        agent: subject(event).map(ToString::to_string),
        summary: summary(event),
        event: event_json,
    }
}

/// The agent an event is about, for readers: the core's notion, plus the agent that
/// holds a lease, sends a message or owns tokens.
fn subject(event: &Event) -> Option<&AgentName> {
    event.agent().or(match event {
        Event::TaskAssigned { agent, .. }
        | Event::TokensIssued { agent, .. }
        | Event::TokensRefreshed { agent, .. }
        | Event::TokensRevoked { agent, .. } => Some(agent),
        Event::MessageSent { from, .. } => Some(from),
        Event::ConversationEnded { by, .. } => Some(by),
        _ => None,
    })
}

/// Whether `event` concerns `agent` (a message concerns its sender and its recipient).
fn concerns(event: &Event, agent: &AgentName) -> bool {
    subject(event) == Some(agent) || matches!(event, Event::MessageSent { to, .. } if to == agent)
}

/// One line for people.
pub fn summary(event: &Event) -> String {
    match event {
        Event::AgentRegistered { agent, role, .. } => format!("{agent} registered as role {role}"),
        Event::IncarnationStarted { agent, incarnation } => format!("{agent}: incarnation {incarnation} started"),
        Event::Checkpointed { agent, incarnation, version, .. } => {
            format!("{agent}/{incarnation} checkpointed version {version}")
        }
        Event::RecoveryPointMarked { agent, name, version, .. } => {
            format!("{agent}: version {version} marked as recovery point {name:?}")
        }
        Event::RolledBack { agent, target_version, version, .. } => {
            format!("{agent} rolled back to version {target_version} (as version {version})")
        }
        Event::AgentDeclared { agent, role, .. } => format!("{agent} declared as a managed agent of role {role}"),
        Event::ProcessStarted { agent, incarnation, process } => {
            format!("{agent}: process {} started for incarnation {incarnation}", process.pid)
        }
        Event::AgentDown { agent, incarnation, cause } => {
            format!("{agent}: incarnation {incarnation} DOWN ({}: {cause})", cause.detector())
        }
        Event::RestartScheduled { agent, attempt, due } => {
            format!("{agent}: restart {attempt} scheduled (due at {})", format_time_ms(due.0))
        }
        Event::AgentFailed { agent, restarts, window_ms } => {
            format!("{agent} FAILED: {restarts} restarts within {window_ms} ms; not restarted until `hale restart`")
        }
        Event::RestartRequested { agent } => format!("{agent}: restart requested by the operator"),
        Event::ProgressReported { agent, incarnation, progress } => {
            let fraction = progress.fraction.map(|fraction| format!(" {:.0}%", fraction * 100.0)).unwrap_or_default();
            let message = progress.message.as_deref().map(|message| format!(" {message}")).unwrap_or_default();
            format!("{agent}/{incarnation} progress{fraction}{message}")
        }
        Event::BreakerOpened { agent, errors, .. } => format!("{agent}: breaker OPEN after {errors} errors"),
        Event::BreakerHalfOpened { agent } => format!("{agent}: breaker half-open, probing"),
        Event::BreakerClosed { agent } => format!("{agent}: breaker closed"),
        Event::ViolationReported { agent, by, severity, reason } => {
            format!("{agent}: {} violation reported by {by}: {reason}", format!("{severity:?}").to_lowercase())
        }
        Event::Quarantined { agent, by, reason, action } => match action {
            QuarantineAction::Isolate => format!("{agent} QUARANTINED by {by}: {reason}"),
            action => format!("{agent} QUARANTINED by {by} ({}): {reason}", action.as_str()),
        },
        Event::Released { agent } => format!("{agent} released from quarantine"),
        Event::RoleDeclared { role, min, max, .. } => format!("role {role} declared as a pool of {min} to {max}"),
        Event::TaskSubmitted { task, spec, parent, by } => {
            let priority = format!("{:?}", spec.priority).to_lowercase();
            let parent =
                parent.as_ref().map(|parent| format!(" (child of task {})", parent.task())).unwrap_or_default();
            let by = by.as_ref().map(|by| format!(" by {by}")).unwrap_or_default();
            format!("task {task} submitted{by} for role {} ({priority}){parent}", spec.role)
        }
        Event::OutcomeTaken { agent, task } => format!("{agent} took the outcome of task {task}"),
        Event::TaskShadowed { task, children } => format!("task {task} shadowed as tasks {children:?}"),
        Event::TaskAssigned { task, agent, incarnation, attempt, .. } => {
            format!("task {task} assigned to {agent}/{incarnation} (attempt {attempt})")
        }
        Event::StepIntended { task, name, .. } => format!("task {task}: step {name:?} begun"),
        Event::StepCommitted { task, name, .. } => format!("task {task}: step {name:?} committed"),
        Event::TaskCompleted { task, level, .. } => format!("task {task} completed at {level}"),
        Event::TaskRetried { task, reason, .. } => format!("task {task} retried: {reason}"),
        Event::TaskFailed { task, reason } => format!("task {task} FAILED: {reason}"),
        Event::TaskCancelled { task } => format!("task {task} cancelled"),
        Event::TaskCompensating { task, step, child, .. } => {
            format!("task {task} compensating step {step:?} (task {child})")
        }
        Event::CompensationFailed { task, step, reason } => {
            format!("task {task}: compensation of step {step:?} failed: {reason}")
        }
        Event::TaskArbitrated { task, agreed, dissent } => {
            format!("task {task} arbitrated: {} agreed, {} dissented", agreed.len(), dissent.len())
        }
        Event::ModeChanged { mode, serving, roles } => {
            format!("system mode {mode} ({serving} of {roles} roles have a healthy agent)")
        }
        Event::BudgetReserved { agent, reservation, spend, .. } => {
            format!("{agent} reserved {} tokens, cost {} (reservation {reservation})", spend.tokens, spend.cost)
        }
        Event::SpendReported { agent, spend, .. } => {
            format!("{agent} spent {} tokens, cost {}", spend.tokens, spend.cost)
        }
        Event::TokensIssued { agent, generation, .. } => format!("{agent}: tokens issued (generation {generation})"),
        Event::TokensRefreshed { agent, .. } => format!("{agent}: refresh token rotated"),
        Event::TokensRevoked { agent, reason } => format!("{agent}: every token REVOKED: {reason}"),
        Event::BudgetBreached { agent, incarnation, detail, .. } => {
            format!("{agent}/{incarnation} BUDGET BREACHED: {detail}")
        }
        Event::MessageSent { id, from, to, conversation, .. } => {
            format!("message {id} from {from} to {to} (conversation {conversation})")
        }
        Event::MessageAcked { agent, seq } => format!("{agent} acked message {seq} of its mailbox"),
        Event::ConversationEnded { conversation, by } => format!("conversation {conversation} ended by {by}"),
        Event::HookDelivered { hook, kind, seq, attempts } => {
            format!("hook {hook} told of event {seq} ({kind}) at attempt {attempts}")
        }
        Event::HookFailed { hook, kind, seq, attempts, error } => {
            format!("hook {hook} FAILED to tell of event {seq} ({kind}) after {attempts} attempts: {error}")
        }
        Event::NodeJoined { node, info } => format!("node {node} (id {}, {}) is up", info.id, info.address),
        Event::NodeLost { node, silent_ms } => format!("node {node} LOST: not heard from for {silent_ms} ms"),
        Event::AgentPlaced { agent, incarnation, node } => {
            format!("{agent}: incarnation {incarnation} placed on {node}")
        }
        Event::AgentPending { agent, reason } => format!("{agent} PENDING: {reason}"),
    }
}

/// Milliseconds since the epoch, from a whole number or an RFC 3339 time
/// (`2025-01-31T12:00:00Z`, `2025-01-31T13:00:00.250+01:00`).
pub fn parse_time_ms(text: &str) -> Option<u64> {
    if let Ok(ms) = text.parse::<u64>() {
        return Some(ms);
    }
    let text = text.trim();
    let (date, rest) = text.split_once(['T', 't', ' '])?;
    let mut date_parts = date.splitn(3, '-');
    let year: i64 = date_parts.next()?.parse().ok()?;
    let month: u32 = date_parts.next()?.parse().ok()?;
    let day: u32 = date_parts.next()?.parse().ok()?;
    let zone_at = rest.find(['Z', 'z', '+', '-'])?;
    let (clock, zone) = rest.split_at(zone_at);
    let mut clock_parts = clock.splitn(3, ':');
    let hour: u32 = clock_parts.next()?.parse().ok()?;
    let minute: u32 = clock_parts.next()?.parse().ok()?;
    let seconds_text = clock_parts.next()?;
    let (second, fraction) = seconds_text.split_once('.').unwrap_or((seconds_text, ""));
    let second: u32 = second.parse().ok()?;
    let millis: u64 = if fraction.is_empty() {
        0
    } else {
        if !fraction.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        format!("{fraction:0<3}")[..3].parse().ok()?
    };
    let offset_minutes: i64 = match zone {
        "Z" | "z" => 0,
        _ => {
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            let (hours, minutes) = zone[1..].split_once(':')?;
            sign * (hours.parse::<i64>().ok()? * 60 + minutes.parse::<i64>().ok()?)
        }
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let seconds =
        days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second) - offset_minutes * 60;
    u64::try_from(seconds).ok().map(|seconds| seconds * 1000 + millis)
}

/// `2025-01-31T12:00:00.250Z` for milliseconds since the epoch (UTC).
pub fn format_time_ms(ms: u64) -> String {
    let seconds = (ms / 1000) as i64;
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_and_format() {
        let cases = [
            ("1970-01-01T00:00:00Z", 0),
            ("2025-01-31T12:00:00Z", 1_738_324_800_000),
            ("2025-01-31T13:00:00.25+01:00", 1_738_324_800_250),
            ("2024-02-29T23:59:59.999-00:30", 1_709_252_999_999),
            ("1738324800000", 1_738_324_800_000),
        ];
        for (text, ms) in cases {
            assert_eq!(parse_time_ms(text), Some(ms), "{text}");
        }
        assert_eq!(format_time_ms(1_738_324_800_250), "2025-01-31T12:00:00.250Z");
        assert_eq!(parse_time_ms(&format_time_ms(1_709_252_999_999)), Some(1_709_252_999_999));
        for bad in ["", "yesterday", "2025-13-01T00:00:00Z", "2025-01-31T12:00:00", "2025-01-31T25:00:00Z"] {
            assert_eq!(parse_time_ms(bad), None, "{bad}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscribers_get_durable_events_once_in_order_and_hear_when_they_lag() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
        let server = crate::start(config).await.unwrap();
        let engine = server.engine().clone();
        let mut live = engine.subscribe_events();
        let body = hale_proto::HelloBody { role: "r".into(), labels: Default::default(), incarnation: None };
        engine.execute(crate::api::wire::hello("a", body).unwrap()).await.unwrap();
        let agent = AgentName::new("a").unwrap();
        let checkpoint =
            |step: u64| crate::api::wire::checkpoint(agent.clone(), 1, serde_json::json!({"step": step}), None);
        engine.execute(checkpoint(1)).await.unwrap();
        let mut kinds = Vec::new();
        for expected_seq in 1..=3 {
            let durable = live.recv().await.unwrap();
            assert_eq!(durable.seq, expected_seq);
            assert!(engine.durability().durable_seq >= durable.seq, "published only once durable");
            kinds.push(durable.event.kind());
        }
        assert_eq!(kinds, ["agent_registered", "incarnation_started", "checkpointed"]);
        // A subscriber that reads nothing while more than the buffer goes by is told so.
        for step in 0..crate::engine::EVENTS_BUFFERED as u64 + 10 {
            engine.execute(checkpoint(step + 2)).await.unwrap();
        }
        assert!(matches!(live.recv().await, Err(broadcast::error::RecvError::Lagged(_))));
        // What it missed is in the log, which a reader resumes from.
        let page = read_log(&dir.path().join("hale.db"), None, 3, None, &Filter::default(), 5).unwrap();
        assert_eq!(page.events.iter().map(|event| event.seq).collect::<Vec<_>>(), [4, 5, 6, 7, 8]);
        assert!(page.full);
        server.shutdown().await.unwrap();
    }

    #[test]
    fn a_message_concerns_both_ends_and_fields_are_unwrapped() {
        let (from, to) = (AgentName::new("a").unwrap(), AgentName::new("b").unwrap());
        let event = Event::MessageSent {
            id: 1,
            seq: 1,
            from: from.clone(),
            to: to.clone(),
            conversation: hale_core::ConversationId::new("c").unwrap(),
            body: serde_json::json!({}),
            reply_to: None,
            expects_reply: false,
            key: None,
        };
        assert!(concerns(&event, &from) && concerns(&event, &to));
        let info = info(7, Timestamp(5), &event);
        assert_eq!((info.kind.as_str(), info.agent.as_deref()), ("message_sent", Some("a")));
        assert_eq!(info.event["to"], "b");
    }
}
