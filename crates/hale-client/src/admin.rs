use crate::error::ClientError;
use hale_proto::{AgentState, AgentSummary, EventInfo, HttpError, NodeSummary};
use serde::de::DeserializeOwned;
use std::sync::{Arc, Mutex};

/// The HTTP API, for tools.
///
/// Given the addresses of several nodes of a cluster, it follows the leader: a request a
/// node answers `not_leader` goes to the leader it names (or, during an election, to the
/// next address, for up to [`FOLLOW_FOR`]), and a node that cannot be reached is passed
/// over for the next. Whether a write was applied is never in doubt when a follower
/// refuses it; a leader that loses its leadership while a write is in flight answers
/// `not_leader` too, and the write is sent again to the new leader, so writes that must
/// not happen twice carry an idempotency key ([`Admin::submit`] adds one).
#[derive(Clone, Debug)]
pub struct Admin {
    bases: Arc<Vec<String>>,
    /// The address that answered last: the leader, once one did.
    current: Arc<Mutex<String>>,
    http: reqwest::Client,
    token: Option<String>,
}

/// How long a request keeps following `not_leader` and unreachable nodes: about two
/// elections at the default timeouts, and a few at the slow ones.
pub const FOLLOW_FOR: std::time::Duration = std::time::Duration::from_secs(5);

impl Admin {
    /// A client of the hale at `base` (e.g. `http://127.0.0.1:7700`), with no token yet;
    /// several nodes of a cluster separated by commas.
    pub fn new(base: &str) -> Admin {
        let bases: Vec<String> = base
            .split(',')
            .map(|one| one.trim().trim_end_matches('/').to_string())
            .filter(|one| !one.is_empty())
            .collect();
        let first = bases.first().cloned().unwrap_or_default();
        Admin {
            bases: Arc::new(bases),
            current: Arc::new(Mutex::new(first)),
            http: reqwest::Client::new(),
            token: None,
        }
    }

    /// The address requests go to now (the leader, once one answered).
    fn base(&self) -> String {
        self.current.lock().expect("admin address lock").clone()
    }

    /// Verifies an `https://` hale against the certificates in `ca_file` (PEM).
    pub fn with_ca_file(mut self, ca_file: &std::path::Path) -> Result<Admin, ClientError> {
        self.http = crate::tls::http_client(Some(ca_file))?;
        Ok(self)
    }

    /// Sends `token` (the admin token, or an agent's) with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Admin {
        self.token = Some(token.into());
        self
    }

    /// New tokens for `agent` (`hale token issue`): its previous refresh token stops working.
    pub async fn issue_tokens(&self, agent: &str) -> Result<hale_proto::TokenPair, ClientError> {
        self.send(reqwest::Method::POST, &format!("/v1/agents/{agent}/tokens")).await
    }

    /// Revokes every token of `agent` and ends its sessions (`hale token revoke`).
    pub async fn revoke_tokens(&self, agent: &str) -> Result<(), ClientError> {
        let _: serde_json::Value =
            self.send(reqwest::Method::POST, &format!("/v1/agents/{agent}/tokens/revoke")).await?;
        Ok(())
    }

    /// Every agent hale knows.
    pub async fn agents(&self) -> Result<Vec<AgentSummary>, ClientError> {
        self.get("/v1/agents").await
    }

    /// An agent's state, now or at a retained `version`.
    pub async fn state(&self, agent: &str, version: Option<u64>) -> Result<AgentState, ClientError> {
        let query = version.map(|version| format!("?version={version}")).unwrap_or_default();
        self.get(&format!("/v1/agents/{agent}/state{query}")).await
    }

    /// Restarts a managed agent now and forgets its restart window (revives a `failed`
    /// one). Returns the new incarnation.
    pub async fn restart(&self, agent: &str) -> Result<u64, ClientError> {
        #[derive(serde::Deserialize)]
        struct Restarted {
            incarnation: u64,
        }
        let restarted: Restarted = self.send(reqwest::Method::POST, &format!("/v1/agents/{agent}/restart")).await?;
        Ok(restarted.incarnation)
    }

    /// Stops a managed agent; it is not restarted until `restart` (or the next `hale up`).
    pub async fn stop(&self, agent: &str) -> Result<(), ClientError> {
        let _: serde_json::Value = self.send(reqwest::Method::POST, &format!("/v1/agents/{agent}/stop")).await?;
        Ok(())
    }

    /// Quarantines an agent: it gets no work until released.
    pub async fn quarantine(&self, agent: &str, reason: &str) -> Result<(), ClientError> {
        let body = serde_json::json!({ "reason": reason });
        let _: serde_json::Value = self.send_json(&format!("/v1/agents/{agent}/quarantine"), &body).await?;
        Ok(())
    }

    /// Releases an agent from quarantine and forgets its violations.
    pub async fn release(&self, agent: &str) -> Result<(), ClientError> {
        let _: serde_json::Value = self.send(reqwest::Method::POST, &format!("/v1/agents/{agent}/release")).await?;
        Ok(())
    }

    /// Submits a task; returns its number (an earlier one's, for a known idempotency key).
    /// A task without an idempotency key gets one, so that following a new leader cannot
    /// submit it twice.
    pub async fn submit(&self, task: &hale_proto::HttpSubmitTask) -> Result<hale_proto::TaskSubmitted, ClientError> {
        let mut task = task.clone();
        if task.idempotency_key.is_none() && self.bases.len() > 1 {
            task.idempotency_key = Some(format!("admin-{:032x}", rand::random::<u128>()));
        }
        let body = serde_json::to_value(&task).map_err(|error| ClientError::Protocol(error.to_string()))?;
        self.send_json("/v1/tasks", &body).await
    }

    /// Every task.
    pub async fn tasks(&self) -> Result<Vec<hale_proto::TaskInfo>, ClientError> {
        self.get("/v1/tasks").await
    }

    /// One task, with its committed steps.
    pub async fn task(&self, task: u64) -> Result<hale_proto::TaskInfo, ClientError> {
        self.get(&format!("/v1/tasks/{task}")).await
    }

    /// The system mode, capacity per role and the queue (`hale status`).
    pub async fn status(&self) -> Result<hale_proto::SystemStatus, ClientError> {
        self.get("/v1/status").await
    }

    /// This node's view of its cluster (`hale cluster status`).
    pub async fn cluster(&self) -> Result<hale_proto::ClusterInfo, ClientError> {
        self.get("/v1/cluster").await
    }

    /// The nodes of the cluster: status, Raft role, agents, when the leader last heard
    /// from each (`hale nodes`).
    pub async fn nodes(&self) -> Result<Vec<NodeSummary>, ClientError> {
        self.get("/v1/nodes").await
    }

    /// Makes this node a cluster of one, which others then join (`hale cluster init`); a
    /// node converted from a single node starts the cluster from its log.
    /// Returns how many events of a single node's log it brought in (0 for a new node).
    pub async fn cluster_init(&self) -> Result<u64, ClientError> {
        let answer: serde_json::Value = self.send(reqwest::Method::POST, "/v1/cluster/init").await?;
        Ok(answer["imported_events"].as_u64().unwrap_or(0))
    }

    /// Removes node `node_id` from the cluster (`None`: the node asked); returns the voters
    /// afterwards (`hale cluster leave`).
    pub async fn cluster_leave(&self, node_id: Option<u64>) -> Result<Vec<u64>, ClientError> {
        let body = serde_json::json!({ "node_id": node_id });
        let answer: serde_json::Value = self.send_json("/v1/cluster/leave", &body).await?;
        Ok(answer["voters"]
            .as_array()
            .map(|voters| voters.iter().filter_map(|id| id.as_u64()).collect())
            .unwrap_or_default())
    }

    /// Has this node join the cluster a member of which listens at `address`.
    pub async fn cluster_join(&self, address: &str) -> Result<(), ClientError> {
        let body = serde_json::json!({ "address": address });
        let _: serde_json::Value = self.send_json("/v1/cluster/join", &body).await?;
        Ok(())
    }

    /// Cancels a task wherever it is.
    pub async fn cancel(&self, task: u64) -> Result<(), ClientError> {
        let _: serde_json::Value = self.send(reqwest::Method::POST, &format!("/v1/tasks/{task}/cancel")).await?;
        Ok(())
    }

    /// Has hale back its log up into `path`, a new file on the server's machine (absolute),
    /// while it keeps running. `progress(pages_done, pages_total)` is called as the copy
    /// goes. Returns once the backup file is complete and fsync'd.
    pub async fn backup(
        &self,
        path: &str,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<hale_proto::BackupDone, ClientError> {
        use hale_proto::BackupLine;
        let url = format!("{}/v1/backups", self.base());
        let mut request = self.http.post(&url).json(&hale_proto::HttpBackup { path: path.to_string() });
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let mut response = request.send().await.map_err(|error| ClientError::Connect {
            url: url.clone(),
            reason: format!("{error}; is `hale serve` running there? (set --server or HALE_URL)"),
        })?;
        let status = response.status();
        if !status.is_success() {
            let bytes = response.bytes().await.map_err(|error| ClientError::Closed(error.to_string()))?;
            return match serde_json::from_slice::<HttpError>(&bytes) {
                Ok(error) => Err(ClientError::Server(error.error)),
                Err(_) => Err(ClientError::Protocol(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)))),
            };
        }
        // Newline-delimited JSON: progress lines, then one `done` or `error`.
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let chunk = response.chunk().await.map_err(|error| ClientError::Closed(error.to_string()))?;
            let Some(chunk) = chunk else {
                return Err(ClientError::Closed("the backup's answer ended before it said how the backup went".into()));
            };
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                match serde_json::from_slice::<BackupLine>(&line) {
                    Ok(BackupLine::Progress { pages_done, pages_total }) => progress(pages_done, pages_total),
                    Ok(BackupLine::Done(done)) => return Ok(done),
                    Ok(BackupLine::Error(error)) => return Err(ClientError::Server(error)),
                    Err(error) => return Err(ClientError::Protocol(format!("a backup progress line: {error}"))),
                }
            }
        }
    }

    /// Events of the log in order (`hale events`): at most `filter.limit` (1,000 by
    /// default); page on with `after` set to the last one's `seq`.
    pub async fn events(&self, filter: &EventFilter) -> Result<Vec<EventInfo>, ClientError> {
        let query = filter.query(true);
        self.send_with(reqwest::Method::GET, "/v1/events", |request| request.query(&query)).await
    }

    /// Follows the log (`hale events --follow`): calls `on_event` with every event that
    /// passes `filter` as it becomes durable, from `filter.after` (else `since`, else now).
    /// When hale says this reader lagged, it reconnects after the last event it got, so
    /// nothing is skipped. Returns only when the stream ends or fails.
    pub async fn follow_events(
        &self,
        filter: &EventFilter,
        mut on_event: impl FnMut(EventInfo),
    ) -> Result<(), ClientError> {
        let mut filter = filter.clone();
        loop {
            let url = format!("{}/v1/events/stream", self.base());
            let request = self.http.get(&url).query(&filter.query(false));
            let request = match &self.token {
                Some(token) => request.bearer_auth(token),
                None => request,
            };
            let mut response = request.send().await.map_err(|error| ClientError::Connect {
                url: url.clone(),
                reason: format!("{error}; is `hale serve` running there? (set --server or HALE_URL)"),
            })?;
            if !response.status().is_success() {
                let status = response.status();
                let bytes = response.bytes().await.map_err(|error| ClientError::Closed(error.to_string()))?;
                return Err(match serde_json::from_slice::<HttpError>(&bytes) {
                    Ok(error) => ClientError::Server(error.error),
                    Err(_) => ClientError::Protocol(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes))),
                });
            }
            let mut buffer = Vec::new();
            let mut lagged = false;
            'read: while let Some(chunk) =
                response.chunk().await.map_err(|error| ClientError::Closed(error.to_string()))?
            {
                buffer.extend_from_slice(&chunk);
                while let Some(end) = buffer.windows(2).position(|pair| pair == b"\n\n") {
                    let block: Vec<u8> = buffer.drain(..end + 2).collect();
                    let (name, data) = sse_block(&String::from_utf8_lossy(&block));
                    match name.as_deref() {
                        None | Some("message") if !data.is_empty() => {
                            let event: EventInfo = serde_json::from_str(&data)
                                .map_err(|error| ClientError::Protocol(format!("a bad event: {error}")))?;
                            filter.after = Some(event.seq);
                            on_event(event);
                        }
                        Some("lagged") => {
                            #[derive(serde::Deserialize)]
                            struct Lagged {
                                after: u64,
                            }
                            let lag: Lagged = serde_json::from_str(&data)
                                .map_err(|error| ClientError::Protocol(format!("a bad lagged event: {error}")))?;
                            filter.after = Some(lag.after);
                            lagged = true;
                            break 'read;
                        }
                        Some("error") => {
                            return Err(match serde_json::from_str::<HttpError>(&data) {
                                Ok(error) => ClientError::Server(error.error),
                                Err(_) => ClientError::Protocol(data),
                            });
                        }
                        _ => {}
                    }
                }
            }
            if !lagged {
                return Err(ClientError::Closed("hale ended the event stream (is it shutting down?)".to_string()));
            }
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(reqwest::Method::GET, path).await
    }

    async fn send<T: DeserializeOwned>(&self, method: reqwest::Method, path: &str) -> Result<T, ClientError> {
        self.send_with(method, path, |request| request).await
    }

    async fn send_json<T: DeserializeOwned>(&self, path: &str, body: &serde_json::Value) -> Result<T, ClientError> {
        self.send_with(reqwest::Method::POST, path, |request| request.json(body)).await
    }

    /// Sends the request made by `build` to the current address, following the leader
    /// (see [`Admin`]).
    async fn send_with<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        build: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let deadline = std::time::Instant::now() + FOLLOW_FOR;
        let mut base = self.base();
        let mut tried = 0usize;
        loop {
            let url = format!("{base}{path}");
            let request = build(self.http.request(method.clone(), &url));
            let request = match &self.token {
                Some(token) => request.bearer_auth(token),
                None => request,
            };
            tried += 1;
            let following = self.bases.len() > 1 && std::time::Instant::now() < deadline;
            let response = match request.send().await {
                Ok(response) => response,
                Err(error) if following && error.is_connect() => {
                    base = self.next_after(&base, tried);
                    continue;
                }
                Err(error) => {
                    return Err(ClientError::Connect {
                        url,
                        reason: format!("{error}; is `hale serve` running there? (set --server or HALE_URL)"),
                    });
                }
            };
            let status = response.status();
            let bytes = response.bytes().await.map_err(|error| ClientError::Closed(error.to_string()))?;
            if status.is_success() {
                *self.current.lock().expect("admin address lock") = base;
                return serde_json::from_slice(&bytes).map_err(|error| ClientError::Protocol(error.to_string()));
            }
            let error = match serde_json::from_slice::<HttpError>(&bytes) {
                Ok(error) => error.error,
                Err(_) => {
                    return Err(ClientError::Protocol(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes))));
                }
            };
            if following && error.code == "not_leader" {
                base = match &error.leader {
                    Some(leader) => with_authority(&base, leader),
                    None => {
                        // An election: give it a moment, then ask the next node.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        self.next_after(&base, tried)
                    }
                };
                continue;
            }
            return Err(ClientError::Server(error));
        }
    }

    /// The address to try after `base` (the `tried`th attempt): the next one given.
    fn next_after(&self, base: &str, tried: usize) -> String {
        let at = self.bases.iter().position(|one| one == base).unwrap_or(tried);
        self.bases[(at + 1) % self.bases.len()].clone()
    }
}

/// `base` with its `host:port` replaced by `authority` (`http://a:1` + `b:2` → `http://b:2`).
pub(crate) fn with_authority(base: &str, authority: &str) -> String {
    match base.split_once("://") {
        Some((scheme, _)) => format!("{scheme}://{authority}"),
        None => format!("http://{authority}"),
    }
}

/// Which events [`Admin::events`] and [`Admin::follow_events`] want; `None` means any.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub agent: Option<String>,
    /// One kind, or several separated by commas (`agent_down,incarnation_started`).
    pub kind: Option<String>,
    /// Logged at or after this time (milliseconds since the epoch).
    pub since_ms: Option<u64>,
    /// After this sequence number.
    pub after: Option<u64>,
    /// At most this many (for [`Admin::events`]).
    pub limit: Option<usize>,
}

impl EventFilter {
    fn query(&self, with_limit: bool) -> Vec<(&'static str, String)> {
        let mut query = Vec::new();
        if let Some(agent) = &self.agent {
            query.push(("agent", agent.clone()));
        }
        if let Some(kind) = &self.kind {
            query.push(("kind", kind.clone()));
        }
        if let Some(since) = self.since_ms {
            query.push(("since", since.to_string()));
        }
        if let Some(after) = self.after {
            query.push(("after", after.to_string()));
        }
        if let (true, Some(limit)) = (with_limit, self.limit) {
            query.push(("limit", limit.to_string()));
        }
        query
    }
}

/// The event name and the data of one server-sent event (its `data:` lines joined).
fn sse_block(block: &str) -> (Option<String>, String) {
    let mut name = None;
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            name = Some(value.trim().to_string());
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    (name, data.join("\n"))
}
