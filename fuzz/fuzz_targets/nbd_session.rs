//! An NBD client's bytes, whatever they hold, against the real NBD server: the greeting, the
//! option haggling (`handshake::negotiate`) and the transmission phase (request parsing,
//! validation, the in-flight bounds, replies), over a loopback connection to a server on an
//! in-memory device, exactly as a remote client would reach it. The session must end (the
//! server closes the connection once the input is exhausted), the server must not panic in
//! any of its threads (the fuzzer's panic hook aborts the process), and no request may make it
//! allocate more than its largest admitted payload.
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use blkrepl::config::NbdAddress;
use blkrepl::frontend::nbd::{NbdHandle, NbdServer};
use blkrepl::frontend::MemDevice;
use libfuzzer_sys::fuzz_target;

/// The NBD server's largest WRITE payload (32 MiB), read into one buffer, plus room for the
/// rest of a session.
const ALLOCATION_CAP: usize = 40 << 20;
/// The export: small, so that a READ of all of it is cheap.
const DEVICE_BYTES: usize = 1 << 20;
/// Far beyond what a session of a few kilobytes takes: reaching it means the server hangs.
const SESSION_TIMEOUT: Duration = Duration::from_secs(20);

/// The server, started once per process.
static SERVER: OnceLock<NbdHandle> = OnceLock::new();

fn server() -> SocketAddr {
    SERVER
        .get_or_init(|| {
            let loopback = NbdAddress::Tcp("127.0.0.1:0".parse().expect("an address"));
            let server = NbdServer::bind(&loopback).expect("bind a loopback port");
            server.serve("disk", Arc::new(MemDevice::new(DEVICE_BYTES)))
        })
        .address()
        .tcp()
        .expect("a TCP export")
}

fuzz_target!(
    init: {
        blkrepl_fuzz::cap_allocations(ALLOCATION_CAP);
        server();
    },
    |data: &[u8]| {
        let mut stream = TcpStream::connect(server()).expect("connect to the NBD server");
        stream.set_read_timeout(Some(SESSION_TIMEOUT)).expect("set a read timeout");
        // A writer of its own: the server may answer before it has read everything, and a
        // client that only reads after writing could fill both socket buffers.
        let mut writer = stream.try_clone().expect("clone the client socket");
        let input = data.to_vec();
        let sender = thread::spawn(move || {
            // The server may close first (a protocol violation ends the session).
            let _ = writer.write_all(&input);
            let _ = writer.shutdown(Shutdown::Write);
        });
        let mut replies = Vec::new();
        match stream.read_to_end(&mut replies) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the NBD server kept the session open {SESSION_TIMEOUT:?} after the input ended");
            }
            // A reset when the server closed with input unread.
            Err(_) => {}
        }
        sender.join().expect("the sender thread does not panic");
        // Whatever the client sends, the server speaks first, with the greeting (of which a
        // reset may leave only a part).
        let greeting = b"NBDMAGICIHAVEOPT";
        let n = replies.len().min(greeting.len());
        assert_eq!(&replies[..n], &greeting[..n], "the server did not start with its greeting");
    }
);
