//! The CLI's side of the control socket.

use super::{Request, Response};
use crate::events::Event;
use std::io::{BufRead, BufReader, Lines, Write};
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
    /// The daemon answered with an error (a stream refused: too many connections, ...).
    #[error("{error}")]
    Refused { error: String, exit_code: i32 },
}

/// Sends one request and waits for its answer (promotion or demotion may take a while: they
/// wait for in-flight writes and flushes).
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    call_within(socket, request, Duration::from_secs(120))
}

/// [`call`], giving up on an answer that takes longer than `timeout` (an `Io` error).
pub fn call_within(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let stream = connect(socket, request)?;
    stream.set_read_timeout(Some(timeout)).map_err(|source| ClientError::Io { path: path.clone(), source })?;
    read_response(&mut BufReader::new(stream), &path)
}

/// Opens an `events` stream: the daemon's current state (`exists` lines up to the marker), then
/// a line per change, for as long as the daemon runs. No read timeout: a quiet resource sends
/// nothing for hours.
pub fn subscribe(socket: &Path, statistics: bool) -> Result<Subscription, ClientError> {
    let path = socket.display().to_string();
    let mut reader = BufReader::new(connect(socket, &Request::Events { statistics })?);
    let response = read_response(&mut reader, &path)?;
    if let Some(error) = response.error {
        return Err(ClientError::Refused { error, exit_code: response.exit_code });
    }
    Ok(Subscription { lines: reader.lines(), path })
}

/// The events of one daemon's stream; it ends when the daemon goes away.
pub struct Subscription {
    lines: Lines<BufReader<UnixStream>>,
    path: String,
}

impl Iterator for Subscription {
    type Item = Result<Event, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        let path = &self.path;
        Some(match self.lines.next()? {
            // A daemon killed mid-line resets the connection: that ends the stream as well.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(source) => Err(ClientError::Io { path: path.clone(), source }),
            Ok(line) => serde_json::from_str(&line).map_err(|e| ClientError::Malformed { path: path.clone(), detail: e.to_string() }),
        })
    }
}

fn connect(socket: &Path, request: &Request) -> Result<UnixStream, ClientError> {
    let path = socket.display().to_string();
    let io = |source| ClientError::Io { path: path.clone(), source };
    let mut stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Err(ClientError::NotRunning)
        }
        Err(e) => return Err(io(e)),
    };
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    Ok(stream)
}

fn read_response(reader: &mut BufReader<UnixStream>, path: &str) -> Result<Response, ClientError> {
    let mut answer = String::new();
    let read = reader.read_line(&mut answer).map_err(|source| ClientError::Io { path: path.to_owned(), source })?;
    if read == 0 {
        // Closed without a word: the daemon stopped (or died) since it accepted.
        return Err(ClientError::NotRunning);
    }
    serde_json::from_str(&answer).map_err(|e| ClientError::Malformed { path: path.to_owned(), detail: e.to_string() })
}
