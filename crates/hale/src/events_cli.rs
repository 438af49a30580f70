//! `hale events` (the log as an audit trail) and `hale dashboard` (the URL of the page).

use crate::cli::{ServerArg, http_base};
use anyhow::{Context, Result, bail};
use hale_client::{EventFilter, EventInfo};
use hale_server::api::events::{format_time_ms, parse_time_ms};
use std::io::Write;

#[derive(Debug, clap::Args)]
pub(crate) struct EventsArgs {
    /// Only events about this agent.
    #[arg(long)]
    agent: Option<String>,
    /// Only events of this kind, e.g. agent_down (several: comma-separated).
    #[arg(long)]
    kind: Option<String>,
    /// Only events since then: RFC 3339 (2025-01-31T12:00:00Z) or a time ago (30s, 10m,
    /// 2h, 1d).
    #[arg(long)]
    since: Option<String>,
    /// Only events after this sequence number.
    #[arg(long)]
    after: Option<u64>,
    /// Print at most this many (without --follow).
    #[arg(long)]
    limit: Option<usize>,
    /// Keep printing events as they become durable (from --since or --after, else from now).
    #[arg(long, short = 'f')]
    follow: bool,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArg,
}

pub(crate) async fn events(args: EventsArgs) -> Result<i32> {
    let admin = args.server.admin()?;
    let since_ms = args.since.as_deref().map(since_ms).transpose()?;
    let mut filter =
        EventFilter { agent: args.agent.clone(), kind: args.kind.clone(), since_ms, after: args.after, limit: None };
    let json = args.json;
    if args.follow {
        admin.follow_events(&filter, |event| print_event(&event, json)).await?;
        return Ok(0);
    }
    // Page through the log: the server answers at most 10,000 at a time.
    let mut left = args.limit.unwrap_or(usize::MAX);
    while left > 0 {
        filter.limit = Some(left.min(hale_server::api::events::EVENTS_LIMIT_MAX));
        let page = admin.events(&filter).await?;
        let Some(last) = page.last() else { break };
        filter.after = Some(last.seq);
        left -= page.len();
        let full = Some(page.len()) == filter.limit;
        for event in &page {
            print_event(event, json);
        }
        if !full {
            break;
        }
    }
    Ok(0)
}

fn print_event(event: &EventInfo, json: bool) {
    let line = if json {
        serde_json::to_string(event).expect("events serialize")
    } else {
        format!(
            "{}  {:>7}  {:<22} {:<20} {}",
            format_time_ms(event.at_ms),
            event.seq,
            event.kind,
            event.agent.as_deref().unwrap_or("-"),
            event.summary
        )
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) ends the output, not the program with a panic.
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// `--since`: RFC 3339, milliseconds since the epoch, or a time ago (`500ms`, `30s`,
/// `10m`, `2h`, `1d`).
fn since_ms(text: &str) -> Result<u64> {
    if let Some(ms) = parse_time_ms(text) {
        return Ok(ms);
    }
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "s" | "sec" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("--since {text:?}: give an RFC 3339 time (2025-01-31T12:00:00Z) or a time ago (30s, 10m, 2h, 1d)"),
    };
    let number: u64 = number.parse().with_context(|| format!("--since {text:?}: no number before {unit:?}"))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    Ok(now.saturating_sub(number.saturating_mul(unit_ms)))
}

/// `hale dashboard`: prints the page's address with the admin token in its fragment,
/// which the browser keeps to itself (it is never sent to the server or logged).
pub(crate) fn dashboard(server: &ServerArg) -> Result<i32> {
    let Some(token) = server.token() else {
        bail!(
            "no admin token: pass --token or HALE_TOKEN, or --data with the data directory of hale on this machine (it keeps admin.token there)"
        );
    };
    let base = http_base(server.server.first().map_or("http://127.0.0.1:7700", String::as_str));
    println!("{}/#token={}", base.trim_end_matches('/'), fragment_encode(&token));
    Ok(0)
}

fn fragment_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_times_and_durations() {
        assert_eq!(since_ms("2025-01-31T12:00:00Z").unwrap(), 1_738_324_800_000);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let ten_minutes_ago = since_ms("10m").unwrap();
        assert!(now - ten_minutes_ago >= 600_000 && now - ten_minutes_ago < 605_000);
        assert!(since_ms("10 parsecs").is_err());
        assert!(since_ms("m").is_err());
        assert_eq!(fragment_encode("ab+/c"), "ab%2B%2Fc");
    }
}
