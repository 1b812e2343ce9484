//! The daemon's side of the control socket.

use super::{Request, Response};
use crate::engine::Engine;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Binds the control socket, owner-only.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    // The caller holds the resource's lock file, so a socket file left here is stale.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests until a `down` succeeds; returns then.
pub fn serve(listener: &UnixListener, engine: &Engine) {
    let me = nix::unistd::geteuid().as_raw();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        match getsockopt(&stream, PeerCredentials) {
            Ok(cred) if cred.uid() == 0 || cred.uid() == me => {}
            Ok(cred) => {
                tracing::warn!(uid = cred.uid(), "control request from an unprivileged user refused");
                answer(&stream, &Response::failed("permission denied: run blkrepl as root".into(), 13));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the control client's credentials");
                continue;
            }
        }
        if handle(&stream, engine) {
            return;
        }
    }
}

/// Answers one connection; true when the daemon should exit.
fn handle(stream: &UnixStream, engine: &Engine) -> bool {
    let mut line = String::new();
    if BufReader::new(stream).read_line(&mut line).is_err() {
        return false;
    }
    let request: Request = match serde_json::from_str(&line) {
        Ok(request) => request,
        Err(e) => {
            answer(stream, &Response::failed(format!("malformed request: {e}"), 2));
            return false;
        }
    };
    tracing::debug!(?request, "control request");
    let result = match request {
        Request::Status => Ok(()),
        Request::Primary { force } => engine.promote(force),
        Request::Secondary => engine.demote(),
        Request::Connect { discard_my_data } => engine.connect(discard_my_data),
        Request::Adjust => engine.adjust(),
        Request::Disconnect => {
            engine.disconnect();
            Ok(())
        }
        Request::NewCurrentUuid { clear_bitmap } => engine.new_current_uuid(clear_bitmap),
        Request::Verify => engine.verify().map(drop),
        Request::Invalidate => engine.invalidate().map(drop),
        Request::Down => match engine.shutdown() {
            Ok(()) => {
                answer(stream, &Response::ok(None));
                return true;
            }
            Err(e) => Err(e),
        },
    };
    let response = match result {
        Ok(()) => Response::ok(Some(engine.status())),
        Err(e) => Response::failed(e.to_string(), e.exit_code()),
    };
    answer(stream, &response);
    false
}

fn answer(mut stream: &UnixStream, response: &Response) {
    let mut line = serde_json::to_string(response).expect("responses serialize");
    line.push('\n');
    let _ = stream.write_all(line.as_bytes());
}
