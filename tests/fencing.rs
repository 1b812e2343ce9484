//! `fencing = "resource-and-stonith"` against real daemons on 127.0.0.1: the primary loses its
//! secondary (killed) with a write pending; the write waits for the `fence-peer` handler and
//! completes only after it answered; a handler that hangs past its timeout fails the write and
//! later ones with an I/O error, until `resume-io`.

mod common;

use common::nbd_client::{NbdClient, Outcome};
use common::{synced_pair, Cluster, Options};
use std::path::PathBuf;
use std::time::Duration;

const EIO: u32 = 5;

/// A directory holding the fence-peer script and the file it and the test write their steps to.
struct Steps {
    dir: tempfile::TempDir,
}

impl Steps {
    /// `body` runs after the script logged its call (`@STEPS@` is the steps file).
    fn new(body: &str) -> Steps {
        let dir = tempfile::tempdir().unwrap();
        let steps = dir.path().join("steps");
        let script = dir.path().join("fence.sh");
        let text = format!(
            "#!/bin/sh\necho \"fence-peer $BLKREPL_RESOURCE $BLKREPL_PEER $BLKREPL_FENCING $(cat)\" >> {steps}\n{}\n",
            body.replace("@STEPS@", &steps.display().to_string()),
            steps = steps.display()
        );
        std::fs::write(&script, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Steps { dir }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("steps")
    }

    fn add(&self, step: &str) {
        use std::io::Write;
        writeln!(std::fs::OpenOptions::new().create(true).append(true).open(self.file()).unwrap(), "{step}").unwrap();
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.file()).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    /// The resource file's settings for this script. Leaked: the options want a static text.
    fn extra(&self, timeout_s: u64) -> &'static str {
        let script = self.dir.path().join("fence.sh");
        let text = format!(
            "fencing = \"resource-and-stonith\"\n[handlers]\nfence-peer = \"{}\"\nhandler_timeout_s = {timeout_s}\n",
            script.display()
        );
        Box::leak(text.into_boxed_str())
    }
}

/// A synced pair fencing with `steps`' script; a client on alpha's export writes block 0
/// (pattern 0xA1) while beta is stopped, and beta's daemon is killed with the write pending.
/// Returns the cluster and the write's outcome, taken after `steps` records its completion.
fn write_pending_when_the_secondary_dies(steps: &Steps, timeout_s: u64) -> (Cluster, NbdClient, Outcome) {
    let c = synced_pair(Options { extra: steps.extra(timeout_s), ..Options::default() });
    let mut client = NbdClient::connect(c.nbd_address("alpha"), "r0", Duration::from_secs(120)).expect("connect to alpha");
    c.signal("beta", "STOP");
    let writer = std::thread::spawn(move || {
        let outcome = client.write(0, &[0xA1; 4096]);
        (client, outcome)
    });
    // Most likely in flight by then; one that arrives after the loss is held all the same.
    std::thread::sleep(Duration::from_millis(300));
    c.kill("beta");
    let (client, outcome) = writer.join().unwrap();
    steps.add("write answered");
    (c, client, outcome)
}

#[test]
fn a_write_pending_when_the_secondary_dies_completes_after_the_fence_peer_handler_outdated_it() {
    let steps = Steps::new("sleep 1\necho 'handler answers 4' >> @STEPS@\nexit 4");
    let (c, mut client, outcome) = write_pending_when_the_secondary_dies(&steps, 30);
    assert!(matches!(outcome, Outcome::Answered(0)), "{outcome:?}");
    let lines = steps.lines();
    assert_eq!(lines.len(), 3, "{lines:?}\n{}", c.logs());
    assert!(lines[0].starts_with("fence-peer r0 beta resource-and-stonith {") && lines[0].contains("\"handler\":\"fence-peer\""), "{lines:?}");
    assert_eq!(lines[1..], ["handler answers 4", "write answered"], "the write completed only after the handler answered");
    let status = c.wait_for("alpha", "the fence over", |s| s.get("io_suspended").is_none());
    assert_eq!(Cluster::peer(&status, "beta")["peer_disk"], "Outdated", "{status}");
    let mut back = [0u8; 4096];
    assert!(matches!(client.read(0, &mut back), Outcome::Answered(0)));
    assert_eq!(back, [0xA1; 4096]);
}

#[test]
fn a_fence_peer_handler_that_hangs_fails_writes_until_resume_io() {
    let steps = Steps::new("sleep 600");
    let (c, mut client, outcome) = write_pending_when_the_secondary_dies(&steps, 1);
    assert!(matches!(outcome, Outcome::Answered(EIO)), "the held write fails once the handler is killed: {outcome:?}");
    let status = c.status("alpha");
    assert_eq!(status["io_suspended"], "fence-failed", "{status}");
    assert!(c.ok("alpha", &["status", "r0"]).contains("io-suspended:fence-failed"));
    assert!(matches!(client.write(4096, &[0xB2; 4096]), Outcome::Answered(EIO)), "so do new writes");
    c.ok("alpha", &["resume-io", "r0"]);
    assert!(matches!(client.write(8192, &[0xC3; 4096]), Outcome::Answered(0)), "writes go on after resume-io");
    assert!(matches!(client.flush(), Outcome::Answered(0)));
    let mut back = [0u8; 4096];
    assert!(matches!(client.read(8192, &mut back), Outcome::Answered(0)));
    assert_eq!(back, [0xC3; 4096]);
    assert!(!c.cli("alpha", &["resume-io", "r0"]).status.success(), "nothing left to resume");
}
