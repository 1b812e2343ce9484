//! Asking the daemon for a role: `primary` (never `--force`: the daemon's refusal without quorum
//! or beside another primary is the promoter's safety, not an obstacle) and `secondary`.

use crate::control::client::{self, ClientError};
use crate::control::Request;
use std::path::Path;
use std::time::{Duration, Instant};

/// The exit codes the control socket answers with (docs/OPERATIONS.md, "Commands and exit codes").
const NOT_RUNNING: i32 = 3;
const IN_USE: i32 = 12;

/// How long a demotion refused because the device is in use is tried again (a holder that is
/// just going, an unmount that has not finished), and how often.
const IN_USE_WAIT: Duration = Duration::from_secs(10);
const IN_USE_RETRY: Duration = Duration::from_millis(500);

/// `primary`: true when this node is primary now; a refusal is logged with its reason.
pub fn promote(socket: &Path, resource: &str) -> bool {
    match client::call(socket, &Request::Primary { force: false }) {
        Ok(response) => match response.error {
            None => {
                tracing::info!(resource, "promoted");
                true
            }
            Some(error) => {
                tracing::warn!(resource, exit_code = response.exit_code, "promotion refused: {error}");
                false
            }
        },
        Err(ClientError::NotRunning) => {
            tracing::warn!(resource, "promotion not possible: the daemon is not running");
            false
        }
        Err(e) => {
            tracing::warn!(resource, error = %e, "promotion failed: {e}");
            false
        }
    }
}

/// `secondary`, tried again for a while when the device is still in use; true when this node
/// is Secondary now (a daemon that is not running holds no role).
pub fn demote(socket: &Path, resource: &str) -> bool {
    let deadline = Instant::now() + IN_USE_WAIT;
    loop {
        match client::call(socket, &Request::Secondary) {
            Ok(response) => match (response.error, response.exit_code) {
                (None, _) => {
                    tracing::info!(resource, "demoted");
                    return true;
                }
                (Some(_), NOT_RUNNING) => return true,
                (Some(error), IN_USE) if Instant::now() < deadline => {
                    tracing::info!(resource, "demotion waits: {error}");
                    std::thread::sleep(IN_USE_RETRY);
                }
                (Some(error), exit_code) => {
                    tracing::error!(resource, exit_code, "DEMOTION FAILED: {error}");
                    return false;
                }
            },
            Err(ClientError::NotRunning) => return true,
            Err(e) => {
                tracing::error!(resource, error = %e, "DEMOTION FAILED: {e}");
                return false;
            }
        }
    }
}
