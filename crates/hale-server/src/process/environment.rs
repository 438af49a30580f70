//! What an agent's environment holds: never hale's whole environment.
//!
//! hale is often given its secrets in variables (`HALE_ADMIN_TOKEN`,
//! `HALE_ENCRYPTION_KEY`), and a child inherits everything by default, where anyone able to
//! read `/proc/PID/environ` of the agent (the agent itself, first) would find them. So an
//! agent starts from an empty environment and gets, in this order (a later source wins):
//!
//! 1. the variables of hale's own environment named in `pass_env` (default
//!    [`DEFAULT_PASS_ENV`]), never one of [`HALE_SECRETS`];
//! 2. `HOME`, `USER` and `LOGNAME` of the user it runs as, when it runs as another user;
//! 3. its `env_file`, read at each start (secrets the agent itself needs);
//! 4. its `env` from hale.toml;
//! 5. what hale sets: `HALE_URL`, `HALE_AGENT`, `HALE_INCARNATION`, its own tokens…

use std::collections::BTreeMap;
use std::ffi::OsString;

/// The variables of hale's environment an agent gets unless `pass_env` says otherwise:
/// where programs are and where the user lives, the locale and time zone, where temporary
/// files go, and the certificate bundle a model SDK should trust.
pub const DEFAULT_PASS_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TMPDIR",
    "TERM",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// hale's own secrets: an agent never gets them, whatever hale.toml says.
pub const HALE_SECRETS: &[&str] = &["HALE_ADMIN_TOKEN", "HALE_ENCRYPTION_KEY", "HALE_ENCRYPTION_KEY_FILE"];

/// What hale sets for each agent itself: hale.toml's `env` may not set them.
pub const HALE_SETS: &[&str] = &[
    "HALE_URL",
    "HALE_AGENT",
    "HALE_INCARNATION",
    "HALE_SUPERVISOR",
    "HALE_TOKEN",
    "HALE_REFRESH_TOKEN",
    "HALE_CA_FILE",
];

/// Why a variable may not be given to an agent, or `None` if it may.
pub fn refused(name: &str, source: &str) -> Option<String> {
    if HALE_SECRETS.contains(&name) {
        return Some(format!(
            "{source} names {name}, which holds a secret of hale's: an agent never gets it \
             (it would let the agent act as the admin or read the log); give the agent what it \
             needs through its own `env` or `env_file`"
        ));
    }
    if source != "pass_env" && HALE_SETS.contains(&name) {
        return Some(format!("{source} sets {name}, which hale sets itself for every agent it starts; remove it"));
    }
    if source == "pass_env" && crate::notify::SYSTEMD_VARIABLES.contains(&name) {
        return Some(format!(
            "pass_env names {name}: systemd's notify socket, watchdog and credentials are hale's alone"
        ));
    }
    if source == "pass_env" && name.starts_with("HALE_") {
        return Some(format!(
            "pass_env names {name}: hale's own HALE_ settings are not passed to agents; \
             set what the agent needs in its `env`"
        ));
    }
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        return Some(format!("{source} has an invalid variable name {name:?}"));
    }
    None
}

/// The variables an agent starts with, from `pass_env` (names looked up in `hale_env`),
/// then `identity` (HOME, USER, LOGNAME), `file` and `env` in that order. hale's own
/// `HALE_*` variables for the agent go into `env` before this is called.
pub fn agent_environment(
    pass_env: &[String],
    hale_env: impl IntoIterator<Item = (OsString, OsString)>,
    identity: &[(&str, OsString)],
    file: &[(String, String)],
    env: &BTreeMap<String, String>,
) -> BTreeMap<OsString, OsString> {
    let mut out = BTreeMap::new();
    for (name, value) in hale_env {
        let passed = name
            .to_str()
            .is_some_and(|name| pass_env.iter().any(|wanted| wanted == name) && refused(name, "pass_env").is_none());
        if passed {
            out.insert(name, value);
        }
    }
    for (name, value) in identity {
        out.insert(OsString::from(name), value.clone());
    }
    for (name, value) in file.iter().map(|(name, value)| (name, value)).chain(env) {
        out.insert(OsString::from(name), OsString::from(value));
    }
    out
}

/// Parses an `env_file`: `NAME=value` lines as systemd's `EnvironmentFile=` reads them.
/// Blank lines and lines starting with `#` or `;` are skipped, an `export ` prefix is
/// allowed, and a value may be quoted: in double quotes `\"`, `\\`, `\n` and `\$` are
/// escapes; in single quotes nothing is. Errors name the line.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let Some((name, value)) = line.split_once('=') else {
            return Err(format!("line {number}: expected NAME=value"));
        };
        let name = name.trim();
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!("line {number}: {name:?} is not a variable name (letters, digits and _)"));
        }
        if let Some(why) = refused(name, "the env_file") {
            return Err(format!("line {number}: {why}"));
        }
        out.push((name.to_string(), unquote(value.trim()).map_err(|why| format!("line {number}: {why}"))?));
    }
    Ok(out)
}

fn unquote(value: &str) -> Result<String, String> {
    if let Some(inner) = value.strip_prefix('\'') {
        return inner.strip_suffix('\'').map(str::to_string).ok_or_else(|| "unterminated single quote".to_string());
    }
    let Some(inner) = value.strip_prefix('"') else { return Ok(value.to_string()) };
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' if chars.as_str().trim().is_empty() => return Ok(out),
            '"' => return Err("text after the closing double quote".into()),
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some(escaped @ ('"' | '\\' | '$' | '`')) => out.push(escaped),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => break,
            },
            c => out.push(c),
        }
    }
    Err("unterminated double quote".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(name, value)| (OsString::from(name), OsString::from(value))).collect()
    }

    #[test]
    fn an_agent_gets_only_what_is_passed_and_never_hales_secrets() {
        let hale = os(&[
            ("PATH", "/usr/bin"),
            ("HALE_ADMIN_TOKEN", "admin-secret"),
            ("HALE_ENCRYPTION_KEY", "k1:AAAA"),
            ("AWS_SECRET_ACCESS_KEY", "aws"),
            ("LANG", "C.UTF-8"),
        ]);
        // Even an operator who lists a secret in pass_env does not pass it.
        let pass: Vec<String> = ["PATH", "LANG", "HALE_ADMIN_TOKEN"].map(String::from).to_vec();
        let env = BTreeMap::from([("MODEL".to_string(), "small".to_string())]);
        let got = agent_environment(&pass, hale, &[], &[], &env);
        let names: Vec<_> = got.keys().map(|name| name.to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["LANG", "MODEL", "PATH"]);
    }

    #[test]
    fn later_sources_win() {
        let hale = os(&[("HOME", "/root"), ("PATH", "/usr/bin")]);
        let pass: Vec<String> = ["HOME", "PATH"].map(String::from).to_vec();
        let identity = [("HOME", OsString::from("/home/agent"))];
        let file = vec![("PATH".to_string(), "/opt/bin".to_string()), ("KEY".to_string(), "file".to_string())];
        let env = BTreeMap::from([("KEY".to_string(), "toml".to_string())]);
        let got = agent_environment(&pass, hale, &identity, &file, &env);
        assert_eq!(got[&OsString::from("HOME")], "/home/agent");
        assert_eq!(got[&OsString::from("PATH")], "/opt/bin");
        assert_eq!(got[&OsString::from("KEY")], "toml");
    }

    #[test]
    fn env_files_read_as_systemd_reads_them() {
        let text =
            "# a comment\n; another\n\nexport A=1\nB = two words \nC=\"quoted \\\"x\\\" \\n $y\"\nD='single \\n'\nE=\n";
        let got = parse_env_file(text).unwrap();
        let want = [("A", "1"), ("B", "two words"), ("C", "quoted \"x\" \n $y"), ("D", "single \\n"), ("E", "")]
            .map(|(name, value)| (name.to_string(), value.to_string()));
        assert_eq!(got, want);
    }

    #[test]
    fn env_file_errors_name_the_line() {
        assert!(parse_env_file("A=1\nnot a line\n").unwrap_err().starts_with("line 2:"));
        assert!(parse_env_file("1A=x").unwrap_err().contains("not a variable name"));
        assert!(parse_env_file("A=\"open").unwrap_err().contains("unterminated"));
        let secret = parse_env_file("HALE_ADMIN_TOKEN=x").unwrap_err();
        assert!(secret.contains("secret of hale's"), "{secret}");
    }

    #[test]
    fn refusals_say_why() {
        assert!(refused("HALE_ENCRYPTION_KEY", "env").unwrap().contains("secret"));
        assert!(refused("HALE_URL", "env").unwrap().contains("hale sets"));
        assert!(refused("HALE_LOG", "pass_env").unwrap().contains("not passed"));
        assert!(refused("HALE_LOG", "env").is_none());
        assert!(refused("NOTIFY_SOCKET", "pass_env").unwrap().contains("hale's alone"));
        assert!(refused("OPENAI_API_KEY", "env").is_none());
    }
}
