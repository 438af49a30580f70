//! `GET /v1/cluster`, `POST /v1/cluster/init`, `POST /v1/cluster/join`: the operator's
//! view of the cluster and how it is formed (`hale cluster status | init | join`). The
//! node-to-node routes (Raft's RPCs, a node asking to join) are hale-cluster's, under the
//! cluster secret; these take the admin token.

use super::http::JsonBody;
use super::openapi::Answer;
use super::{ApiError, AppState, Route, ServerCode};
use crate::ClusterConfig;
use crate::auth::Principal;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use hale_cluster::TypeConfig;
use hale_cluster::control::{self, JoinRequest, LeaveRequest};
use hale_cluster::node::NodeParts;
use hale_cluster::openraft::{BasicNode, Raft};
use hale_proto::{ClusterInfo, ClusterJoin, ClusterLeave};
use std::collections::BTreeMap;
use std::sync::Arc;

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::get("/v1/cluster", status),
        Route::post("/v1/cluster/init", init),
        Route::post("/v1/cluster/join", join),
        Route::post("/v1/cluster/leave", leave),
        Route::get("/v1/nodes", nodes),
    ]
}

/// This node's Raft, as the server holds it.
#[derive(Clone)]
pub struct ClusterControl {
    raft: Raft<TypeConfig>,
    peers: hale_cluster::network::PeerClient,
    committed: hale_cluster::CommittedView,
    routes: axum::Router,
    config: ClusterConfig,
    /// The last event and state of the single node's log this node held when it started,
    /// if it had never been part of a cluster: `init` brings it in, `join` refuses.
    importable: Arc<std::sync::Mutex<Option<(u64, hale_core::State)>>>,
}

impl ClusterControl {
    pub fn new(parts: NodeParts, config: ClusterConfig, importable: Option<(u64, hale_core::State)>) -> ClusterControl {
        ClusterControl {
            raft: parts.raft,
            peers: parts.peers,
            committed: parts.committed,
            routes: parts.routes,
            config,
            importable: Arc::new(std::sync::Mutex::new(importable)),
        }
    }

    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    pub fn peers(&self) -> &hale_cluster::network::PeerClient {
        &self.peers
    }

    pub fn committed(&self) -> &hale_cluster::CommittedView {
        &self.committed
    }

    /// How far this node has copied the committed records into its events table.
    pub fn events_copied(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.committed.events_copied()
    }

    /// The node-to-node routes, for the server's router.
    pub fn routes(&self) -> axum::Router {
        self.routes.clone()
    }

    /// Stops Raft (at shutdown).
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

fn not_clustered() -> ApiError {
    ApiError::coded(
        StatusCode::CONFLICT,
        ServerCode::NotClustered,
        "this hale is a single node; give it a [cluster] section in hale.toml to make it a node of a cluster",
        false,
    )
}

fn refused(message: String) -> ApiError {
    ApiError::coded(StatusCode::CONFLICT, ServerCode::ClusterRefused, message, false)
}

fn cluster(app: &AppState) -> Result<&ClusterControl, ApiError> {
    app.cluster.as_ref().ok_or_else(not_clustered)
}

/// `hale cluster status`.
#[utoipa::path(get, path = "/v1/cluster", tag = "operator",
    responses((status = 200, description = "this node's view of the cluster (admin)", body = ClusterInfo)))]
pub(super) async fn status(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<ClusterInfo>, ApiError> {
    principal.require_admin("the cluster's status")?;
    Ok(Json(control::status(&cluster(&app)?.raft)))
}

/// `hale nodes`: every node of the cluster, what runs on it and when the leader last
/// heard from it.
#[utoipa::path(get, path = "/v1/nodes", tag = "operator",
    responses((status = 200, description = "the nodes of the cluster (admin)", body = [hale_proto::NodeSummary])))]
pub(super) async fn nodes(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Vec<hale_proto::NodeSummary>>, ApiError> {
    principal.require_admin("the nodes of the cluster")?;
    let cluster = cluster(&app)?;
    let heard = app.nodes.as_ref().map(|nodes| nodes.heard_ago()).unwrap_or_default();
    let (raft_roles, leader) = {
        let metrics = cluster.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let learners: std::collections::BTreeSet<u64> = membership.learner_ids().collect();
        ((voters, learners), metrics.current_leader)
    };
    let mut listed = app
        .engine
        .read(|state| {
            state
                .nodes()
                .map(|(name, record)| {
                    let (status, since) = match record.status {
                        hale_core::nodes::NodeStatus::Up { since } => ("up", since.0),
                        hale_core::nodes::NodeStatus::Lost { at, .. } => ("lost", at.0),
                    };
                    let agents = state
                        .agents()
                        .filter(|agent| {
                            agent
                                .managed
                                .as_ref()
                                .is_some_and(|managed| managed.node.as_ref() == Some(name) && managed.is_live())
                        })
                        .map(|agent| agent.name.to_string())
                        .collect();
                    hale_proto::NodeSummary {
                        name: name.to_string(),
                        node_id: record.info.id,
                        address: record.info.address.clone(),
                        labels: record.info.labels.clone(),
                        status: status.to_string(),
                        since_ms: since,
                        raft: String::new(),
                        agents,
                        last_heard_ms_ago: None,
                    }
                })
                .collect::<Vec<_>>()
        })
        .await?;
    let (voters, learners) = raft_roles;
    for node in &mut listed {
        node.raft = if leader == Some(node.node_id) {
            "leader"
        } else if voters.contains(&node.node_id) {
            "voter"
        } else if learners.contains(&node.node_id) {
            "learner"
        } else {
            "none"
        }
        .to_string();
        node.last_heard_ms_ago = heard.get(node.name.as_str()).copied();
    }
    Ok(Json(listed))
}

/// `hale cluster init`: this node becomes a cluster of one, which others then join.
#[utoipa::path(post, path = "/v1/cluster/init", tag = "operator",
    responses((status = 200, description = "a cluster of this node (admin)", body = Answer)))]
pub(super) async fn init(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    principal.require_admin("forming a cluster")?;
    let cluster = cluster(&app)?;
    let members = BTreeMap::from([(cluster.config.node_id, BasicNode::new(cluster.config.advertise.clone()))]);
    let import = cluster.importable.lock().expect("importable lock").take();
    let events = import.as_ref().map_or(0, |(seq, _)| *seq);
    match control::init(&cluster.raft, &cluster.committed, members, import).await {
        Ok(()) => Ok(Json(serde_json::json!({ "initialized": true, "imported_events": events })).into_response()),
        Err(reason) => Err(refused(reason)),
    }
}

/// `hale cluster join ADDRESS`: this node asks the cluster a member of which listens at
/// `address` to add it.
#[utoipa::path(post, path = "/v1/cluster/join", tag = "operator", request_body = ClusterJoin,
    responses((status = 200, description = "a voter of the cluster now (admin)", body = Answer)))]
pub(super) async fn join(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    JsonBody(body): JsonBody<ClusterJoin>,
) -> Result<Response, ApiError> {
    principal.require_admin("joining a cluster")?;
    let cluster = cluster(&app)?;
    if body.address.trim().is_empty() || body.address.len() > 256 {
        return Err(ApiError::bad_request("address must be the host:port of a member of the cluster"));
    }
    if let Some((events, _)) = &*cluster.importable.lock().expect("importable lock") {
        return Err(refused(format!(
            "this node's data directory holds a single node's log ({events} events), which joining would lose: \
             make this node the first of a new cluster with `hale cluster init`, or start it on an empty data directory"
        )));
    }
    let request = JoinRequest { node_id: cluster.config.node_id, address: cluster.config.advertise.clone() };
    match control::join(&body.address, &cluster.peers, &cluster.config.secret, &request).await {
        Ok(members) => Ok(Json(serde_json::json!({ "joined": true, "members": members })).into_response()),
        Err(reason) => Err(refused(reason)),
    }
}

/// `hale cluster leave`: removes a member (this node unless `node_id` names another, for
/// one that is down), following the request to the leader.
#[utoipa::path(post, path = "/v1/cluster/leave", tag = "operator", request_body = ClusterLeave,
    responses((status = 200, description = "the node is no longer a member (admin)", body = Answer)))]
pub(super) async fn leave(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    JsonBody(body): JsonBody<ClusterLeave>,
) -> Result<Response, ApiError> {
    principal.require_admin("changing a cluster's members")?;
    let cluster = cluster(&app)?;
    let node_id = body.node_id.unwrap_or(cluster.config.node_id);
    let request = LeaveRequest { node_id };
    match control::leave(&cluster.config.advertise, &cluster.peers, &cluster.config.secret, &request).await {
        Ok(members) => Ok(Json(serde_json::json!({ "left": node_id, "voters": members })).into_response()),
        Err(reason) => Err(refused(reason)),
    }
}
