//! `POST /v1/backups`: an online backup, written by the server to a path on its machine,
//! with progress streamed back as newline-delimited JSON.
//!
//! The server writes the file rather than streaming it to the client: SQLite's backup API
//! copies into a database file, so streaming would mean a temporary copy on the server
//! and the whole log over the wire; the common case is the CLI on the same machine, and a
//! backup made elsewhere is a file one can copy afterwards.

use super::http::JsonBody;
use super::{ApiError, AppState, Route, ServerCode};
use crate::auth::Principal;
use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hale_proto::{BackupDone, BackupLine, HttpBackup};
use hale_store::StoreError;
use std::convert::Infallible;
use std::path::PathBuf;

pub fn routes() -> Vec<Route> {
    vec![Route::post("/v1/backups", create)]
}

/// Progress lines waiting for a slow reader; past this they are dropped (the final line
/// never is).
const LINES_QUEUED_MAX: usize = 64;

#[utoipa::path(post, path = "/v1/backups", tag = "operations", request_body = HttpBackup,
    responses((status = 200, description = "newline-delimited JSON: progress lines, then one `done` or `error` (admin)",
        body = BackupLine, content_type = "application/x-ndjson")))]
async fn create(
    State(app): State<AppState>,
    Extension(principal): Extension<Principal>,
    JsonBody(body): JsonBody<HttpBackup>,
) -> Result<Response, ApiError> {
    principal.require_admin("taking a backup")?;
    let target = PathBuf::from(&body.path);
    if !target.is_absolute() {
        return Err(ApiError::bad_request(format!(
            "path {:?} is not absolute; the server writes the backup, so name a file on its machine from /",
            body.path
        )));
    }
    match target.parent() {
        Some(dir) if dir.is_dir() => {}
        _ => {
            return Err(ApiError::bad_request(format!(
                "the directory of {:?} does not exist on the server; create it first",
                body.path
            )));
        }
    }
    if target.exists() || target.file_name().is_none() {
        return Err(backup_exists(&body.path));
    }
    let (lines, queued) = tokio::sync::mpsc::channel::<Vec<u8>>(LINES_QUEUED_MAX);
    let backups = app.backups.clone();
    tokio::spawn(async move {
        let progress_lines = lines.clone();
        let progress = move |done: hale_store::CopyProgress| {
            let line = BackupLine::Progress { pages_done: done.pages_done, pages_total: done.pages_total };
            // A reader that went away cancels the backup; a slow one misses a progress line.
            !matches!(progress_lines.try_send(encode(&line)), Err(tokio::sync::mpsc::error::TrySendError::Closed(_)))
        };
        let last = match backups.run("backup", target.clone(), progress).await {
            Ok((report, elapsed)) => BackupLine::Done(BackupDone {
                path: report.path.display().to_string(),
                bytes: report.bytes,
                pages: report.pages,
                records: report.records,
                last_seq: report.last_seq,
                elapsed_ms: elapsed.as_millis() as u64,
            }),
            Err(error) => {
                let code = match error {
                    StoreError::BackupExists { .. } => ServerCode::BackupExists,
                    _ => ServerCode::BackupFailed,
                };
                BackupLine::Error(code.body(error.to_string(), false))
            }
        };
        let _ = lines.send(encode(&last)).await;
    });
    let stream = futures_util::stream::unfold(queued, |mut queued| async move {
        queued.recv().await.map(|line| (Ok::<_, Infallible>(line), queued))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

fn encode(line: &BackupLine) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(line).expect("backup lines serialize");
    bytes.push(b'\n');
    bytes
}

fn backup_exists(path: &str) -> ApiError {
    ApiError::coded(
        StatusCode::CONFLICT,
        ServerCode::BackupExists,
        format!("{path:?} exists; a backup never replaces a file: name a new one"),
        false,
    )
}
