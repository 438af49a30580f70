//! `GET /v1/openapi.json`: the HTTP API as an OpenAPI 3.1 document, generated from the
//! handlers' `#[utoipa::path]` attributes and hale-proto's types (feature `openapi`).
//!
//! Served without a token, like the dashboard's files: it holds no data, and the tools
//! that read it (generators, fuzzers, API browsers) usually fetch it before they have one.
//! A test (`every_route_is_documented_and_every_documented_route_exists` below) holds its
//! paths equal to [`super::routes`], which is everything the router answers.

use super::{OPEN_PATHS, backups, dashboard, events, hooks, http, mail, metrics, tasks, tokens, ws};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::sync::OnceLock;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
use utoipa::{IntoParams, OpenApi, ToSchema};

/// Where the document is served.
pub const PATH: &str = "/v1/openapi.json";

/// The name of the security scheme: `Authorization: Bearer TOKEN`.
const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hale",
        description = "hale keeps AI agents alive. This is its HTTP API; docs/protocol.md describes it \
                       with examples, and the WebSocket session protocol spoken on /v1/session.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        http::healthz,
        super::cluster::status,
        super::cluster::init,
        super::cluster::join,
        super::cluster::leave,
        super::cluster::nodes,
        http::readyz,
        http::list_agents,
        http::agent_state,
        http::agent_state_alias,
        http::hello,
        http::checkpoint,
        http::recovery_point,
        http::rollback,
        http::heartbeat,
        http::restart,
        http::stop,
        http::report_error,
        http::report_violation,
        http::quarantine,
        http::release,
        tasks::status,
        tasks::agent_tasks,
        tasks::reserve,
        tasks::report_spend,
        tasks::submit_task,
        tasks::list_tasks,
        tasks::get_task,
        tasks::cancel_task,
        tasks::intend_step,
        tasks::commit_step,
        tasks::complete_task,
        tasks::fail_task,
        mail::send,
        mail::mailbox,
        mail::ack,
        mail::end_conversation,
        tokens::issue,
        tokens::revoke,
        tokens::refresh,
        metrics::scrape,
        backups::create,
        events::list,
        events::stream,
        hooks::list,
        dashboard::page,
        dashboard::style,
        dashboard::script,
        ws::upgrade,
        document,
    ),
    components(schemas(hale_proto::HttpError, hale_proto::ErrorBody)),
    modifiers(&Errors),
    tags(
        (name = "probes", description = "Liveness and readiness, for load balancers and orchestrators (no token)."),
        (name = "agents", description = "What an agent does without a session: hello, checkpoints, heartbeats, reports."),
        (name = "operator", description = "What the operator does to an agent (admin token)."),
        (name = "tasks", description = "Tasks, their steps, and the spending budgets."),
        (name = "messages", description = "Mailboxes and conversations between agents."),
        (name = "tokens", description = "Agents' access and refresh tokens."),
        (name = "operations", description = "Status, metrics, events, backups and this document."),
        (name = "dashboard", description = "The live dashboard's files (no token; the page asks for one)."),
        (name = "session", description = "The WebSocket session (see docs/protocol.md)."),
    )
)]
pub struct ApiDoc;

/// The document, built once.
pub fn json() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut document = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes");
        flatten_closed_all_of(&mut document);
        document.to_string()
    })
}

/// utoipa writes a `#[serde(flatten)]` member as `allOf: [the flattened type, the rest]`.
/// When the flattened type refuses unknown fields (`additionalProperties: false`), that
/// `allOf` admits nothing, since each part refuses the other's members; serde checks the
/// members of the whole. So such an `allOf` becomes the one object it means: the members
/// and required members of all parts, closed.
fn flatten_closed_all_of(document: &mut serde_json::Value) {
    use serde_json::Value;
    let Some(schemas) = document.pointer("/components/schemas").and_then(Value::as_object).cloned() else { return };
    let resolve = |part: &Value| -> Option<Value> {
        match part.get("$ref").and_then(Value::as_str) {
            Some(reference) => schemas.get(reference.strip_prefix("#/components/schemas/")?).cloned(),
            None => Some(part.clone()),
        }
    };
    let Some(targets) = document.pointer_mut("/components/schemas").and_then(Value::as_object_mut) else { return };
    for schema in targets.values_mut() {
        let Some(parts) = schema.get("allOf").and_then(Value::as_array) else { continue };
        let Some(parts) = parts.iter().map(resolve).collect::<Option<Vec<_>>>() else { continue };
        if !parts.iter().any(|part| part.get("additionalProperties") == Some(&Value::Bool(false))) {
            continue;
        }
        let (mut properties, mut required) = (serde_json::Map::new(), Vec::new());
        for part in &parts {
            if let Some(members) = part.get("properties").and_then(Value::as_object) {
                properties.extend(members.clone());
            }
            required.extend(part.get("required").and_then(Value::as_array).cloned().unwrap_or_default());
        }
        let description = schema.get("description").cloned();
        let mut merged = serde_json::json!({
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": false,
        });
        if let Some(description) = description {
            merged["description"] = description;
        }
        *schema = merged;
    }
}

/// `GET /v1/openapi.json`.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "this document (OpenAPI 3.1)", body = Object)))]
pub(super) async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], json()).into_response()
}

/// The security of every operation and the error responses every operation may give: the
/// error body is always `{"error": {"code", "message", "retryable"}}`.
struct Errors;

impl utoipa::Modify for Errors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The admin token (HALE_ADMIN_TOKEN, or the one in the data directory) or an agent's \
                         access token from POST /v1/agents/{agent}/tokens. /metrics also takes the \
                         metrics_token_file's token.",
                    ))
                    .build(),
            ),
        );
        let error = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content("application/json", ContentBuilder::new().schema(Some(error_ref())).build())
                    .build(),
            )
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let open = OPEN_PATHS.contains(&path.as_str());
            let operations = [&mut item.get, &mut item.post];
            for operation in operations.into_iter().flatten() {
                operation.security =
                    Some(if open { Vec::new() } else { vec![SecurityRequirement::new(BEARER, Vec::<String>::new())] });
                let responses = &mut operation.responses.responses;
                if !open {
                    responses.entry("401".into()).or_insert_with(|| error("no token, or one that is not valid"));
                }
                responses.entry("4XX".into()).or_insert_with(|| {
                    error("the request was refused: see `error.code` (docs/errors.md) and `error.message`")
                });
                responses.entry("5XX".into()).or_insert_with(|| {
                    error("hale cannot serve it now (its log failed, or it is shutting down); `retryable` says whether to retry")
                });
            }
        }
    }
}

fn error_ref() -> RefOr<utoipa::openapi::schema::Schema> {
    RefOr::Ref(utoipa::openapi::Ref::from_schema_name("HttpError"))
}

/// `{agent}` in a path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Documents the path; the handlers take it as `Path<String>`.
pub struct AgentPath {
    /// The agent's name.
    #[param(pattern = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")]
    agent: String,
}

/// `{task}` in a path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Documents the path; the handlers parse it for a typed error.
pub struct TaskPath {
    /// The task's number.
    task: u64,
}

/// The answer of a write that returns nothing else: `{"ok": true}`, or the one member
/// naming what was done (`{"quarantined": true}`, `{"restarted": true, "incarnation": 4}`…).
#[derive(ToSchema)]
#[allow(dead_code)] // A schema only: the handlers answer with `serde_json::json!`.
pub struct Answer {
    ok: Option<bool>,
    quarantined: Option<bool>,
    released: Option<bool>,
    stopped: Option<bool>,
    restarted: Option<bool>,
    revoked: Option<bool>,
    /// The new run, after a restart.
    incarnation: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The router is built from `routes()` alone, so this compares what hale answers with
    /// what the document says, both ways: a route added without `#[utoipa::path]` and an
    /// entry in `paths(...)`, or a documented path that no route serves, fails here.
    #[test]
    fn every_route_is_documented_and_every_documented_route_exists() {
        let routed: BTreeSet<(String, String)> =
            super::super::routes().iter().map(|route| (route.method.to_string(), route.path.to_string())).collect();
        let document: serde_json::Value = serde_json::from_str(json()).unwrap();
        let mut documented = BTreeSet::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys().filter(|key| *key != "parameters") {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty(),
            "routes missing from the OpenAPI document (add #[utoipa::path] and list the handler in \
             api/openapi.rs): {undocumented:?}"
        );
        assert!(unrouted.is_empty(), "documented paths no route serves: {unrouted:?}");
    }

    #[test]
    fn the_document_is_openapi_3_1_with_bearer_auth_and_open_paths_open() {
        let document: serde_json::Value = serde_json::from_str(json()).unwrap();
        assert_eq!(document["openapi"], "3.1.0");
        assert_eq!(document["components"]["securitySchemes"][BEARER]["scheme"], "bearer");
        assert_eq!(document["paths"]["/v1/agents"]["get"]["security"][0][BEARER], serde_json::json!([]));
        assert_eq!(document["paths"][PATH]["get"]["security"], serde_json::json!([]));
        assert_eq!(
            document["paths"]["/v1/agents"]["get"]["responses"]["401"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/HttpError"
        );
        assert!(document["paths"]["/v1/session"]["get"]["responses"]["101"].is_object());
        // A flattened body that refuses unknown fields is one closed object, not an allOf.
        let send = &document["components"]["schemas"]["HttpSend"];
        assert!(send.get("allOf").is_none(), "{send}");
        assert_eq!(send["additionalProperties"], false);
        assert!(send["properties"]["incarnation"].is_object() && send["properties"]["to"].is_object(), "{send}");
    }
}
