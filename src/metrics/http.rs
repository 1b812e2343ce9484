//! A tiny HTTP/1.1 server for `GET /metrics`, on std's `TcpListener`: one request per
//! connection, answered and closed. An HTTP library would bring an async runtime or a thread
//! pool for one path that Prometheus scrapes every few seconds.
//!
//! It must never get in the data path's way nor be held by a client: each connection gets a
//! thread of its own (at most [`MAX_CONNECTIONS`]; one more is answered 503 without a read or a
//! blocking write), the request head has [`REQUEST_TIMEOUT`] to arrive in full and at most
//! [`MAX_HEAD_BYTES`], and the answer [`WRITE_TIMEOUT`] to leave. Rendering takes the engine's
//! lock as `status` does, for as long as a status snapshot takes.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Scrapes served at once; Prometheus sends one at a time per target.
pub const MAX_CONNECTIONS: usize = 8;
/// The whole request head (request line and headers) must arrive within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection waits for the client's end (see [`linger`]).
const LINGER: Duration = Duration::from_secs(1);
/// A scrape's head is a few hundred bytes.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// What answers a scrape: the exposition and its content type, or why there is none.
pub type Render = dyn Fn() -> Result<(String, &'static str), String> + Send + Sync;

/// Serves connections until the process exits (the daemon's end is the server's).
pub fn serve(listener: TcpListener, render: Arc<Render>) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                // Out of file descriptors, say: do not spin on it.
                tracing::warn!(error = %e, "metrics: cannot accept a connection");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::Relaxed);
            refuse_busy(stream);
            continue;
        }
        let slot = Slot(active.clone());
        let render = render.clone();
        let spawned = std::thread::Builder::new().name("metrics-conn".into()).spawn(move || {
            let _slot = slot;
            answer(stream, &*render);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "metrics: cannot start a connection's thread; the connection is closed");
        }
    }
}

/// One of the [`MAX_CONNECTIONS`], given back however its thread ends (a panic included).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A 503 that cannot block the accepting thread: written non-blocking, whatever fits.
fn refuse_busy(stream: TcpStream) {
    if stream.set_nonblocking(true).is_ok() {
        let _ = (&stream).write(&response(503, "Service Unavailable", "text/plain", "too many scrapes at once\n"));
    }
}

/// What a request's head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest(&'static str),
}

/// The request line `METHOD TARGET HTTP/1.x`, judged once it is complete.
pub fn route(request_line: &[u8]) -> Route {
    let Ok(line) = std::str::from_utf8(request_line) else { return Route::BadRequest("the request line is not text") };
    let mut parts = line.trim_end_matches(['\r', '\n']).split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Route::BadRequest("not an HTTP request line (METHOD TARGET HTTP/1.1)");
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Route::BadRequest("not an HTTP/1.x request line (METHOD /PATH HTTP/1.1)");
    }
    if method != "GET" {
        return Route::MethodNotAllowed;
    }
    match target.split('?').next() {
        Some("/metrics") => Route::Metrics,
        _ => Route::NotFound,
    }
}

/// Whether the head (request line and headers) is complete: it ends with an empty line.
fn head_complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

/// How reading a request's head ended.
enum Head {
    /// Complete, or its request line already refused.
    Read(Route),
    TimedOut,
    TooLarge,
    /// The client went before its request was complete: nobody to answer.
    Gone,
}

fn read_head(stream: &mut TcpStream) -> Head {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        // The first line decides early: garbage is answered without waiting for more.
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let route = route(&buf[..end]);
            if matches!(route, Route::BadRequest(_)) || head_complete(&buf) {
                return Head::Read(route);
            }
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Head::TooLarge;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Head::TimedOut;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Head::Gone,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Head::TimedOut,
            Err(_) => return Head::Gone,
        }
    }
}

fn answer(mut stream: TcpStream, render: &Render) {
    let reply = match read_head(&mut stream) {
        Head::Gone => return,
        Head::TimedOut => response(408, "Request Timeout", "text/plain", "the request did not arrive in time\n"),
        Head::TooLarge => response(431, "Request Header Fields Too Large", "text/plain", "the request head is too large\n"),
        Head::Read(Route::BadRequest(why)) => response(400, "Bad Request", "text/plain", &format!("{why}\n")),
        Head::Read(Route::NotFound) => response(404, "Not Found", "text/plain", "only /metrics is served here\n"),
        Head::Read(Route::MethodNotAllowed) => response(405, "Method Not Allowed", "text/plain", "only GET is served here\n"),
        Head::Read(Route::Metrics) => match render() {
            Ok((text, content_type)) => response(200, "OK", content_type, &text),
            Err(why) => {
                tracing::warn!(error = %why, "metrics: cannot render a scrape");
                response(500, "Internal Server Error", "text/plain", &format!("{why}\n"))
            }
        },
    };
    if stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_ok() {
        let _ = stream.write_all(&reply);
    }
    linger(stream);
}

/// Closes after the answer without losing it: a socket closed with unread input (the rest of
/// a refused request) resets the connection, and the client may then never read the answer.
/// So the write side is shut first and what is still coming is read and dropped, for at most
/// [`LINGER`] and [`MAX_HEAD_BYTES`] more.
fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    let mut chunk = [0u8; 1024];
    while drained < MAX_HEAD_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

fn response(status: u16, reason: &str, content_type: &str, body: &str) -> Vec<u8> {
    let allow = if status == 405 { "Allow: GET\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1"), Route::NotFound);
        assert_eq!(route(b"GET /metricsx HTTP/1.1"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1"), Route::MethodNotAllowed);
        for garbage in [&b"hello"[..], b"GET /metrics", b"GET /metrics HTTP/2 x", b"GET metrics HTTP/1.1", b"\xff\xfe GET"] {
            assert!(matches!(route(garbage), Route::BadRequest(_)), "{garbage:?}");
        }
    }

    #[test]
    fn a_head_ends_at_its_empty_line() {
        assert!(!head_complete(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"));
        assert!(head_complete(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(head_complete(b"GET /metrics HTTP/1.0\n\n"));
    }

    #[test]
    fn a_405_says_what_is_allowed() {
        let text = String::from_utf8(response(405, "Method Not Allowed", "text/plain", "no\n")).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n") && text.contains("Allow: GET\r\n"), "{text}");
        assert!(text.ends_with("Content-Length: 3\r\nAllow: GET\r\nConnection: close\r\n\r\nno\n"), "{text}");
    }
}
