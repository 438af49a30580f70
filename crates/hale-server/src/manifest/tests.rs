use super::*;

fn parse(text: &str) -> Result<Manifest, ManifestError> {
    Manifest::parse(text, Path::new("hale.toml"))
}

fn error(text: &str) -> String {
    parse(text).expect_err("must be refused").to_string()
}

#[test]
fn the_shipped_example_is_valid_and_means_what_it_says() {
    let manifest = Manifest::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hale.example.toml")).unwrap();
    assert_eq!(manifest.agents.len(), 1);
    let agent = &manifest.agents[0];
    assert_eq!(agent.name.as_ref().unwrap().get_ref(), "code-generator-1");
    assert_eq!((agent.restart, agent.criticality), (RestartPolicy::OnFailure, Criticality::Normal));
    assert_eq!(agent.resources.memory_mb, Some(1024));
    assert_eq!(manifest.groups[0].strategy, Strategy::OneForOne);
    assert_eq!((manifest.roles[0].min, manifest.roles[0].max), (1, 3));
    assert_eq!(manifest.roles[0].template.as_ref().unwrap().criticality, Criticality::Critical);
    assert_eq!(manifest.limits, Limits::default());
    assert_eq!(manifest.supervision.detector, PhiConfig::default());
    assert_eq!(manifest.supervision.intensity, Intensity::default());
    let defaults = SupervisionSection::default();
    assert_eq!(manifest.supervision.stall, StallPolicy { beats: None, quiet_ms: Some(600_000) });
    assert_eq!(manifest.supervision.stall, defaults.stall);
    assert_eq!(
        (manifest.supervision.reconnect_grace_ms, manifest.supervision.progress_log_ms),
        (defaults.reconnect_grace_ms, defaults.progress_log_ms)
    );
    assert_eq!((manifest.supervision.log_bytes_max, manifest.supervision.logs_kept), (10 * 1024 * 1024, 5));
    assert_eq!(manifest.supervision.breaker, BreakerPolicy::default());
    assert_eq!(manifest.supervision.quarantine, QuarantinePolicy::default());
    assert_eq!(agent.stall, Some(StallPolicy { beats: Some(30), quiet_ms: None }));
    assert_eq!((agent.resources.cpu_percent, agent.resources.address_space_mb), (Some(100), Some(8192)));
    // Relative paths resolve against the directory of hale.toml.
    let supervise = manifest.supervise(Path::new("/etc/hale"));
    let declared = &supervise.agents[0];
    assert_eq!(declared.process.workdir.as_deref(), Some(Path::new("/etc/hale")));
    assert_eq!(declared.supervision.stall, StallPolicy { beats: Some(30), quiet_ms: None });
    assert_eq!(supervise.log_bytes_max, 10 * 1024 * 1024);
    let backup = manifest.backup_schedule().unwrap();
    assert_eq!((backup.dir.as_path(), backup.every.as_secs(), backup.keep), (Path::new("hale-backups"), 3600, 24));
}

#[test]
fn an_empty_file_is_all_defaults() {
    let manifest = parse("").unwrap();
    assert!(manifest.agents.is_empty());
    assert_eq!(manifest.snapshots.every_events, 10_000);
    assert_eq!(manifest.supervision.stop_grace_ms, 5_000);
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let message = error("[server]\nlisten = \"127.0.0.1:7700\"\ncolour = \"red\"\n");
    assert!(message.contains("line 3"), "{message}");
    assert!(message.contains("colour"), "{message}");
    let message = error("[[agent]]\nname = \"a\"\ncommand = \"x\"\nrestrat = \"always\"\n");
    assert!(message.contains("line 4") && message.contains("restrat"), "{message}");
    let message = error("[limits]\npatch_bytes = 1\n");
    assert!(message.contains("line 2") && message.contains("patch_bytes"), "{message}");
}

#[test]
fn bad_values_say_what_is_allowed() {
    let message = error("[[agent]]\nname = \"a\"\ncommand = \"x\"\nrestart = \"sometimes\"\n");
    assert!(message.contains("line 4") && message.contains("on-failure"), "{message}");
    let message = error("[server]\nlisten = \"nowhere\"\n");
    assert!(message.contains("line 2"), "{message}");
}

#[test]
fn inconsistent_files_are_refused_with_the_line() {
    let cases = [
        ("[[agent]]\nname = \"a\"\n", "line 2", "no command"),
        ("[[agent]]\ncommand = \"x\"\n", "line 1", "no name"),
        ("[[agent]]\nname = \"a b\"\ncommand = \"x\"\n", "line 2", "may only contain"),
        (
            "[[agent]]\nname = \"a\"\ncommand = \"x\"\n[[agent]]\nname = \"a\"\ncommand = \"y\"\n",
            "line 5",
            "declared twice",
        ),
        ("[[agent]]\nname = \"a\"\ncommand = \"x\"\ngroup = \"ghost\"\n", "line 4", "no [[group]]"),
        ("[[role]]\nname = \"r\"\nmin = 3\nmax = 2\n", "line 2", "min 3 is more than max 2"),
        ("[[role]]\nname = \"r\"\nmin = 1\n", "line 2", "no template"),
        ("[[role]]\nname = \"r\"\ntemplate = { name = \"x\", command = \"y\" }\n", "line 3", "takes no name"),
        ("[[agent]]\nname = \"a\"\ncommand = \"x\"\nresources = { memory_mb = 0 }\n", "line 2", "limit of 0"),
        ("[[agent]]\nname = \"a\"\ncommand = \"x\"\nresources = { pids_max = 0 }\n", "line 2", "limit of 0"),
        (
            "[[agent]]\nname = \"a\"\ncommand = \"x\"\nresources = { cpu_quota_percent = 200000 }\n",
            "line 2",
            "percent of one core (150 = 1.5 cores), at most 100000",
        ),
        ("[[agent]]\nname = \"a\"\ncommand = \"x\"\nresources = { memory_mb = 2147483648 }\n", "line 2", "in MiB"),
        ("[[agent]]\nname = \"a\"\ncommand = \"x\"\nresources = { pids_max = 9999999 }\n", "line 2", "at most 4194304"),
        ("[supervision]\ncgroups = \"on\"\n", "line 2", "auto"),
        ("[[agent]]\nname = \"a\"\ncommand = \"x\"\nhealth = { url = \"ftp://x\" }\n", "line 2", "http://"),
    ];
    for (text, line, words) in cases {
        let message = error(text);
        assert!(message.contains(line) && message.contains(words), "{text:?} gave: {message}");
    }
}

#[test]
fn criticality_sets_the_heartbeat_interval() {
    assert_eq!(Criticality::Critical.heartbeat_interval_ms(), 500);
    assert_eq!(Criticality::Normal.heartbeat_interval_ms(), 1_000);
    assert_eq!(Criticality::Background.heartbeat_interval_ms(), 5_000);
}

#[test]
fn the_backup_section_is_parsed_and_checked_with_lines() {
    assert_eq!(parse("").unwrap().backup_schedule(), None);
    let schedule = parse("[backup]\ndir = \"/var/backups/hale\"\n").unwrap().backup_schedule().unwrap();
    assert_eq!(schedule.dir, Path::new("/var/backups/hale"));
    assert_eq!((schedule.every.as_secs(), schedule.keep), (3600, 24));
    let schedule = parse("[backup]\ndir = \"b\"\nevery_s = 60\nkeep = 3\n").unwrap().backup_schedule().unwrap();
    assert_eq!((schedule.every.as_secs(), schedule.keep), (60, 3));
    let cases = [
        ("[server]\n\n[backup]\nevery_s = 5\n", "line 3", "needs dir"),
        ("[backup]\ndir = \"b\"\nevery_s = 0\n", "line 3", "every_s must be at least 1"),
        ("[backup]\ndir = \"b\"\n\nkeep = 0\n", "line 4", "keep must be at least 1"),
        ("[backup]\ndir = \"\"\n", "line 2", "empty"),
        ("[backup]\ndir = \"b\"\nevery = 5\n", "line 3", "every"),
        ("[backup]\ndir = \"b\"\nkeep = -1\n", "line 3", "keep"),
    ];
    for (text, line, words) in cases {
        let message = error(text);
        assert!(message.contains(line) && message.contains(words), "{text:?} gave: {message}");
    }
}

#[test]
fn the_examples_hook_is_valid_once_uncommented() {
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hale.example.toml")).unwrap();
    let start = example.find("# [[hook]]").expect("the example has a hook");
    let hook: String =
        example[start..].lines().map(|line| line.strip_prefix("# ").unwrap_or(line)).collect::<Vec<_>>().join("\n");
    let manifest = parse(&hook).unwrap();
    let hooks = manifest.hooks(Path::new("/etc/hale")).unwrap();
    assert_eq!(hooks.len(), 1);
    let pager = &hooks[0];
    assert_eq!(pager.name.as_str(), "pager");
    assert_eq!(pager.on.len(), 7);
    assert_eq!(pager.target, crate::hooks::HookTarget::Webhook { url: "http://127.0.0.1:9000/hale".into() });
    assert_eq!((pager.timeout.as_millis(), pager.retries, pager.backoff.as_millis()), (5000, 5, 500));
}

#[test]
fn hooks_are_checked_with_their_line() {
    let message =
        error("[[hook]]\nname = \"pager\"\non = [\"agent.down\",\n  \"agent.exploded\"]\nwebhook = \"http://x:1/\"\n");
    assert!(message.contains("line 4"), "{message}");
    assert!(message.contains("\"agent.exploded\""), "{message}");
    assert!(message.contains("agent.down, agent.failed, agent.stalled"), "{message}");
    let message = error("[[hook]]\nname = \"pager\"\non = [\"agent.down\"]\n");
    assert!(message.contains("line 2") && message.contains("webhook"), "{message}");
    let message =
        error("[[hook]]\nname = \"pager\"\non = [\"agent.down\"]\nwebhook = \"http://x:1/\"\ncommand = [\"x\"]\n");
    assert!(message.contains("line 5") && message.contains("both"), "{message}");
    let message = error("[[hook]]\nname = \"p\"\non = [\"agent.down\"]\nwebhook = \"ftp://x/\"\n");
    assert!(message.contains("line 4") && message.contains("http://"), "{message}");
    let message = error("[[hook]]\nname = \"p\"\non = []\ncommand = [\"x\"]\n");
    assert!(message.contains("no `on`"), "{message}");
    let twice = "[[hook]]\nname = \"p\"\non = [\"task.failed\"]\ncommand = [\"x\"]\n";
    let message = error(&format!("{twice}{twice}"));
    assert!(message.contains("line 6") && message.contains("twice"), "{message}");
    let message = error("[[hook]]\nname = \"p\"\non = [\"task.failed\"]\ncommand = [\"x\"]\nretry = 3\n");
    assert!(message.contains("retry"), "{message}");
    // A relative command with a slash is relative to hale.toml; a bare one is looked up in PATH.
    let manifest =
        parse("[[hook]]\nname = \"p\"\non = [\"task.failed\"]\ncommand = [\"bin/notify\", \"-u\"]\n").unwrap();
    let target = &manifest.hooks(Path::new("/etc/hale")).unwrap()[0].target;
    assert_eq!(target, &crate::hooks::HookTarget::Command { argv: vec!["/etc/hale/bin/notify".into(), "-u".into()] });
}

#[test]
fn a_webhooks_secret_comes_from_a_file_or_a_variable_and_its_absence_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pager.secret"), "s3cret\n").unwrap();
    let hook = |secret: &str| {
        format!("[[hook]]\nname = \"pager\"\non = [\"agent.down\"]\nwebhook = \"http://x:1/\"\n{secret}\n")
    };
    let manifest = parse(&hook("secret_file = \"pager.secret\"")).unwrap();
    let hooks = manifest.hooks(dir.path()).unwrap();
    let expected = crate::hooks::HookSecret::new(b"s3cret".to_vec());
    assert_eq!(hooks[0].secret.as_ref(), Some(&expected), "read relative to hale.toml, trimmed");
    let manifest = parse(&hook("secret_file = \"missing.secret\"")).unwrap();
    let message = manifest.hooks(dir.path()).unwrap_err();
    assert!(message.contains("\"pager\"") && message.contains("missing.secret"), "{message}");
    let manifest = parse(&hook("secret_env = \"HALE_TEST_UNSET_SECRET_9f2\"")).unwrap();
    let message = manifest.hooks(dir.path()).unwrap_err();
    assert!(message.contains("HALE_TEST_UNSET_SECRET_9f2 is not set"), "{message}");
    let message = error(&hook("secret_env = \"A\"\nsecret_file = \"b\""));
    assert!(message.contains("line 6") && message.contains("both secret_env and secret_file"), "{message}");
    let message = error("[[hook]]\nname = \"p\"\non = [\"agent.down\"]\ncommand = [\"x\"]\nsecret_file = \"b\"\n");
    assert!(message.contains("line 5") && message.contains("command hook"), "{message}");
}

#[test]
fn a_cluster_section_says_what_it_lacks() {
    let cases = [
        ("[cluster]\nsecret_file = \"s\"\n", "line 1", "needs node_id"),
        ("[cluster]\nnode_id = 0\nsecret_file = \"s\"\n", "line 2", "at least 1"),
        ("[cluster]\nnode_id = 1\n", "line 1", "needs secret_file"),
        (
            "[cluster]\nnode_id = 1\nsecret_file = \"s\"\nheartbeat_ms = 300\n",
            "line 1",
            "more than twice the heartbeat",
        ),
        (
            "[cluster]\nnode_id = 1\nsecret_file = \"s\"\nnode_lease_ms = 2000\n",
            "line 1",
            "node_lease_ms (2000) must be at least three times election_max_ms (1000)",
        ),
        ("[cluster]\nnode_id = 1\nsecret_file = \"s\"\nname = \"a b\"\n", "line 4", "[cluster] name"),
        ("[[agent]]\nname = \"a\"\ncommand = \"sleep\"\nspread = true\n", "line 2", "put it in the role's template"),
        ("[[agent]]\nname = \"a\"\ncommand = \"sleep\"\nnodes = [\"-x\"]\n", "line 2", "nodes: node name"),
        ("[cluster]\nnode_id = 1\nsecret_file = \"s\"\npeers = []\n", "", "unknown field `peers`"),
    ];
    for (text, line, words) in cases {
        let message = error(text);
        assert!(message.contains(line) && message.contains(words), "{text:?} gave: {message}");
    }
    let manifest =
        parse("[cluster]\nnode_id = 3\nsecret_file = \"s\"\nelection_min_ms = 300\nelection_max_ms = 900\n").unwrap();
    let timeouts = manifest.cluster.as_ref().unwrap().get_ref().timeouts();
    assert_eq!(timeouts.election_max, std::time::Duration::from_millis(900));
    assert_eq!(timeouts.heartbeat, std::time::Duration::from_millis(100));
    // The node lease: 3 s, or three election timeouts when they are longer.
    let cluster = manifest.cluster.as_ref().unwrap().get_ref().clone();
    assert_eq!(cluster.node_lease(), std::time::Duration::from_secs(3));
    let slow =
        parse("[cluster]\nnode_id = 3\nsecret_file = \"s\"\nelection_min_ms = 1000\nelection_max_ms = 2000\n").unwrap();
    assert_eq!(slow.cluster.unwrap().get_ref().node_lease(), std::time::Duration::from_secs(6));
    // With agents: allowed, and their placement goes into their supervision.
    let placed = parse(
        "[cluster]\nnode_id = 1\nsecret_file = \"s\"\nlabels = { zone = \"eu\" }\n[[agent]]\nname = \"a\"\ncommand = \"sleep\"\nnodes = [\"node-2\"]\nnode_labels = { gpu = \"true\" }\n",
    )
    .unwrap();
    let supervise = placed.supervise(std::path::Path::new("/"));
    let placement = &supervise.agents[0].supervision.placement;
    assert_eq!(placement.nodes[0].as_str(), "node-2");
    assert_eq!(placement.node_labels.get("gpu").map(String::as_str), Some("true"));
}
