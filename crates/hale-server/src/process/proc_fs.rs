//! Reading `/proc/PID`: process identity (start time), liveness and resource use.

use super::{ProcessId, Usage};
use std::io;

/// The fields of `/proc/PID/stat` that hale uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: u8,
    /// Field 5: the process group.
    pub pgrp: i32,
    /// Field 14: user CPU time in clock ticks.
    pub utime: u64,
    /// Field 15: system CPU time in clock ticks.
    pub stime: u64,
    /// Field 22: start time in clock ticks since boot.
    pub start_ticks: u64,
}

impl Stat {
    /// A zombie (exited, not yet reaped) or a dead task is not a running process: it can
    /// do no work and will never write again, so for hale it is gone.
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parses the text of `/proc/PID/stat`.
///
/// Field 2 is the command name in parentheses, and that name may itself contain spaces
/// and parentheses (a program can name itself anything), so the fields after it are
/// found after the LAST `)` in the line.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let close = text.rfind(')')?;
    let mut fields = text[close + 1..].split_ascii_whitespace();
    // `nth` consumes, so each index is relative to the previous one; the first field
    // after `)` is field 3.
    let state = fields.next()?.bytes().next()?; // 3
    let pgrp = fields.nth(1)?.parse().ok()?; // 5
    let utime = fields.nth(8)?.parse().ok()?; // 14
    let stime = fields.next()?.parse().ok()?; // 15
    let start_ticks = fields.nth(6)?.parse().ok()?; // 22
    Some(Stat { state, pgrp, utime, stime, start_ticks })
}

/// Reads and parses `/proc/PID/stat`, whatever the state of the process (a zombie too).
pub(crate) fn read_stat(pid: u32) -> io::Result<Stat> {
    if pid == 0 {
        return Err(io::Error::new(io::ErrorKind::NotFound, "pid 0 is not a process"));
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse /proc/{pid}/stat: {text:?}")))
}

/// Reads the start time of a process from `/proc/PID/stat`.
///
/// It is `None` when there is no such process, and also for a zombie: a zombie has exited
/// and only waits for its parent to collect its status, so it must not count as a live
/// agent (an adopted agent's parent may never reap it).
pub fn start_ticks(pid: u32) -> Option<u64> {
    read_stat(pid).ok().filter(Stat::is_alive).map(|stat| stat.start_ticks)
}

/// Tells whether `id` still names a live process: `id.pid` exists, is not a zombie, and
/// started at `id.start_ticks`.
///
/// A restarted hale asks this before adopting an agent it recorded earlier: the same pid
/// with another start time is an unrelated process that got the recycled pid.
pub fn is_same_process(id: ProcessId) -> bool {
    start_ticks(id.pid) == Some(id.start_ticks)
}

/// Reads the resident set and the CPU time of a live process, for the detectors.
///
/// It is `None` if the process does not exist or is a zombie (whose figures are zero and
/// mean nothing). The resident set is `/proc/PID/statm` field 2 times the page size; the
/// CPU time is `utime + stime` from `/proc/PID/stat` converted from clock ticks.
pub fn usage(pid: u32) -> Option<Usage> {
    let stat = read_stat(pid).ok().filter(Stat::is_alive)?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident_pages: u64 = statm.split_ascii_whitespace().nth(1)?.parse().ok()?;
    let page_size = rustix::param::page_size() as u64;
    let ticks_per_second = match rustix::param::clock_ticks_per_second() {
        0 => 100,
        ticks => ticks,
    };
    let ticks = stat.utime.saturating_add(stat.stime);
    Some(Usage {
        rss_bytes: resident_pages.saturating_mul(page_size),
        cpu_ms: ticks.saturating_mul(1000) / ticks_per_second,
    })
}

/// Like [`usage`], summed over every live process of the process group `pgid`: an agent
/// that forks workers is measured whole. Scans `/proc`, so it costs a directory read per
/// call; the supervisor calls it about once a second per watched agent.
pub fn group_usage(pgid: u32) -> Option<Usage> {
    let leader = usage(pgid)?;
    let mut total = leader;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Some(total) };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        if pid == pgid {
            continue;
        }
        let in_group = read_stat(pid).ok().is_some_and(|stat| stat.is_alive() && stat.pgrp == pgid as i32);
        if in_group && let Some(member) = usage(pid) {
            total.rss_bytes = total.rss_bytes.saturating_add(member.rss_bytes);
            total.cpu_ms = total.cpu_ms.saturating_add(member.cpu_ms);
        }
    }
    Some(total)
}

/// Like [`group_usage`] for many process groups at once, with one scan of `/proc` (for a
/// metrics scrape, which would otherwise scan it once per agent). Groups whose leader is
/// gone are left out.
pub fn groups_usage(pgids: &[u32]) -> std::collections::BTreeMap<u32, Usage> {
    let mut totals: std::collections::BTreeMap<u32, Usage> =
        pgids.iter().filter_map(|pgid| Some((*pgid, usage(*pgid)?))).collect();
    let Ok(entries) = std::fs::read_dir("/proc") else { return totals };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        if totals.contains_key(&pid) {
            continue;
        }
        let Some(pgid) = read_stat(pid).ok().filter(Stat::is_alive).and_then(|stat| u32::try_from(stat.pgrp).ok())
        else {
            continue;
        };
        if totals.contains_key(&pgid)
            && let Some(member) = usage(pid)
            && let Some(total) = totals.get_mut(&pgid)
        {
            total.rss_bytes = total.rss_bytes.saturating_add(member.rss_bytes);
            total.cpu_ms = total.cpu_ms.saturating_add(member.cpu_ms);
        }
    }
    totals
}

/// A live process that a hale started for an agent, found by its environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub id: ProcessId,
    pub agent: String,
    pub incarnation: u64,
}

/// Every live process whose environment has `HALE_SUPERVISOR=supervisor` (the data
/// directory of the hale that started it), with its `HALE_AGENT` and `HALE_INCARNATION`.
///
/// The log records each agent's process, but only after the spawn: if hale dies between
/// logging a new incarnation and logging its process, this is how the next hale finds the
/// process rather than starting a duplicate. Processes of another user are not readable
/// and are skipped.
pub fn find_agents(supervisor: &str) -> Vec<Found> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let marker = format!("HALE_SUPERVISOR={supervisor}");
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let vars: Vec<&[u8]> = environ.split(|byte| *byte == 0).collect();
        if !vars.contains(&marker.as_bytes()) {
            continue;
        }
        let value = |key: &str| {
            vars.iter()
                .find_map(|var| var.strip_prefix(key.as_bytes())?.strip_prefix(b"="))
                .map(|value| String::from_utf8_lossy(value).into_owned())
        };
        let (Some(agent), Some(incarnation)) =
            (value("HALE_AGENT"), value("HALE_INCARNATION").and_then(|text| text.parse().ok()))
        else {
            continue;
        };
        let Ok(stat) = read_stat(pid) else { continue };
        // Only group leaders: what an agent started itself carries its environment too.
        if !stat.is_alive() || stat.pgrp != pid as i32 {
            continue;
        }
        found.push(Found { id: ProcessId { pid, start_ticks: stat.start_ticks }, agent, incarnation });
    }
    found
}
