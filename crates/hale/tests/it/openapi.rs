//! `GET /v1/openapi.json` on the real binary: served without a token, and every path and
//! method it documents answers (a unit test in hale-server holds the document equal to
//! the route table the router is built from; this checks the running server too).

use crate::support::{self, http_as};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A value for each path parameter: the probe only asks whether a route exists.
fn fill(path: &str) -> String {
    path.replace("{agent}", "openapi-probe").replace("{task}", "1").replace("{conversation}", "c-1")
}

/// Status and body of a request with the admin token, reading only the head of a response
/// that streams (the event stream never ends).
fn ask(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = if method == "POST" { "{}" } else { "" };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        support::ADMIN,
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buffer) {
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&response);
        if text.contains("text/event-stream") && text.contains("\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default())
}

#[test]
fn the_document_is_public_and_every_documented_route_answers() {
    let data = tempfile::tempdir().unwrap();
    let hale = support::serve(data.path(), &[]);
    let (status, _, document) = http_as(hale.addr, None, "GET", "/v1/openapi.json", b"");
    assert_eq!(status, 200, "the document is served without a token: {document}");
    let document: Value = serde_json::from_str(&document).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().unwrap();
    assert!(paths.len() > 40, "{} paths", paths.len());
    let mut checked = 0;
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys().filter(|key| *key != "parameters") {
            let method = method.to_uppercase();
            let (status, body) = ask(hale.addr, &method, &fill(path));
            // A handler may answer 404 for a missing agent or task, with its own code; the
            // router's 404 says there is no such endpoint.
            let unrouted = status == 404 && body.contains("no such endpoint");
            assert!(
                status != 0 && status != 405 && !unrouted,
                "{method} {path} is documented but answered {status}: {body}"
            );
            checked += 1;
        }
    }
    assert!(checked >= paths.len(), "{checked} operations checked");
    // Errors that axum raises before a handler runs carry the documented body too.
    for path in ["/v1/agents/%FF", "/v1/agents/a/mailbox?after=x", "/v1/session"] {
        let (status, body) = ask(hale.addr, "GET", path);
        let error: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("GET {path}: {status} {body}"));
        assert_eq!(error["error"]["code"], "bad_request", "GET {path}: {body}");
        assert!(error["error"]["message"].as_str().is_some_and(|message| !message.is_empty()), "{body}");
    }
}
