//! The NBD frontend: serves a [`BlockDevice`] to NBD clients (qemu, the Linux `nbd` driver).
//!
//! One accept thread, and per client one thread that runs the handshake on a blocking socket.
//! The transmission phase then runs on the export's io_uring thread (`ring_server`), the
//! handshake's thread only waiting for the client to be gone; over TLS, or where io_uring
//! cannot be set up, on that thread (reading requests) and one that writes its replies. We
//! speak fixed newstyle with simple replies only, and export one device, over TLS (STARTTLS,
//! the client showing a certificate the configured CA signed) where the server requires it.
//!
//! Modules, in the order a connection meets them: `handshake` (option haggling), `request`
//! (validating a request), `inflight` (bounding outstanding work); on the ring `decoder`
//! (requests from bytes), `connection` (a client's requests and replies without I/O) and
//! `ring_server` (the thread that moves their bytes); on threads `transmission` (the request
//! loop) and `reply` (the writer); `protocol` holds the wire format, `socket` TCP or Unix
//! sockets, and `error` the reasons a session ends.

mod error;
mod handshake;
mod inflight;
mod protocol;
mod reply;
mod request;
mod socket;
mod decoder;
mod connection;
mod ring_server;
#[cfg(test)]
mod tests;
mod transmission;

use std::io::{self, BufReader};
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tracing::{debug, debug_span, warn};

use rustls::ServerConfig;

use self::error::SessionError;
use self::handshake::{Outcome, Tls};
use self::ring_server::RingServer;
use self::socket::{Listener, Stream};
use crate::config::NbdAddress;
use crate::frontend::BlockDevice;
use crate::handshake_stream::HandshakeStream;
use crate::tls::channel;

/// Read buffer per client: large enough to batch small requests into one syscall.
const READ_BUFFER: usize = 64 * 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop cannot spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Clients connected at once (in the handshake or transmitting): a host attaches one or a
/// few; beyond this a connection is closed at once, so nobody can exhaust threads and
/// descriptors by connecting.
pub const MAX_CLIENTS: usize = 16;
/// How long the option haggling may take in all: a real client (qemu, nbd-client) is done in
/// a few round trips; afterwards an idle client is legitimate (an idle VM disk).
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// A bound listener that has not started serving yet.
#[derive(Debug)]
pub struct NbdServer {
    listener: Listener,
    address: NbdAddress,
    tls: Option<Arc<ServerConfig>>,
}

impl NbdServer {
    /// Binds the listener: a TCP address (port 0 allowed for tests) or a Unix socket.
    pub fn bind(address: &NbdAddress) -> io::Result<NbdServer> {
        let listener = Listener::bind(address)?;
        let address = match (listener.address()?, address) {
            (NbdAddress::Tcp(bound), _) => NbdAddress::Tcp(bound),
            (_, unix) => unix.clone(),
        };
        Ok(NbdServer { listener, address, tls: None })
    }

    /// Serves clients over TLS only: each must start it (`NBD_OPT_STARTTLS`) before anything
    /// else, and `config` decides which client certificates it accepts.
    pub fn require_tls(self, config: Arc<ServerConfig>) -> NbdServer {
        NbdServer { tls: Some(config), ..self }
    }

    pub fn address(&self) -> &NbdAddress {
        &self.address
    }

    /// Starts serving `device` under `export_name` on a background accept thread.
    ///
    /// The empty name also selects the export: the protocol reserves it for the default
    /// export, and ours is the only one.
    ///
    /// # Panics
    /// If the operating system refuses to start the accept thread, like [`thread::spawn`].
    pub fn serve(self, export_name: &str, device: Arc<dyn BlockDevice>) -> NbdHandle {
        let ring = match RingServer::start(device.clone(), reply::REPLY_TIMEOUT, None) {
            Ok(ring) => Some(ring),
            Err(error) => {
                warn!(%error, "io_uring is not available: NBD clients are served by threads of their own");
                None
            }
        };
        let shared = Arc::new(Shared {
            export_name: export_name.to_owned(),
            ring,
            device,
            tls: self.tls,
            transmitting: AtomicUsize::new(0),
            clients: Mutex::new(Clients::default()),
        });
        let listener = Arc::new(self.listener);
        let accept_thread = {
            let (listener, shared) = (Arc::clone(&listener), Arc::clone(&shared));
            thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&listener, &shared))
                .expect("failed to start the NBD accept thread")
        };
        debug!(url = %self.address.url(export_name), "NBD server listening");
        NbdHandle {
            address: self.address,
            shared,
            listener,
            accept_thread: Some(accept_thread),
        }
    }
}

/// A running server. Dropping it shuts it down like [`NbdHandle::shutdown`].
pub struct NbdHandle {
    address: NbdAddress,
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    /// `None` once shut down.
    accept_thread: Option<JoinHandle<()>>,
}

impl NbdHandle {
    pub fn address(&self) -> &NbdAddress {
        &self.address
    }

    /// Number of clients currently in the transmission phase (the daemon refuses to demote
    /// while > 0). A client counts until its last in-flight request has completed.
    pub fn connected_clients(&self) -> usize {
        self.shared.transmitting.load(Ordering::SeqCst)
    }

    /// Stops accepting, shuts down every client socket, waits for in-flight completions,
    /// joins threads. Blocks for as long as the device takes to complete what is in flight.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept_thread) = self.accept_thread.take() else {
            return;
        };
        let clients = {
            let mut clients = self.shared.lock_clients();
            clients.closed = true;
            std::mem::take(&mut clients.live)
        };
        match self.listener.wake() {
            Ok(()) => join(accept_thread, "accept"),
            Err(error) => warn!(%error, "could not wake the NBD accept thread; leaving it behind"),
        }
        for client in &clients {
            let _ = client.stream.shutdown(Shutdown::Both);
        }
        for client in clients {
            join(client.thread, "client");
        }
        if let Some(ring) = &self.shared.ring {
            ring.shutdown();
        }
        debug!(url = %self.address.url(&self.shared.export_name), "NBD server stopped");
    }
}

impl std::fmt::Debug for NbdHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdHandle")
            .field("address", &self.address)
            .field("export_name", &self.shared.export_name)
            .field("connected_clients", &self.connected_clients())
            .finish_non_exhaustive()
    }
}

impl Drop for NbdHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one connection is offered, sampled from the device when the client connects.
#[derive(Debug, Clone)]
struct Export {
    name: String,
    size: u64,
    /// Our alignment for offsets and lengths, advertised as the minimum block size.
    block_size: u32,
}

impl Export {
    fn sample(name: &str, device: &dyn BlockDevice) -> Export {
        Export {
            name: name.to_owned(),
            size: device.size_bytes(),
            block_size: device.block_size().max(protocol::MIN_BLOCK_SIZE),
        }
    }

    fn matches(&self, requested: &[u8]) -> bool {
        requested.is_empty() || requested == self.name.as_bytes()
    }
}

/// State shared by the handle, the accept thread and every client thread.
struct Shared {
    export_name: String,
    device: Arc<dyn BlockDevice>,
    /// Set when clients must speak TLS.
    tls: Option<Arc<ServerConfig>>,
    /// Serves the transmission phase of the clients without TLS; `None` where io_uring is not
    /// available (every client then has a reader and a reply-writer thread).
    ring: Option<RingServer>,
    transmitting: AtomicUsize,
    clients: Mutex<Clients>,
}

impl Shared {
    fn lock_clients(&self) -> MutexGuard<'_, Clients> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Default)]
struct Clients {
    /// Set by shutdown: connections accepted from now on are dropped.
    closed: bool,
    live: Vec<Client>,
}

#[derive(Debug)]
struct Client {
    /// A second handle on the socket, so shutdown can unblock the client's thread.
    stream: Stream,
    thread: JoinHandle<()>,
}

fn accept_loop(listener: &Listener, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        let mut clients = shared.lock_clients();
        if clients.closed {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                drop(clients);
                warn!(%error, "NBD accept failed");
                thread::sleep(ACCEPT_RETRY_DELAY);
                continue;
            }
        };
        // Reap finished clients here, so a long-running server does not accumulate them.
        let (finished, live) = std::mem::take(&mut clients.live)
            .into_iter()
            .partition(|client: &Client| client.thread.is_finished());
        clients.live = live;
        for client in finished {
            join(client.thread, "client");
        }
        if clients.live.len() >= MAX_CLIENTS {
            warn!(%peer, "{MAX_CLIENTS} NBD clients are connected: closing this connection");
            let _ = stream.shutdown(Shutdown::Both);
            continue;
        }
        match spawn_client(stream, peer.clone(), shared) {
            Ok(client) => clients.live.push(client),
            Err(error) => warn!(%peer, %error, "could not start an NBD client thread"),
        }
    }
}

fn spawn_client(stream: Stream, peer: String, shared: &Arc<Shared>) -> io::Result<Client> {
    let handle = stream.try_clone()?;
    let shared = Arc::clone(shared);
    let thread = thread::Builder::new()
        .name(format!("nbd-{peer}"))
        .spawn(move || run_client(&stream, peer, &shared))?;
    Ok(Client { stream: handle, thread })
}

fn run_client(stream: &Stream, peer: String, shared: &Shared) {
    let _span = debug_span!("nbd_client", %peer).entered();
    debug!("client connected");
    match session(stream, &peer, shared) {
        Ok(()) => debug!("client disconnected"),
        Err(error) if error.is_protocol_violation() => {
            warn!(reason = %error, "closing NBD connection: protocol violation");
        }
        Err(SessionError::Io(error)) if socket::went_silent(&error) => {
            warn!(reason = %error, "NBD client stopped answering (its host or network is gone): let go");
        }
        Err(error) => debug!(reason = %error, "NBD connection closed"),
    }
    // The accept loop holds a clone of the socket, so dropping ours would not close it.
    let _ = stream.shutdown(Shutdown::Both);
}

fn session(stream: &Stream, peer: &str, shared: &Shared) -> Result<(), SessionError> {
    // Replies are single small writes; do not hold them back waiting for more data.
    stream.set_nodelay()?;
    let export = Export::sample(&shared.export_name, shared.device.as_ref());
    let handshaking = HandshakeStream::handshaking(stream.try_clone()?, HANDSHAKE_DEADLINE)?;
    let mut reader = BufReader::with_capacity(READ_BUFFER, handshaking);
    let mut writer = stream;
    let no_zeroes = handshake::greet(&mut reader, &mut writer)?;
    let tls = if shared.tls.is_some() { Tls::Required } else { Tls::Off };
    match handshake::haggle(&mut reader, &mut writer, &export, no_zeroes, tls)? {
        Outcome::Aborted => debug!("client aborted the handshake"),
        Outcome::Transmission => {
            reader.get_mut().handshake_done(None)?;
            match &shared.ring {
                Some(ring) => transmit_on_ring(ring, reader.buffer().to_vec(), stream, shared, export)?,
                None => transmit(&mut reader, Box::new(stream.try_clone()?), stream, peer, shared, &export)?,
            }
        }
        Outcome::StartTls => {
            if !reader.buffer().is_empty() {
                return Err(SessionError::DataBeforeTls);
            }
            let config = shared.tls.clone().expect("STARTTLS is acknowledged only when TLS is configured");
            let (tls_reader, mut tls_writer) = channel::accept(config, reader.into_inner(), stream.try_clone()?)?;
            let mut reader = BufReader::with_capacity(READ_BUFFER, tls_reader);
            match handshake::haggle(&mut reader, &mut tls_writer, &export, no_zeroes, Tls::On)? {
                Outcome::Aborted => debug!("client aborted the handshake"),
                Outcome::StartTls => unreachable!("STARTTLS inside TLS is refused"),
                Outcome::Transmission => {
                    reader.get_mut().socket_mut().handshake_done(None)?;
                    transmit(&mut reader, Box::new(tls_writer), stream, peer, shared, &export)?;
                }
            }
        }
    }
    Ok(())
}

/// The transmission phase: requests from `reader`, replies through `replies` (the socket, or
/// the session's TLS writer).
fn transmit(
    reader: &mut impl io::Read,
    replies: Box<dyn io::Write + Send>,
    stream: &Stream,
    peer: &str,
    shared: &Shared,
    export: &Export,
) -> Result<(), SessionError> {
    debug!(size = export.size, block_size = export.block_size, tls = shared.tls.is_some(), "entering transmission");
    let _counted = Transmitting::enter(&shared.transmitting);
    transmission::serve(reader, stream.try_clone()?, replies, &shared.device, export, peer)
}

/// The transmission phase on the server's ring (`received`: what the handshake's reader took
/// beyond the handshake). This thread only waits for the client to be gone: it keeps the
/// client counted and joined on shutdown exactly as a threaded client is, and costs nothing per
/// request.
fn transmit_on_ring(ring: &RingServer, received: Vec<u8>, stream: &Stream, shared: &Shared, export: Export) -> Result<(), SessionError> {
    debug!(size = export.size, block_size = export.block_size, "entering transmission on the ring");
    let _counted = Transmitting::enter(&shared.transmitting);
    let (done, gone) = std::sync::mpsc::channel();
    ring.serve(stream.try_clone()?, export, received, done);
    // The ring drops `done` when it lets the client go, whether or not it said so first.
    match gone.recv() {
        Ok(Some(error)) => Err(SessionError::Io(error)),
        _ => Ok(()),
    }
}

/// Counts a client in [`NbdHandle::connected_clients`] for as long as it lives.
struct Transmitting<'a>(&'a AtomicUsize);

impl<'a> Transmitting<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Transmitting(counter)
    }
}

impl Drop for Transmitting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn join(thread: JoinHandle<()>, what: &str) {
    if thread.join().is_err() {
        warn!(thread = what, "NBD {what} thread panicked");
    }
}
