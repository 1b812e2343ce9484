//! The transmission phase: read requests, submit them, reply as they complete.
//!
//! The calling thread is the connection's only reader. It never waits for the device, only
//! for room under the in-flight bounds, so many requests are in flight at once and their
//! replies go out in completion order, matched by cookie. Completions queue replies on the
//! client's [`ReplySink`], whose own thread writes them: no device thread ever waits on a
//! client.

use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;
use tracing::{debug, warn};

use super::error::SessionError;
use super::inflight::{InFlight, Permit};
use super::protocol::{Errno, RequestHeader};
use super::reply::ReplySink;
use super::socket::Stream;
use super::request::{self, Command};
use super::Export;
use crate::frontend::{BlockDevice, BlockRequest, BlockResult, Completion};

/// Serves requests until the client disconnects, breaks the protocol, or the socket is shut
/// down; then waits for every submitted request to complete before closing.
///
/// `reader` reads from `stream` (buffered, possibly holding bytes the client sent right after
/// the handshake); replies go through `replies`, which writes to `stream`.
pub fn serve<R: Read>(
    reader: &mut R,
    stream: Stream,
    replies: Box<dyn io::Write + Send>,
    device: &Arc<dyn BlockDevice>,
    export: &Export,
    client: &str,
) -> Result<(), SessionError> {
    let sink = Arc::new(ReplySink::new(stream, replies, client)?);
    let inflight = InFlight::new();
    let result = read_requests(reader, &sink, &inflight, device.as_ref(), export);
    // Requests already submitted still get their replies if the client is listening; the
    // protocol asks this of a disconnect, and it is harmless after an error.
    inflight.wait_idle();
    sink.close();
    result
}

fn read_requests<R: Read>(
    reader: &mut R,
    sink: &Arc<ReplySink>,
    inflight: &Arc<InFlight>,
    device: &dyn BlockDevice,
    export: &Export,
) -> Result<(), SessionError> {
    loop {
        let mut buf = [0; RequestHeader::LEN];
        reader.read_exact(&mut buf)?;
        let header = RequestHeader::parse(&buf)?;
        let cookie = header.cookie;

        let command = match request::validate(&header, export) {
            Ok(command) => command,
            Err(rejection) => {
                debug!(
                    cookie,
                    kind = header.kind,
                    offset = header.offset,
                    len = header.len,
                    reason = rejection.reason,
                    "refusing request"
                );
                if rejection.fatal {
                    sink.send(cookie, Err(rejection.errno), inflight.acquire(0));
                    return Err(SessionError::OversizedRequest {
                        kind: header.kind,
                        len: header.len,
                    });
                }
                discard(reader, header.payload_len())?;
                // The refusal holds a permit too: a client that sends bad requests without
                // reading the answers is held up like one that pipelines good ones.
                sink.send(cookie, Err(rejection.errno), inflight.acquire(0));
                continue;
            }
        };

        let (request, read_len, permit) = match command {
            Command::Disconnect => {
                debug!("client sent NBD_CMD_DISC");
                return Ok(());
            }
            Command::Read { offset, len } => {
                (BlockRequest::Read { offset, len }, Some(len), inflight.acquire(len))
            }
            Command::Write { offset, len, fua } => {
                // Reserve before reading, so the payload buffer itself is bounded.
                let permit = inflight.acquire(len);
                let mut data = vec![0; len as usize];
                reader.read_exact(&mut data)?;
                (BlockRequest::Write { offset, data: Bytes::from(data), fua }, None, permit)
            }
            Command::Flush => (BlockRequest::Flush, None, inflight.acquire(0)),
            // A discard's content is unspecified afterwards, so FUA on TRIM adds nothing.
            Command::Trim { offset, len } => {
                (BlockRequest::Discard { offset, len }, None, inflight.acquire(0))
            }
            Command::WriteZeroes { offset, len, fua } => {
                (BlockRequest::WriteZeroes { offset, len, fua }, None, inflight.acquire(0))
            }
        };
        device.submit(request, completion(Arc::clone(sink), permit, cookie, read_len));
    }
}

/// Builds the callback that answers one request. `read_len` is set for a READ, whose reply
/// must carry exactly that many bytes.
fn completion(
    sink: Arc<ReplySink>,
    permit: Permit,
    cookie: u64,
    read_len: Option<u32>,
) -> Completion {
    Box::new(move |result: BlockResult| {
        let outcome = match (result, read_len) {
            (Ok(Some(data)), Some(len)) if data.len() == len as usize => Ok(data),
            (Ok(_), None) => Ok(Bytes::new()),
            (Ok(data), Some(len)) => {
                // Sending a wrong length would desynchronize the client; fail the read instead.
                warn!(
                    cookie,
                    expected = len,
                    got = data.map(|d| d.len()),
                    "device returned a short read"
                );
                Err(Errno::Io)
            }
            (Err(error), _) => {
                debug!(cookie, %error, "request failed");
                Err(Errno::from(&error))
            }
        };
        // The permit is released once the reply is written: until then it still counts
        // against the client's bounds (and a disconnect waits for it).
        sink.send(cookie, outcome, permit);
    })
}

/// Skips a refused WRITE's payload so the next request header is read from the right place.
fn discard<R: Read>(reader: &mut R, len: u32) -> io::Result<()> {
    let skipped = io::copy(&mut Read::take(&mut *reader, u64::from(len)), &mut io::sink())?;
    if skipped < u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
