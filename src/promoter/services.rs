//! Starting and stopping what a `[promoter]` section lists: shell commands (`sh -c`) and systemd
//! units (`systemctl start|stop`), one at a time, each in a process group of its own so that a
//! timeout kills whatever it started.

use crate::config::PromoterConfig;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often a running start or stop is checked for its end.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot run `{command}`: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("`{command}` did not finish within {timeout_s} s: killed")]
    Timeout { command: String, timeout_s: u64 },
    #[error("`{command}` failed ({status})")]
    Failed { command: String, status: ExitStatus },
    #[error("cannot wait for `{command}`: {source}")]
    Wait { command: String, source: std::io::Error },
}

/// One service: how to start it and how to stop it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Service {
    Commands { start: String, stop: String },
    Unit(String),
}

/// The services of one resource, in start order: the commands, then the units.
pub struct Services {
    services: Vec<Service>,
    systemctl: std::path::PathBuf,
    start_timeout: Duration,
    stop_timeout: Duration,
    /// Given to every command: `BLKREPL_RESOURCE`, `BLKREPL_NODE`.
    env: [(&'static str, String); 2],
}

impl Services {
    pub fn new(config: &PromoterConfig, resource: &str, node: &str) -> Services {
        let commands = config.commands.iter().map(|c| Service::Commands { start: c.start.clone(), stop: c.stop.clone() });
        Services {
            services: commands.chain(config.units.iter().cloned().map(Service::Unit)).collect(),
            systemctl: config.systemctl.clone(),
            start_timeout: config.start_timeout,
            stop_timeout: config.stop_timeout,
            env: [("BLKREPL_RESOURCE", resource.to_owned()), ("BLKREPL_NODE", node.to_owned())],
        }
    }

    /// Starts every service in order; on the first failure, how many were tried (that one
    /// included: it may have started half-way). Each outcome is logged.
    pub fn start(&self) -> Result<(), usize> {
        for (i, service) in self.services.iter().enumerate() {
            match self.run(service, true) {
                Ok(()) => tracing::info!(service = %self.describe(service, true), "started"),
                Err(e) => {
                    tracing::error!(error = %e, "a service failed to start: {e}");
                    return Err(i + 1);
                }
            }
        }
        Ok(())
    }

    /// Stops the first `count` services, last first, each one even when one before it failed;
    /// true when every stop succeeded.
    pub fn stop(&self, count: usize) -> bool {
        let mut all = true;
        for service in self.services[..count.min(self.services.len())].iter().rev() {
            match self.run(service, false) {
                Ok(()) => tracing::info!(service = %self.describe(service, false), "stopped"),
                Err(e) => {
                    tracing::error!(error = %e, "A SERVICE DID NOT STOP: {e}");
                    all = false;
                }
            }
        }
        all
    }

    fn describe(&self, service: &Service, start: bool) -> String {
        match service {
            Service::Commands { start: command, .. } if start => command.clone(),
            Service::Commands { stop, .. } => stop.clone(),
            Service::Unit(unit) => format!("{} {} {unit}", self.systemctl.display(), if start { "start" } else { "stop" }),
        }
    }

    fn run(&self, service: &Service, start: bool) -> Result<(), ServiceError> {
        let mut command = match service {
            Service::Commands { .. } => {
                let mut sh = Command::new("/bin/sh");
                sh.arg("-c").arg(self.describe(service, start));
                sh
            }
            Service::Unit(unit) => {
                let mut systemctl = Command::new(&self.systemctl);
                systemctl.arg(if start { "start" } else { "stop" }).arg(unit);
                systemctl
            }
        };
        command.envs(self.env.iter().map(|(k, v)| (k, v))).stdin(Stdio::null()).process_group(0);
        let timeout = if start { self.start_timeout } else { self.stop_timeout };
        run_bounded(&mut command, &self.describe(service, start), timeout)
    }
}

/// Runs `command` to its end, or kills its whole process group once `timeout` has passed.
fn run_bounded(command: &mut Command, description: &str, timeout: Duration) -> Result<(), ServiceError> {
    let described = || description.to_owned();
    let mut child = command.spawn().map_err(|source| ServiceError::Spawn { command: described(), source })?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(ServiceError::Failed { command: described(), status }),
            Ok(None) if Instant::now() >= deadline => {
                // Its own process group (see `run`): whatever the shell started goes too.
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                let _ = child.wait();
                return Err(ServiceError::Timeout { command: described(), timeout_s: timeout.as_secs() });
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(source) => return Err(ServiceError::Wait { command: described(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OnStopFailure, ServiceCommands};

    /// Services whose commands append their names to a log file, `fail` failing.
    fn services(dir: &std::path::Path, names: &[&str], fail: &str, timeout: Duration) -> Services {
        let log = dir.join("log");
        let command = |verb: &str, name: &str| {
            let status = if name == fail && verb == "start" { "exit 3" } else { "true" };
            format!("echo {verb}-{name}-$BLKREPL_NODE >> {}; {status}", log.display())
        };
        let config = PromoterConfig {
            commands: names.iter().map(|n| ServiceCommands { start: command("start", n), stop: command("stop", n) }).collect(),
            units: vec!["app.service".into()],
            systemctl: dir.join("systemctl"),
            start_timeout: timeout,
            stop_timeout: timeout,
            promote_delay: Duration::from_secs(1),
            on_stop_failure: OnStopFailure::Log,
        };
        let fake = format!("#!/bin/sh\necho \"systemctl $*\" >> {}\n", log.display());
        std::fs::write(dir.join("systemctl"), fake).unwrap();
        std::fs::set_permissions(dir.join("systemctl"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        Services::new(&config, "r0", "alpha")
    }

    fn log(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("log")).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    #[test]
    fn starts_in_order_commands_then_units_and_stops_in_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let s = services(dir.path(), &["a", "b"], "", Duration::from_secs(10));
        assert_eq!(s.start(), Ok(()));
        assert!(s.stop(3));
        assert_eq!(
            log(dir.path()),
            ["start-a-alpha", "start-b-alpha", "systemctl start app.service", "systemctl stop app.service", "stop-b-alpha", "stop-a-alpha"]
        );
    }

    #[test]
    fn a_failed_start_says_how_many_were_tried() {
        let dir = tempfile::tempdir().unwrap();
        let s = services(dir.path(), &["a", "b"], "b", Duration::from_secs(10));
        assert_eq!(s.start(), Err(2));
        assert!(s.stop(2));
        assert_eq!(log(dir.path()), ["start-a-alpha", "start-b-alpha", "stop-b-alpha", "stop-a-alpha"]);
    }

    #[test]
    fn a_command_past_its_timeout_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let mut sh = Command::new("/bin/sh");
        sh.arg("-c").arg(format!("sleep 30 & echo $! > {}; wait", pid_file.display())).process_group(0);
        let started = Instant::now();
        let err = run_bounded(&mut sh, "slow", Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, ServiceError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_owned();
        // Killed: gone, or a zombie until whoever inherited it reaps it.
        let dead = || std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| stat.contains(") Z "));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dead() {
            assert!(Instant::now() < deadline, "the command's background child {pid} outlived its timeout");
            std::thread::sleep(POLL);
        }
    }

    #[test]
    fn a_stop_that_fails_does_not_keep_the_others_from_stopping() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = services(dir.path(), &["a"], "", Duration::from_secs(10));
        s.systemctl = dir.path().join("missing-systemctl");
        assert!(!s.stop(2));
        assert_eq!(log(dir.path()), ["stop-a-alpha"]);
    }
}
