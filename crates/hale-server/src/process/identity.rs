//! Who an agent runs as: `user = "name[:group]"` of an `[[agent]]`.
//!
//! An agent that runs as hale's own user can read everything hale can: the data directory
//! with the log, the admin token and the signing key. Run as another user it cannot, as
//! long as those are private to hale's user (the data directory is 0700, or 0711 when
//! agents work under it, and every file in it 0600; see `DataDir`).
//!
//! Names are looked up through the system's user database (NSS, so LDAP users work), once
//! before each start. The switch itself happens in the child between fork and exec
//! (`spawn.rs`): supplementary groups (the user's, as `initgroups` gives them, or only the
//! named group), then the group, then the user, so the program runs as that user from
//! its first instruction and cannot switch back.

use nix::unistd::{Gid, Group, Uid, User};
use std::ffi::CString;
use std::path::PathBuf;

/// A resolved `user`: the ids the child switches to, and what its environment says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// The user's name (the number as text if it has none).
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the user's memberships when no group was named, else only
    /// the group.
    pub groups: Vec<u32>,
    /// The user's home directory (`HOME` in its environment), `/` if it has none.
    pub home: PathBuf,
}

/// Resolves `spec`: `user`, `user:group`, or numeric ids in either place.
pub fn resolve(spec: &str) -> Result<RunAs, String> {
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(format!("user {spec:?} is not `name` or `name:group`"));
    }
    let lookup_error = |error: nix::Error| format!("cannot look up user {user:?}: {error}");
    let entry = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)).map_err(lookup_error)?,
        Err(_) => User::from_name(user).map_err(lookup_error)?,
    };
    let (name, uid, primary, home) = match (entry, user.parse::<u32>()) {
        (Some(entry), _) => (entry.name.clone(), entry.uid.as_raw(), entry.gid.as_raw(), entry.dir.clone()),
        // A bare number need not be in the user database (as in containers).
        (None, Ok(uid)) => (uid.to_string(), uid, uid, PathBuf::from("/")),
        (None, Err(_)) => {
            return Err(format!(
                "there is no user {user:?} on this machine; create it (useradd --system {user}) or use a numeric uid"
            ));
        }
    };
    let (gid, groups) = match group {
        Some(group) => {
            let gid = match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => Group::from_name(group)
                    .map_err(|error| format!("cannot look up group {group:?}: {error}"))?
                    .ok_or_else(|| format!("there is no group {group:?} on this machine"))?
                    .gid
                    .as_raw(),
            };
            (gid, vec![gid])
        }
        None => {
            let groups = CString::new(name.clone())
                .ok()
                .and_then(|cname| nix::unistd::getgrouplist(&cname, Gid::from_raw(primary)).ok())
                .map(|groups| groups.into_iter().map(Gid::as_raw).collect())
                .unwrap_or_else(|| vec![primary]);
            (primary, groups)
        }
    };
    Ok(RunAs { name, uid, gid, groups, home })
}

/// Whether this hale may start processes as other users: it runs as root, or holds the
/// capabilities the switch needs (set the ids, signal and find the agents again after a
/// restart, give an agent its working directory). `Err` says what is missing.
pub fn can_switch() -> Result<(), String> {
    if rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> =
        NEEDED.iter().filter(|(bit, _)| effective & (1 << bit) == 0).map(|(_, name)| *name).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "hale runs as uid {} without {}: start it as root, or give it these capabilities \
         (systemd: AmbientCapabilities={}), or remove `user` from the agents",
        rustix::process::geteuid().as_raw(),
        missing.join(", "),
        NEEDED.iter().map(|(_, name)| *name).collect::<Vec<_>>().join(" "),
    ))
}

/// The capabilities (bit, name) that running agents as other users takes: CAP_CHOWN for
/// their working directories, CAP_KILL to stop them, CAP_SETGID and CAP_SETUID to switch,
/// CAP_SYS_PTRACE to read their environment when a restarted hale looks for them.
const NEEDED: [(u32, &str); 5] =
    [(0, "CAP_CHOWN"), (5, "CAP_KILL"), (6, "CAP_SETGID"), (7, "CAP_SETUID"), (19, "CAP_SYS_PTRACE")];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_by_name_and_by_number() {
        let by_name = resolve("root").unwrap();
        assert_eq!((by_name.uid, by_name.gid, by_name.name.as_str()), (0, 0, "root"));
        let by_number = resolve("0:0").unwrap();
        assert_eq!((by_number.uid, by_number.gid, by_number.groups.as_slice()), (0, 0, &[0][..]));
        // A uid the user database does not know is still a uid.
        let unknown = resolve("4000123").unwrap();
        assert_eq!((unknown.uid, unknown.gid), (4000123, 4000123));
    }

    #[test]
    fn unknown_names_are_refused_with_what_to_do() {
        let error = resolve("hale-no-such-user").unwrap_err();
        assert!(error.contains("no user") && error.contains("useradd"), "{error}");
        let error = resolve("root:hale-no-such-group").unwrap_err();
        assert!(error.contains("no group"), "{error}");
        assert!(resolve(":x").unwrap_err().contains("name:group"));
        assert!(resolve("root:").unwrap_err().contains("name:group"));
    }
}
