//! Wire-level tests: a raw in-process TCP client drives a real server byte by byte, so edge
//! cases no well-behaved client would produce (bad magic, oversized options, out-of-range
//! requests) can be checked.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::inflight::MAX_REQUESTS;
use super::protocol::*;
use super::{NbdHandle, NbdServer};
use crate::config::NbdAddress;
use crate::frontend::{BlockDevice, BlockError, BlockRequest, BlockResult, Completion, MemDevice};

const SIZE: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP port on loopback that the kernel picks.
fn loopback() -> NbdAddress {
    NbdAddress::Tcp("127.0.0.1:0".parse().unwrap())
}

/// The TCP address a test server listens on.
fn addr(server: &NbdHandle) -> SocketAddr {
    server.address().tcp().expect("a TCP export")
}

fn serve(device: Arc<dyn BlockDevice>) -> NbdHandle {
    NbdServer::bind(&loopback()).expect("bind").serve("disk", device)
}

fn serve_mem() -> (NbdHandle, Arc<MemDevice>) {
    let device = Arc::new(MemDevice::new(SIZE as usize));
    (serve(device.clone()), device)
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// A hand-rolled NBD client that sends exactly what a test tells it to.
struct RawClient {
    stream: TcpStream,
}

#[derive(Debug, PartialEq, Eq)]
struct OptionReply {
    option: u32,
    reply_type: u32,
    payload: Vec<u8>,
}

impl RawClient {
    /// Connects and checks the greeting.
    fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut client = RawClient { stream };
        let greeting = client.read_bytes(18);
        assert_eq!(&greeting[..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&greeting[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(&greeting[16..], &(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        client
    }

    /// Connects, sends fixed-newstyle + no-zeroes client flags and opens the export with GO.
    fn transmitting(addr: SocketAddr) -> RawClient {
        let mut client = RawClient::connect(addr);
        client.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        let replies = client.go(b"disk");
        assert_eq!(replies.last().unwrap().reply_type, REP_ACK);
        client
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    fn read_bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.stream.read_exact(&mut buf).expect("read from server");
        buf
    }

    fn read_u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_bytes(4).try_into().unwrap())
    }

    fn read_u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_bytes(8).try_into().unwrap())
    }

    fn send_flags(&mut self, flags: u32) {
        self.send(&flags.to_be_bytes());
    }

    fn send_option(&mut self, option: u32, payload: &[u8]) {
        self.send_option_header(IHAVEOPT, option, payload.len() as u32);
        self.send(payload);
    }

    fn send_option_header(&mut self, magic: u64, option: u32, len: u32) {
        let mut header = Vec::new();
        header.extend_from_slice(&magic.to_be_bytes());
        header.extend_from_slice(&option.to_be_bytes());
        header.extend_from_slice(&len.to_be_bytes());
        self.send(&header);
    }

    fn read_option_reply(&mut self) -> OptionReply {
        assert_eq!(self.read_u64(), OPTION_REPLY_MAGIC);
        let option = self.read_u32();
        let reply_type = self.read_u32();
        let len = self.read_u32();
        OptionReply { option, reply_type, payload: self.read_bytes(len as usize) }
    }

    /// Sends INFO or GO for `name` and collects replies up to the first non-INFO one.
    fn info_or_go(&mut self, option: u32, name: &[u8]) -> Vec<OptionReply> {
        let mut payload = (name.len() as u32).to_be_bytes().to_vec();
        payload.extend_from_slice(name);
        payload.extend_from_slice(&1u16.to_be_bytes());
        payload.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(option, &payload);
        let mut replies = Vec::new();
        loop {
            let reply = self.read_option_reply();
            assert_eq!(reply.option, option);
            let done = reply.reply_type != REP_INFO;
            replies.push(reply);
            if done {
                return replies;
            }
        }
    }

    fn go(&mut self, name: &[u8]) -> Vec<OptionReply> {
        self.info_or_go(OPT_GO, name)
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        self.request_with_magic(REQUEST_MAGIC, flags, kind, cookie, offset, len);
    }

    fn request_with_magic(
        &mut self,
        magic: u32,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    ) {
        let mut header = Vec::with_capacity(28);
        header.extend_from_slice(&magic.to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&kind.to_be_bytes());
        header.extend_from_slice(&cookie.to_be_bytes());
        header.extend_from_slice(&offset.to_be_bytes());
        header.extend_from_slice(&len.to_be_bytes());
        self.send(&header);
    }

    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.request(0, CMD_WRITE, cookie, offset, data.len() as u32);
        self.send(data);
    }

    /// Reads one simple reply header: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.read_u32(), SIMPLE_REPLY_MAGIC);
        let error = self.read_u32();
        (error, self.read_u64())
    }

    /// Asserts the server closed the connection (EOF or reset, not a timeout).
    fn expect_closed(&mut self) {
        let mut byte = [0; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return,
                Ok(_) => panic!("expected the server to close, got data"),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                // A read with a timeout fails so when the process is stopped and resumed.
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("expected the server to close, got {e}"),
            }
        }
    }
}

/// Holds completions until the test releases them, to control ordering and in-flight counts.
struct GatedDevice {
    inner: Arc<MemDevice>,
    held: Mutex<Vec<(BlockRequest, Completion)>>,
    /// The most requests ever held at once.
    peak: AtomicUsize,
}

impl GatedDevice {
    fn new() -> Arc<GatedDevice> {
        Arc::new(GatedDevice {
            inner: Arc::new(MemDevice::new(SIZE as usize)),
            held: Mutex::default(),
            peak: AtomicUsize::new(0),
        })
    }

    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Completes everything held so far, newest first.
    fn release_reversed(&self) {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        for (request, done) in held.into_iter().rev() {
            self.inner.submit(request, done);
        }
    }
}

impl BlockDevice for GatedDevice {
    fn size_bytes(&self) -> u64 {
        SIZE
    }

    fn submit(&self, request: BlockRequest, done: Completion) {
        let mut held = self.held.lock().unwrap();
        held.push((request, done));
        self.peak.fetch_max(held.len(), Ordering::SeqCst);
    }
}

/// Answers every request with a fixed result.
struct FixedDevice(BlockResult);

impl BlockDevice for FixedDevice {
    fn size_bytes(&self) -> u64 {
        SIZE
    }

    fn submit(&self, _request: BlockRequest, done: Completion) {
        done(self.0.clone());
    }
}

struct BigBlockDevice;

impl BlockDevice for BigBlockDevice {
    fn size_bytes(&self) -> u64 {
        SIZE
    }

    fn block_size(&self) -> u32 {
        4096
    }

    fn submit(&self, _request: BlockRequest, done: Completion) {
        done(Ok(None));
    }
}

// ---- handshake ----

#[test]
fn a_unix_socket_export_replaces_a_stale_socket_never_another_file_and_has_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.nbd");
    // A socket file an earlier run left behind (its listener gone).
    drop(UnixListener::bind(&path).unwrap());
    let device = Arc::new(MemDevice::new(SIZE as usize));
    let server = NbdServer::bind(&NbdAddress::Unix { path: path.clone(), mode: 0o660 }).unwrap().serve("disk", device.clone());
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o660);
    let mut client = UnixStream::connect(&path).unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut greeting = [0u8; 16];
    client.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], &NBDMAGIC.to_be_bytes());
    drop(client);
    server.shutdown();
    assert!(!path.exists());
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "no temporary file left");

    std::fs::write(&path, b"someone's file").unwrap();
    let err = NbdServer::bind(&NbdAddress::Unix { path: path.clone(), mode: 0o600 }).unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"someone's file", "left alone");
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let (server, _) = serve_mem();
    let mut client = RawClient::connect(addr(&server));
    client.send_flags(FLAG_C_FIXED_NEWSTYLE | 1 << 5);
    client.expect_closed();
}

#[test]
fn client_without_fixed_newstyle_is_closed() {
    let (server, _) = serve_mem();
    let mut client = RawClient::connect(addr(&server));
    client.send_flags(0);
    client.expect_closed();
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let (server, _) = serve_mem();
    let mut client = RawClient::connect(addr(&server));
    client.send_flags(FLAG_C_FIXED_NEWSTYLE);
    client.send_option_header(NBDMAGIC, OPT_GO, 0);
    client.expect_closed();
}

#[test]
fn oversized_option_closes_the_connection() {
    let (server, _) = serve_mem();
    let mut client = RawClient::connect(addr(&server));
    client.send_flags(FLAG_C_FIXED_NEWSTYLE);
    client.send_option_header(IHAVEOPT, OPT_GO, MAX_OPTION_LEN + 1);
    client.expect_closed();
}

#[test]
fn unknown_and_structured_reply_options_are_unsupported_but_negotiation_goes_on() {
    let (server, _) = serve_mem();
    let mut client = RawClient::connect(addr(&server));
    client.send_flags(FLAG_C_FIXED_NEWSTYLE);
    for option in [8 /* STRUCTURED_REPLY */, OPT_STARTTLS /* TLS is not configured */, 0x7fff_0000] {
        client.send_option(option, &[1, 2, 3]);
        let reply = client.read_option_reply();
        assert_eq!((reply.option, reply.reply_type), (option, REP_ERR_UNSUP));
    }
    assert_eq!(client.go(b"disk").last().unwrap().reply_type, REP_ACK);
}

/// A server that requires TLS, with a certificate made for the test.
fn serve_tls_only() -> NbdHandle {
    let made = rcgen::generate_simple_self_signed(vec!["disk".to_owned()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key)
        .unwrap();
    let device = Arc::new(MemDevice::new(SIZE as usize));
    NbdServer::bind(&loopback()).unwrap().require_tls(Arc::new(config)).serve("disk", device)
}

#[test]
fn a_tls_only_export_says_nothing_before_starttls_and_then_expects_a_tls_handshake() {
    let server = serve_tls_only();
    let mut client = RawClient::connect(addr(&server));
    client.send_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    for option in [OPT_GO, OPT_INFO, OPT_LIST, 8 /* STRUCTURED_REPLY */] {
        let payload: &[u8] = if option == OPT_LIST { &[] } else { &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 0] };
        client.send_option(option, payload);
        let reply = client.read_option_reply();
        assert_eq!((reply.option, reply.reply_type), (option, REP_ERR_TLS_REQD));
        assert!(!String::from_utf8_lossy(&reply.payload).contains("disk"), "the export is not named");
    }
    client.send_option(OPT_STARTTLS, &[1]);
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_INVALID, "STARTTLS takes no data");
    client.send_option(OPT_STARTTLS, &[]);
    let ack = client.read_option_reply();
    assert_eq!((ack.option, ack.reply_type), (OPT_STARTTLS, REP_ACK));
    // Anything but a TLS handshake now ends the session, with at most a TLS alert.
    client.send_option(OPT_GO, &[0, 0, 0, 0, 0, 0]);
    let mut rest = Vec::new();
    let _ = client.stream.read_to_end(&mut rest);
    assert!(rest.is_empty() || rest[0] == 0x15, "an alert record at most, then the end: {rest:?}");

    let mut legacy = RawClient::connect(addr(&server));
    legacy.send_flags(FLAG_C_FIXED_NEWSTYLE);
    legacy.send_option(OPT_EXPORT_NAME, b"disk");
    legacy.expect_closed();
}

#[test]
fn go_reports_export_size_flags_and_block_sizes() {
    let (server, _) = serve_mem();
    let mut client = RawClient::connect(addr(&server));
    client.send_flags(FLAG_C_FIXED_NEWSTYLE);
    let replies = client.go(b"disk");
    assert_eq!(replies.len(), 3);
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&SIZE.to_be_bytes());
    let flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    export.extend_from_slice(&flags.to_be_bytes());
    assert_eq!(replies[0], OptionReply { option: OPT_GO, reply_type: REP_INFO, payload: export });
    let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for size in [512u32, 4096, 32 << 20] {
        sizes.extend_from_slice(&size.to_be_bytes());
    }
    assert_eq!(replies[1].payload, sizes);
    assert_eq!(replies[2].reply_type, REP_ACK);
}

#[test]
fn block_size_follows_a_larger_device_block() {
    let server = serve(Arc::new(BigBlockDevice));
    let mut client = RawClient::connect(addr(&server));
    client.send_flags(FLAG_C_FIXED_NEWSTYLE);
    let replies = client.go(b"disk");
    assert_eq!(&replies[1].payload[2..6], &4096u32.to_be_bytes(), "minimum block size");
    // And requests are held to it.
    client.request(0, CMD_READ, 1, 512, 4096);
    assert_eq!(client.reply(), (Errno::Inval as u32, 1));
}

#[test]
fn unknown_export_gets_err_unknown_and_the_empty_name_is_the_default() {
    let (server, _) = serve_mem();
    let mut client = RawClient::connect(addr(&server));
    client.send_flags(FLAG_C_FIXED_NEWSTYLE);
    let replies = client.info_or_go(OPT_INFO, b"nope");
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].reply_type, REP_ERR_UNKNOWN);
    let replies = client.go(b"nope");
    assert_eq!(replies[0].reply_type, REP_ERR_UNKNOWN);
    // INFO does not end negotiation; GO with the default name does.
    assert_eq!(client.info_or_go(OPT_INFO, b"disk").last().unwrap().reply_type, REP_ACK);
    assert_eq!(client.go(b"").last().unwrap().reply_type, REP_ACK);
    client.request(0, CMD_FLUSH, 9, 0, 0);
    assert_eq!(client.reply(), (0, 9));
}

#[test]
fn malformed_go_gets_err_invalid() {
    let (server, _) = serve_mem();
    let mut client = RawClient::connect(addr(&server));
    client.send_flags(FLAG_C_FIXED_NEWSTYLE);
    // Name length claims more bytes than the option holds.
    let mut payload = 100u32.to_be_bytes().to_vec();
    payload.extend_from_slice(b"disk\0\0");
    client.send_option(OPT_GO, &payload);
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_INVALID);
    client.send_option(OPT_LIST, b"x");
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_INVALID);
}

#[test]
fn list_names_the_export() {
    let (server, _) = serve_mem();
    let mut client = RawClient::connect(addr(&server));
    client.send_flags(FLAG_C_FIXED_NEWSTYLE);
    client.send_option(OPT_LIST, &[]);
    let server_reply = client.read_option_reply();
    assert_eq!(server_reply.reply_type, REP_SERVER);
    assert_eq!(server_reply.payload, b"\0\0\0\x04disk");
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);
}

#[test]
fn export_name_option_pads_with_zeroes_unless_told_not_to() {
    let (server, _) = serve_mem();
    for (flags, padding) in
        [(FLAG_C_FIXED_NEWSTYLE, 124), (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0)]
    {
        let mut client = RawClient::connect(addr(&server));
        client.send_flags(flags);
        client.send_option(OPT_EXPORT_NAME, b"disk");
        assert_eq!(client.read_u64(), SIZE);
        assert_eq!(client.read_bytes(2 + padding)[2..], vec![0; padding]);
        client.request(0, CMD_READ, 3, 0, 512);
        assert_eq!(client.reply(), (0, 3));
        assert_eq!(client.read_bytes(512), vec![0; 512]);
    }
}

#[test]
fn export_name_option_with_unknown_name_closes() {
    let (server, _) = serve_mem();
    let mut client = RawClient::connect(addr(&server));
    client.send_flags(FLAG_C_FIXED_NEWSTYLE);
    client.send_option(OPT_EXPORT_NAME, b"nope");
    client.expect_closed();
}

#[test]
fn abort_is_acknowledged_then_closed() {
    let (server, _) = serve_mem();
    let mut client = RawClient::connect(addr(&server));
    client.send_flags(FLAG_C_FIXED_NEWSTYLE);
    client.send_option(OPT_ABORT, &[]);
    let reply = client.read_option_reply();
    assert_eq!((reply.option, reply.reply_type), (OPT_ABORT, REP_ACK));
    client.expect_closed();
    assert_eq!(server.connected_clients(), 0);
}

// ---- transmission ----

#[test]
fn write_then_read_round_trips() {
    let (server, device) = serve_mem();
    let mut client = RawClient::transmitting(addr(&server));
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    client.write(1, 4096, &data);
    assert_eq!(client.reply(), (0, 1));
    client.request(0, CMD_READ, 2, 4096, 8192);
    assert_eq!(client.reply(), (0, 2));
    assert_eq!(client.read_bytes(8192), data);
    assert_eq!(&device.snapshot()[4096..4096 + 8192], &data[..]);
    for (cookie, kind, flags) in
        [(3, CMD_FLUSH, 0), (4, CMD_TRIM, 0), (5, CMD_WRITE_ZEROES, CMD_FLAG_FUA)]
    {
        let (offset, len) = if kind == CMD_FLUSH { (0, 0) } else { (4096, 4096) };
        client.request(flags, kind, cookie, offset, len);
        assert_eq!(client.reply(), (0, cookie));
    }
    assert_eq!(&device.snapshot()[4096..8192], &[0; 4096][..]);
}

#[test]
fn bad_requests_get_errors_and_the_stream_stays_in_sync() {
    let (server, device) = serve_mem();
    let mut client = RawClient::transmitting(addr(&server));
    client.request(0, CMD_READ, 1, SIZE, 512);
    assert_eq!(client.reply(), (Errno::Inval as u32, 1), "read past the end");
    client.request(0, CMD_READ, 2, 100, 512);
    assert_eq!(client.reply(), (Errno::Inval as u32, 2), "misaligned offset");
    // A refused write's payload must be skipped, or it would be parsed as the next request.
    client.write(3, SIZE - 512, &[0xaa; 1024]);
    assert_eq!(client.reply(), (Errno::NoSpc as u32, 3), "write past the end");
    client.write(4, 0, &[0xbb; 100]);
    assert_eq!(client.reply(), (Errno::Inval as u32, 4), "misaligned length");
    for (cookie, kind) in [(5, 5 /* CACHE */), (6, 7 /* BLOCK_STATUS */), (7, 99)] {
        client.request(0, kind, cookie, 0, 512);
        assert_eq!(client.reply(), (Errno::Inval as u32, cookie), "command {kind}");
    }
    client.request(4 /* DF */, CMD_READ, 8, 0, 512);
    assert_eq!(client.reply(), (Errno::Inval as u32, 8), "DF without structured replies");
    client.write(9, 0, &[0xcc; 512]);
    assert_eq!(client.reply(), (0, 9));
    assert!(device.snapshot()[..512].iter().all(|&b| b == 0xcc));
    assert!(device.snapshot()[512..].iter().all(|&b| b == 0), "no refused write landed");
}

#[test]
fn oversized_write_gets_einval_then_the_connection_closes() {
    let (server, _) = serve_mem();
    let mut client = RawClient::transmitting(addr(&server));
    client.request(0, CMD_WRITE, 1, 0, MAX_PAYLOAD + 512);
    assert_eq!(client.reply(), (Errno::Inval as u32, 1));
    client.expect_closed();
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let (server, _) = serve_mem();
    let mut client = RawClient::transmitting(addr(&server));
    client.request_with_magic(0x1234_5678, 0, CMD_READ, 1, 0, 512);
    client.expect_closed();
}

#[test]
fn device_errors_map_onto_nbd_errors() {
    let cases = [
        (BlockError::Io, 5),
        (BlockError::ReadOnly, 1),
        (BlockError::NoSpace, 28),
        (BlockError::NotSupported, 95),
        (BlockError::Shutdown, 108),
    ];
    for (error, errno) in cases {
        let server = serve(Arc::new(FixedDevice(Err(error.clone()))));
        let mut client = RawClient::transmitting(addr(&server));
        client.request(0, CMD_READ, 1, 0, 512);
        assert_eq!(client.reply(), (errno, 1), "{error:?} on read: no data follows");
        client.write(2, 0, &[1; 512]);
        assert_eq!(client.reply(), (errno, 2), "{error:?} on write");
    }
}

#[test]
fn a_short_read_from_the_device_becomes_eio() {
    let server = serve(Arc::new(FixedDevice(Ok(Some(bytes::Bytes::from_static(&[0; 100]))))));
    let mut client = RawClient::transmitting(addr(&server));
    client.request(0, CMD_READ, 1, 0, 512);
    assert_eq!(client.reply(), (Errno::Io as u32, 1));
    client.request(0, CMD_FLUSH, 2, 0, 0);
    assert_eq!(client.reply(), (0, 2), "stream still in sync");
}

#[test]
fn replies_go_out_in_completion_order_matched_by_cookie() {
    let device = GatedDevice::new();
    let server = serve(device.clone());
    let mut client = RawClient::transmitting(addr(&server));
    for cookie in 0..4u64 {
        client.write(cookie, cookie * 512, &[cookie as u8 + 1; 512]);
    }
    wait_until("4 requests submitted", || device.held() == 4);
    device.release_reversed();
    let cookies: Vec<u64> = (0..4)
        .map(|_| client.reply())
        .map(|(e, c)| {
            assert_eq!(e, 0);
            c
        })
        .collect();
    assert_eq!(cookies, vec![3, 2, 1, 0]);
    let snapshot = device.inner.snapshot();
    for i in 0..4 {
        assert!(snapshot[i * 512..(i + 1) * 512].iter().all(|&b| b == i as u8 + 1));
    }
}

#[test]
fn in_flight_requests_are_bounded_per_client() {
    let device = GatedDevice::new();
    let server = serve(device.clone());
    let mut client = RawClient::transmitting(addr(&server));
    let total = MAX_REQUESTS as u64 + 20;
    for cookie in 0..total {
        client.request(0, CMD_READ, cookie, 0, 512);
    }
    wait_until("the bound to fill", || device.held() == MAX_REQUESTS);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(device.held(), MAX_REQUESTS, "reader must wait at the bound");

    let mut reader = RawClient { stream: client.stream.try_clone().unwrap() };
    let replies = thread::spawn(move || {
        let mut cookies: Vec<u64> = (0..total)
            .map(|_| {
                let (error, cookie) = reader.reply();
                assert_eq!(error, 0);
                reader.read_bytes(512);
                cookie
            })
            .collect();
        cookies.sort_unstable();
        cookies
    });
    let deadline = Instant::now() + TIMEOUT;
    while !replies.is_finished() {
        assert!(Instant::now() < deadline, "replies never arrived");
        device.release_reversed();
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(replies.join().unwrap(), (0..total).collect::<Vec<_>>());
    assert_eq!(device.peak.load(Ordering::SeqCst), MAX_REQUESTS);
}

#[test]
fn disconnect_waits_for_in_flight_requests() {
    let device = GatedDevice::new();
    let server = serve(device.clone());
    let mut client = RawClient::transmitting(addr(&server));
    client.write(1, 0, &[7; 512]);
    client.request(0, CMD_DISC, 2, 0, 0);
    wait_until("write submitted", || device.held() == 1);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(server.connected_clients(), 1, "still serving the in-flight write");
    device.release_reversed();
    assert_eq!(client.reply(), (0, 1), "the in-flight write is answered before closing");
    client.expect_closed();
    wait_until("client to leave", || server.connected_clients() == 0);
}

#[test]
fn a_client_vanishing_mid_flight_is_cleaned_up() {
    let device = GatedDevice::new();
    let server = serve(device.clone());
    let mut client = RawClient::transmitting(addr(&server));
    for cookie in 0..8 {
        client.request(0, CMD_READ, cookie, 0, 4096);
    }
    wait_until("reads submitted", || device.held() == 8);
    drop(client);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(server.connected_clients(), 1, "counted until its requests complete");
    device.release_reversed();
    wait_until("client to leave", || server.connected_clients() == 0);
    // The server is still healthy for others.
    let mut other = RawClient::transmitting(addr(&server));
    other.request(0, CMD_FLUSH, 1, 0, 0);
    wait_until("flush submitted", || device.held() == 1);
    device.release_reversed();
    assert_eq!(other.reply(), (0, 1));
}

#[test]
fn connected_clients_counts_only_the_transmission_phase() {
    let (server, _) = serve_mem();
    assert_eq!(server.connected_clients(), 0);
    let mut negotiating = RawClient::connect(addr(&server));
    negotiating.send_flags(FLAG_C_FIXED_NEWSTYLE);
    let mut first = RawClient::transmitting(addr(&server));
    let _second = RawClient::transmitting(addr(&server));
    wait_until("two clients", || server.connected_clients() == 2);
    first.request(0, CMD_DISC, 0, 0, 0);
    first.expect_closed();
    wait_until("one client", || server.connected_clients() == 1);
}

#[test]
fn shutdown_closes_clients_and_waits_for_in_flight_completions() {
    let device = GatedDevice::new();
    let server = serve(device.clone());
    let mut idle = RawClient::transmitting(addr(&server));
    let mut busy = RawClient::transmitting(addr(&server));
    busy.write(1, 0, &[1; 512]);
    wait_until("write submitted", || device.held() == 1);
    let releaser = {
        let device = device.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            device.release_reversed();
        })
    };
    let addr = addr(&server);
    let started = Instant::now();
    server.shutdown();
    assert!(started.elapsed() >= Duration::from_millis(150), "shutdown returned before completion");
    releaser.join().unwrap();
    idle.expect_closed();
    busy.expect_closed();
    assert!(TcpStream::connect(addr).is_err(), "listener still accepting");
}

/// Completes every request on one thread, as the daemon's disk threads serve every client.
struct SerialDevice {
    queue: Mutex<std::sync::mpsc::Sender<(BlockRequest, Completion)>>,
}

impl SerialDevice {
    fn new(inner: Arc<MemDevice>) -> Arc<SerialDevice> {
        let (tx, rx) = std::sync::mpsc::channel::<(BlockRequest, Completion)>();
        thread::spawn(move || {
            for (request, done) in rx {
                inner.submit(request, done);
            }
        });
        Arc::new(SerialDevice { queue: Mutex::new(tx) })
    }
}

impl BlockDevice for SerialDevice {
    fn size_bytes(&self) -> u64 {
        SIZE
    }

    fn submit(&self, request: BlockRequest, done: Completion) {
        self.queue.lock().unwrap().send((request, done)).unwrap();
    }
}

#[test]
fn a_client_that_stops_reading_stalls_nobody_else() {
    let device = SerialDevice::new(Arc::new(MemDevice::new(SIZE as usize)));
    let server = serve(device);
    // Sixty reads of the whole device, replies never read: far more than the sockets buffer.
    let mut stalled = RawClient::transmitting(addr(&server));
    for cookie in 0..60 {
        stalled.request(0, CMD_READ, cookie, 0, SIZE as u32);
    }
    // The device thread completed those reads; their replies wait on the stalled client's
    // writer, not on it. Another client is served meanwhile.
    let mut other = RawClient::transmitting(addr(&server));
    other.write(1, 0, &[0x5a; 4096]);
    assert_eq!(other.reply(), (0, 1));
    other.request(0, CMD_READ, 2, 0, 4096);
    assert_eq!(other.reply(), (0, 2));
    assert_eq!(other.read_bytes(4096), vec![0x5a; 4096]);
    drop(stalled);
}

#[test]
fn clients_beyond_the_cap_are_closed_at_once_and_places_come_back() {
    let (server, _) = serve_mem();
    let held: Vec<RawClient> = (0..super::MAX_CLIENTS).map(|_| RawClient::connect(addr(&server))).collect();
    let mut refused = TcpStream::connect(addr(&server)).unwrap();
    refused.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut byte = [0; 1];
    assert!(matches!(refused.read(&mut byte), Ok(0) | Err(_)), "no greeting past the cap");
    drop(held);
    // The accept loop reaps finished clients as the next one arrives.
    wait_until("a place again", || {
        let mut stream = TcpStream::connect(addr(&server)).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.read(&mut byte).is_ok_and(|n| n == 1)
    });
}

#[test]
fn a_client_that_never_finishes_the_handshake_is_closed() {
    let (server, _) = serve_mem();
    let mut client = RawClient::connect(addr(&server));
    client.stream.set_read_timeout(Some(super::HANDSHAKE_DEADLINE + TIMEOUT)).unwrap();
    // The greeting was read; the client's flags never come.
    client.expect_closed();
}
