//! `blkrepl promoter` processes for a test cluster, whose services are marker files: a node's
//! marker exists exactly while the promoter there has its services started.

use super::Cluster;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the markers are sampled, and how long a test waits for what it expects.
pub const SAMPLE: Duration = Duration::from_millis(50);
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A running `blkrepl promoter r0`; killed when dropped if it has not been stopped.
pub struct Promoter {
    child: Option<Child>,
    pub node: String,
}

impl Cluster {
    /// Adds a `[promoter]` section whose service creates the node's marker file on start and
    /// removes it on stop (the promoters get the markers' directory in their environment).
    pub fn add_promoter_section(&self) {
        std::fs::create_dir_all(self.markers()).unwrap();
        let section = "\n[promoter]\nstart = [\"touch \\\"$PROMOTER_MARKERS/$BLKREPL_NODE\\\"\"]\n\
                       stop = [\"rm -f \\\"$PROMOTER_MARKERS/$BLKREPL_NODE\\\"\"]\nstart_timeout_s = 10\nstop_timeout_s = 10\n";
        let path = self.config_dir().join("r0.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text + section).unwrap();
    }

    fn markers(&self) -> PathBuf {
        self.dir.path().join("markers")
    }

    /// The file that exists while `node`'s services run.
    pub fn marker(&self, node: &str) -> PathBuf {
        self.markers().join(node)
    }

    /// Starts `blkrepl promoter r0` for `node`, in its namespace when the cluster has them.
    pub fn promoter(&self, node: &str) -> Promoter {
        std::fs::create_dir_all(self.run_dir()).unwrap();
        let child = self
            .blkrepl(node)
            .args(["promoter", "r0"])
            .env("PROMOTER_MARKERS", self.markers())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.promoter_log(node)).unwrap())
            .spawn()
            .unwrap();
        Promoter { child: Some(child), node: node.to_owned() }
    }

    /// Waits until `cond` holds, checked every [`SAMPLE`]; panics after [`DEADLINE`] with the
    /// daemons' and the promoters' logs.
    pub fn wait_until(&self, what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", self.promoter_logs());
            std::thread::sleep(SAMPLE);
        }
    }

    /// The daemons' logs and those of the promoters started.
    pub fn promoter_logs(&self) -> String {
        let mut out = self.logs();
        for node in &self.nodes {
            if let Ok(log) = std::fs::read_to_string(self.promoter_log(node)) {
                out += &format!("--- promoter log of {node} ---\n{log}");
            }
        }
        out
    }

    fn promoter_log(&self, node: &str) -> PathBuf {
        self.run_dir().join(format!("promoter.{node}.log"))
    }
}

impl Promoter {
    /// SIGTERM, then its exit status (within [`DEADLINE`]).
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("a running promoter");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "promoter on {} did not exit after SIGTERM", self.node);
            std::thread::sleep(SAMPLE);
        }
    }

    /// Whether the process still runs (it never exits by itself unless it gave up).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Promoter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Samples marker files every [`SAMPLE`] on a thread of its own, for the whole of a scenario.
pub struct MarkerSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Samples>,
}

/// What the sampler saw.
#[derive(Debug, Default)]
pub struct Samples {
    pub taken: usize,
    /// Samples at which more than one marker existed, with the time since the start.
    pub overlaps: Vec<Duration>,
}

impl MarkerSampler {
    pub fn start(markers: Vec<PathBuf>) -> MarkerSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let (start, mut samples) = (Instant::now(), Samples::default());
            while !stopping.load(Ordering::Relaxed) {
                if markers.iter().filter(|m| Path::new(m).exists()).count() > 1 {
                    samples.overlaps.push(start.elapsed());
                }
                samples.taken += 1;
                std::thread::sleep(SAMPLE);
            }
            samples
        });
        MarkerSampler { stop, thread }
    }

    pub fn finish(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}
