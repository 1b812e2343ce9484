//! The sockets an NBD export listens on: TCP, or a Unix socket whose file's permissions decide
//! who may connect (a host's own VMs and tools, without a port anyone on the network reaches).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use crate::config::NbdAddress;
use crate::handshake_stream::TimedSocket;

/// How a TCP client that vanished without a word (its host lost power, its network went: no
/// FIN, no reset) is found out: its connection idle this long, the kernel probes it every
/// [`KEEPALIVE_INTERVAL`] and gives it up after [`KEEPALIVE_PROBES`] unanswered; and a reply it
/// never acknowledged (the ack of the last one lost with the network) is given up after
/// [`UNACKED_LIMIT`], not after TCP's fifteen minutes of retransmissions. Without them the
/// export would count such a client for ever, and a node whose export has clients refuses to
/// demote (`secondary`, a cluster manager's demote, `down`).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;
/// As long as the probes take; a client that reads nothing but whose host answers is another
/// matter (its kernel acknowledges, then advertises a zero window), left to the reply deadline.
const UNACKED_LIMIT: Duration = Duration::from_secs(25);

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// The socket file is removed when the listener goes.
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    /// Binds `address`. A Unix socket file left by an earlier run is replaced (any other file
    /// there is not), and the new one has `mode` before it appears under its name: it is bound
    /// under a temporary name beside it, given its mode, then renamed into place.
    pub fn bind(address: &NbdAddress) -> io::Result<Listener> {
        match address {
            NbdAddress::Tcp(address) => TcpListener::bind(address).map(Listener::Tcp),
            NbdAddress::Unix { path, mode } => {
                match std::fs::symlink_metadata(path) {
                    Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
                    Ok(_) => {
                        return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists and is not a socket", path.display())))
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                let mut temporary = path.clone().into_os_string();
                temporary.push(format!(".{}.new", std::process::id()));
                let temporary = std::path::PathBuf::from(temporary);
                let _ = std::fs::remove_file(&temporary);
                let listener = UnixListener::bind(&temporary)?;
                let placed = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(*mode))
                    .and_then(|()| std::fs::rename(&temporary, path));
                if let Err(e) = placed {
                    let _ = std::fs::remove_file(&temporary);
                    return Err(e);
                }
                Ok(Listener::Unix(listener, path.clone()))
            }
        }
    }

    /// Where clients reach it (the port the kernel picked, for TCP port 0).
    pub fn address(&self) -> io::Result<NbdAddress> {
        match self {
            Listener::Tcp(listener) => listener.local_addr().map(NbdAddress::Tcp),
            Listener::Unix(_, path) => {
                let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
                Ok(NbdAddress::Unix { path: path.clone(), mode })
            }
        }
    }

    /// Waits for a client: its socket, and who it is for the log.
    pub fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept()?;
                probe_when_idle(&stream)?;
                Ok((Stream::Tcp(stream), peer.to_string()))
            }
            Listener::Unix(listener, _) => {
                let (stream, _) = listener.accept()?;
                let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                    .map_or_else(|_| "unix".to_owned(), |cred| format!("unix:pid={},uid={}", cred.pid(), cred.uid()));
                Ok((Stream::Unix(stream), peer))
            }
        }
    }

    /// Makes a blocked [`Listener::accept`] return, once the caller has marked the server
    /// closed: a listening TCP socket shut down fails it at once; a Unix one is dialed.
    pub fn wake(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(listener) => {
                nix::sys::socket::shutdown(listener.as_raw_fd(), nix::sys::socket::Shutdown::Read)
                    .map_err(io::Error::from)
            }
            Listener::Unix(_, path) => UnixStream::connect(path).map(drop),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whether a connection ended because its client stopped answering: the keepalive probes or a
/// reply went unacknowledged (see [`KEEPALIVE_IDLE`]). The kernel then reports the last network
/// error it met meanwhile (no route to the client's host, seen when its link went), or
/// ETIMEDOUT if none.
pub fn went_silent(error: &io::Error) -> bool {
    use nix::libc::{EHOSTUNREACH, ENETUNREACH, ETIMEDOUT};
    matches!(error.raw_os_error(), Some(ETIMEDOUT | EHOSTUNREACH | ENETUNREACH))
}

/// Turns on the keepalive probes and the limit of [`KEEPALIVE_IDLE`].
fn probe_when_idle(stream: &TcpStream) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let seconds = |d: Duration| d.as_secs() as u32;
    setsockopt(stream, sockopt::KeepAlive, &true)?;
    setsockopt(stream, sockopt::TcpKeepIdle, &seconds(KEEPALIVE_IDLE))?;
    setsockopt(stream, sockopt::TcpKeepInterval, &seconds(KEEPALIVE_INTERVAL))?;
    setsockopt(stream, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)?;
    setsockopt(stream, sockopt::TcpUserTimeout, &(UNACKED_LIMIT.as_millis() as u32))?;
    Ok(())
}

/// A client's connection.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    /// Sends small writes at once (TCP; a Unix socket never holds them back).
    pub fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nodelay(true),
            Stream::Unix(_) => Ok(()),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl TimedSocket for Stream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
