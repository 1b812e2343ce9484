//! The CLI's side of the control socket.

use super::{Request, Response};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon listens: the resource is down on this node.
    #[error("not running")]
    NotRunning,
    #[error("control socket {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("control socket {path}: malformed answer: {detail}")]
    Malformed { path: String, detail: String },
}

/// Sends one request and waits for its answer (promotion or demotion may take a while: they
/// wait for in-flight writes and flushes).
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let io = |source| ClientError::Io { path: path.clone(), source };
    let mut stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Err(ClientError::NotRunning)
        }
        Err(e) => return Err(io(e)),
    };
    stream.set_read_timeout(Some(Duration::from_secs(120))).map_err(io)?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ClientError::Malformed { path, detail: e.to_string() })
}
