//! Every bad input gets a clear error, the right exit code, and loses nothing.

mod common;

use common::{text, Cluster, Options};
use std::io::{Seek, SeekFrom, Write};

fn stderr_of(out: &std::process::Output) -> String {
    text(&out.stderr)
}

#[test]
fn cli_typo_is_a_usage_error() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    let out = c.cli("alpha", &["primray", "r0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("unrecognized subcommand"), "{}", stderr_of(&out));
    let out = c.cli("alpha", &["primary", "--froce", "r0"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn missing_config_names_the_file() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    let out = c.cli("alpha", &["up", "r9"]);
    assert_eq!(out.status.code(), Some(10));
    assert!(stderr_of(&out).contains("r9.toml"), "{}", stderr_of(&out));
}

/// Without a secret peers are not authenticated: `up` refuses unless the resource file says,
/// on purpose, that the network is trusted, and then says so in the log at every start.
#[test]
fn up_without_a_secret_is_refused_unless_the_network_is_trusted() {
    let c = Cluster::new(&["alpha", "beta"], Options { extra: "trusted_network = false", ..Options::default() });
    c.ok("alpha", &["create-md", "r0"]);
    let out = c.cli("alpha", &["up", "r0"]);
    assert_eq!(out.status.code(), Some(10), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("`secret`") && stderr_of(&out).contains("trusted_network = true"), "{}", stderr_of(&out));
    edit_config(&c, "trusted_network = false", "trusted_network = true");
    c.ok("alpha", &["up", "r0"]);
    assert!(c.logs().contains("trusted_network = true: peers are not authenticated"), "{}", c.logs());
}

#[test]
fn malformed_config_names_the_key() {
    let c = Cluster::new(&["alpha", "beta"], Options { extra: "resync_rate = 5", ..Options::default() });
    let out = c.cli("alpha", &["create-md", "r0"]);
    assert_eq!(out.status.code(), Some(10));
    assert!(stderr_of(&out).contains("resync_rate"), "{}", stderr_of(&out));
}

#[test]
fn unknown_node_lists_the_configured_ones() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    let out = c.cli("gamma", &["up", "r0"]);
    assert_eq!(out.status.code(), Some(10));
    assert!(stderr_of(&out).contains("alpha, beta"), "{}", stderr_of(&out));
}

#[test]
fn disk_too_small_for_metadata() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    std::fs::File::create(c.disk("alpha")).unwrap().set_len(16 << 10).unwrap();
    let out = c.cli("alpha", &["create-md", "r0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("too small"), "{}", stderr_of(&out));
}

#[test]
fn missing_disk_says_how_to_create_it() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    std::fs::remove_file(c.disk("alpha")).unwrap();
    let out = c.cli("alpha", &["create-md", "r0"]);
    assert!(stderr_of(&out).contains("truncate"), "{}", stderr_of(&out));
}

#[test]
fn existing_metadata_is_kept_without_force() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    c.ok("alpha", &["create-md", "r0"]);
    let out = c.cli("alpha", &["create-md", "r0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("--force"), "{}", stderr_of(&out));
    c.ok("alpha", &["create-md", "--force", "r0"]);
}

#[test]
fn metadata_of_another_resource_is_refused() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    c.ok("alpha", &["create-md", "r0"]);
    let r0 = std::fs::read_to_string(c.config_dir().join("r0.toml")).unwrap();
    std::fs::write(c.config_dir().join("r1.toml"), r0.replace("name = \"r0\"", "name = \"r1\"")).unwrap();
    let out = c.cli("alpha", &["up", "r1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("\"r0\""), "{}", stderr_of(&out));
    let out = c.cli("alpha", &["create-md", "r1"]);
    assert!(stderr_of(&out).contains("r0"), "{}", stderr_of(&out));
}

#[test]
fn corrupt_superblock_is_reported_not_trusted() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    c.ok("alpha", &["create-md", "r0"]);
    let mut disk = std::fs::OpenOptions::new().write(true).open(c.disk("alpha")).unwrap();
    let len = disk.metadata().unwrap().len();
    for slot_end in [len - 4096, len] {
        disk.seek(SeekFrom::Start(slot_end - 4096 + 100)).unwrap();
        disk.write_all(&[0xFF; 64]).unwrap();
    }
    drop(disk);
    let out = c.cli("alpha", &["up", "r0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("corrupt") || err.contains("damaged"), "{err}");
}

#[test]
fn second_up_is_refused() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    c.ok("alpha", &["create-md", "r0"]);
    c.ok("alpha", &["up", "r0"]);
    let out = c.cli("alpha", &["up", "r0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("already up"), "{}", stderr_of(&out));
    // The first daemon still answers.
    assert_eq!(c.status("alpha")["role"], "Secondary");
}

#[test]
fn commands_on_a_stopped_resource_say_so() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    let out = c.cli("alpha", &["primary", "r0"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr_of(&out).contains("blkrepl up r0"), "{}", stderr_of(&out));
}

/// Rewrites the shared resource file. Running daemons keep what they loaded, so the node
/// started next sees a file that disagrees with its peer's.
fn edit_config(c: &Cluster, from: &str, to: &str) {
    let path = c.config_dir().join("r0.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from));
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn peers_with_different_protocols_are_refused() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    c.create_md_and_up();
    c.wait_for("alpha", "connection", |s| Cluster::peer(s, "beta")["connection"] == "Connected");
    c.ok("beta", &["down", "r0"]);
    // beta's resource file now says protocol A.
    edit_config(&c, "protocol = \"C\"", "protocol = \"A\"");
    c.ok("beta", &["up", "r0"]);
    let s = c.wait_for("beta", "refusal", |s| {
        Cluster::peer(s, "alpha")["last_error"].as_str().is_some_and(|e| e.contains("protocol"))
    });
    assert_ne!(Cluster::peer(&s, "alpha")["connection"], "Connected");
}

#[test]
fn wrong_secret_is_refused_before_any_data() {
    let c = Cluster::new(&["alpha", "beta"], Options { extra: "secret = \"the right shared secret\"", ..Options::default() });
    c.create_md_and_up();
    c.wait_for("alpha", "connection", |s| Cluster::peer(s, "beta")["connection"] == "Connected");
    c.ok("beta", &["down", "r0"]);
    edit_config(&c, "secret = \"the right shared secret\"", "secret = \"the wrong shared secret\"");
    c.ok("beta", &["up", "r0"]);
    let s = c.wait_for("beta", "auth refusal", |s| {
        Cluster::peer(s, "alpha")["last_error"].as_str().is_some_and(|e| e.contains("authentication failed"))
    });
    assert_eq!(Cluster::peer(&s, "alpha")["received_bytes"], 0);
}
