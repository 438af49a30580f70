//! Node-to-node traffic: openraft's three RPCs (append entries, vote, install snapshot)
//! over HTTP on each node's own listener, under `/v1/cluster/raft/`.
//!
//! Every request carries the cluster secret (`Authorization: Bearer …`), which only the
//! nodes hold; a request without it is refused before it reaches Raft. The body is the
//! RPC as JSON, the answer `{"Ok": …}` or `{"Err": …}` with openraft's own error, so a
//! remote Raft error (a higher term, a conflict) reaches the caller as openraft expects
//! it. A node that cannot be reached is `Unreachable` (openraft backs off), anything else
//! on the way a `NetworkError` (openraft retries).
//!
//! - [`Network`] is the client: one per target node, made by [`NetworkFactory`].
//! - [`routes`] is the server half, merged into the node's router.

use crate::types::{NodeId, TypeConfig};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Raft};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// Where the three RPCs are served, under a node's address.
pub const APPEND_PATH: &str = "/v1/cluster/raft/append";
pub const VOTE_PATH: &str = "/v1/cluster/raft/vote";
pub const SNAPSHOT_PATH: &str = "/v1/cluster/raft/snapshot";
/// A node asks to join (see [`crate::control`]).
pub const JOIN_PATH: &str = "/v1/cluster/raft/join";
/// A node asks whether the others would vote before it stands ([`crate::elector`]).
pub const PREVOTE_PATH: &str = "/v1/cluster/raft/prevote";
/// A node asks to remove a member.
pub const LEAVE_PATH: &str = "/v1/cluster/raft/leave";
/// The header that names the node a request comes from, for the receiver's logs and for
/// whatever stands between nodes (the partition tests' proxy tells senders apart by it).
pub const FROM_HEADER: &str = "x-hale-node";

/// The secret every node of a cluster shares (`[cluster] secret_file`): it authenticates
/// node-to-node requests.
#[derive(Clone)]
pub struct ClusterSecret(Arc<str>);

impl ClusterSecret {
    /// A secret of at least 16 bytes (a shorter one is refused: it would be guessable).
    pub fn new(secret: &str) -> Result<ClusterSecret, String> {
        let secret = secret.trim();
        if secret.len() < 16 {
            return Err(format!(
                "the cluster secret has {} bytes; give every node the same secret of at least 16 (e.g. `hale keygen`)",
                secret.len()
            ));
        }
        Ok(ClusterSecret(Arc::from(secret)))
    }

    /// The secret, to present to a peer.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is the secret, in time independent of where they differ.
    fn accepts(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |differ, (x, y)| differ | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(…)")
    }
}

/// How a node reaches its peers: plain HTTP, or HTTPS when the nodes serve TLS, trusting
/// the cluster's CA (`[server] tls_ca_file`, or the node's own certificate) and no other.
#[derive(Clone, Debug)]
pub struct PeerClient {
    client: reqwest::Client,
    scheme: &'static str,
}

impl PeerClient {
    /// A client for peers that serve TLS with certificates `ca_pem` vouches for, or plain
    /// HTTP without one.
    pub fn new(ca_pem: Option<&[u8]>) -> Result<PeerClient, String> {
        // Raft's heartbeats keep these connections busy: reuse them, and never wait longer
        // for a connection than an election could.
        let builder =
            reqwest::Client::builder().connect_timeout(std::time::Duration::from_millis(500)).tcp_nodelay(true);
        let (builder, scheme) = match ca_pem {
            None => (builder, "http"),
            Some(pem) => {
                let mut builder = builder.use_rustls_tls().tls_built_in_root_certs(false);
                let certificates = reqwest::Certificate::from_pem_bundle(pem)
                    .map_err(|error| format!("the cluster's CA file: {error}"))?;
                if certificates.is_empty() {
                    return Err("the cluster's CA file holds no PEM certificate".into());
                }
                for certificate in certificates {
                    builder = builder.add_root_certificate(certificate);
                }
                (builder, "https")
            }
        };
        let client = builder.build().map_err(|error| format!("cannot make the client for peers: {error}"))?;
        Ok(PeerClient { client, scheme })
    }

    /// The URL of `path` on the node at `addr` (`host:port`, or a full base URL).
    pub fn url(&self, addr: &str, path: &str) -> String {
        match addr.contains("://") {
            true => format!("{}{path}", addr.trim_end_matches('/')),
            false => format!("{}://{addr}{path}", self.scheme),
        }
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

/// Makes a [`Network`] client for each node Raft replicates to.
#[derive(Clone)]
pub struct NetworkFactory {
    peers: PeerClient,
    secret: ClusterSecret,
    from: NodeId,
}

impl NetworkFactory {
    /// The client of node `from`.
    pub fn new(from: NodeId, peers: PeerClient, secret: ClusterSecret) -> NetworkFactory {
        NetworkFactory { peers, secret, from }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Network {
        Network {
            peers: self.peers.clone(),
            secret: self.secret.clone(),
            from: self.from,
            target,
            addr: node.addr.clone(),
        }
    }
}

/// The client side of the RPCs to one node.
pub struct Network {
    peers: PeerClient,
    secret: ClusterSecret,
    from: NodeId,
    target: NodeId,
    addr: String,
}

impl Network {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let sent = self
            .peers
            .client()
            .post(self.peers.url(&self.addr, path))
            .bearer_auth(&self.secret.0)
            .header(FROM_HEADER, self.from)
            .timeout(option.hard_ttl())
            .json(request)
            .send()
            .await;
        let answer = match sent {
            Ok(answer) => answer,
            Err(error) if error.is_connect() => return Err(RPCError::Unreachable(Unreachable::new(&error))),
            Err(error) => return Err(RPCError::Network(NetworkError::new(&error))),
        };
        if !answer.status().is_success() {
            let status = answer.status();
            let body = answer.text().await.unwrap_or_default();
            let error = std::io::Error::other(format!("node {} answered {status}: {body}", self.target));
            return Err(RPCError::Network(NetworkError::new(&error)));
        }
        let result: Result<Resp, RaftError<NodeId, E>> =
            answer.json().await.map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        result.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
    }
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(APPEND_PATH, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(SNAPSHOT_PATH, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(VOTE_PATH, &rpc, &option).await
    }
}

/// The largest node-to-node request body: an append of up to openraft's
/// `max_payload_entries` batches, or a snapshot chunk (see [`SNAPSHOT_CHUNK_BYTES`]) as
/// JSON. Only read once the request has shown the cluster secret.
pub const BODY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The snapshot chunk openraft sends at a time; its JSON (a byte per number) stays well
/// under [`BODY_BYTES_MAX`].
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;

/// How long one snapshot chunk may take to reach a follower and be taken in: a chunk is
/// several megabytes of JSON, and a follower writes it to disk before it answers.
pub const SNAPSHOT_CHUNK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The server half: the RPC routes and join and leave, for the node's router. A request
/// without the cluster secret is refused before its body is read.
pub fn routes(
    raft: Raft<TypeConfig>,
    secret: ClusterSecret,
    heard: Arc<crate::elector::Heard>,
    election_min: std::time::Duration,
) -> Router {
    // A pre-vote does not count as hearing a candidate: it changes nothing.
    let asking = (raft.clone(), heard.clone());
    let pre_vote = post(move || {
        let (raft, heard) = asking.clone();
        async move { Json(crate::elector::pre_vote(&raft, &heard, election_min)) }
    });
    // A leader's append or a candidate's vote request: the elector waits a while longer.
    let hearing = axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
        let heard = heard.clone();
        async move {
            heard.now();
            next.run(request).await
        }
    });
    let raft_rpcs = Router::new().route(APPEND_PATH, post(append)).route(VOTE_PATH, post(vote)).route_layer(hearing);
    Router::new()
        .merge(raft_rpcs)
        .route(SNAPSHOT_PATH, post(snapshot))
        .route(PREVOTE_PATH, pre_vote)
        .route(JOIN_PATH, post(join))
        .route(LEAVE_PATH, post(leave))
        .route_layer(axum::middleware::from_fn_with_state(secret, require_secret))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(raft)
}

/// `router` behind the cluster secret, as the node-to-node routes here are: a request
/// without it is refused before anything reads its body. For the node-to-node routes of
/// the server (nodes renewing their leases, reporting on their agents).
pub fn under_secret<S: Clone + Send + Sync + 'static>(router: Router<S>, secret: ClusterSecret) -> Router<S> {
    router.route_layer(axum::middleware::from_fn_with_state(secret, require_secret))
}

/// Refuses a request without the cluster secret, before anything reads its body.
async fn require_secret(
    State(secret): State<ClusterSecret>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if !presented.is_some_and(|presented| secret.accepts(presented)) {
        return unauthenticated();
    }
    next.run(request).await
}

/// The answer to a request without the cluster secret; it never reaches Raft.
fn unauthenticated() -> Response {
    let body = serde_json::json!({"error": {
        "code": "unauthenticated",
        "message": "node-to-node requests need the cluster secret ([cluster] secret_file) as a bearer token",
        "retryable": false,
    }});
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

async fn append(State(raft): State<Raft<TypeConfig>>, Json(rpc): Json<AppendEntriesRequest<TypeConfig>>) -> Response {
    Json(raft.append_entries(rpc).await).into_response()
}

async fn vote(State(raft): State<Raft<TypeConfig>>, Json(rpc): Json<VoteRequest<NodeId>>) -> Response {
    Json(raft.vote(rpc).await).into_response()
}

async fn snapshot(
    State(raft): State<Raft<TypeConfig>>,
    Json(rpc): Json<InstallSnapshotRequest<TypeConfig>>,
) -> Response {
    Json(raft.install_snapshot(rpc).await).into_response()
}

async fn join(State(raft): State<Raft<TypeConfig>>, Json(request): Json<crate::control::JoinRequest>) -> Response {
    Json(crate::control::add_member(&raft, request).await).into_response()
}

async fn leave(State(raft): State<Raft<TypeConfig>>, Json(request): Json<crate::control::LeaveRequest>) -> Response {
    Json(crate::control::remove_member(&raft, request).await).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_secret_is_refused_and_a_good_one_is_matched_exactly() {
        assert!(ClusterSecret::new("short").unwrap_err().contains("at least 16"));
        let secret = ClusterSecret::new("0123456789abcdef0123").unwrap();
        assert!(secret.accepts("0123456789abcdef0123"));
        assert!(!secret.accepts("0123456789abcdef0124"));
        assert!(!secret.accepts("0123456789abcdef012"));
        assert_eq!(format!("{secret:?}"), "ClusterSecret(…)");
    }
}
