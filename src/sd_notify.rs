//! systemd's readiness protocol (sd_notify(3)): a service of `Type=notify` tells the service
//! manager that it is ready, what it is doing and that it is stopping, in datagrams of
//! `KEY=VALUE` lines sent to the Unix socket named by `NOTIFY_SOCKET`. It is one datagram per
//! message, so it is written here rather than taken from a crate (or libsystemd).

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

const ENV: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("{ENV}={0:?} is neither an absolute socket path nor an abstract name (@NAME); blkrepl cannot notify systemd through it")]
    Address(String),
    #[error("{ENV}={address:?}: {source}")]
    BadName { address: String, source: io::Error },
    #[error("cannot create a socket to notify systemd: {0}")]
    Socket(io::Error),
    #[error("cannot send {message:?} to {ENV} {address}: {source}")]
    Send { message: String, address: String, source: io::Error },
}

/// The service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    target: SocketAddr,
    /// As given, for messages.
    address: String,
}

impl Notifier {
    /// The notifier of the socket in `NOTIFY_SOCKET`, if set. The variable is removed from the
    /// environment so that processes this daemon starts (an NBD helper, a shell hook) cannot
    /// notify systemd in its name. Call it before any other thread starts: changing the
    /// environment is not thread-safe.
    pub fn take_from_env() -> Result<Option<Notifier>, NotifyError> {
        let Some(address) = std::env::var_os(ENV) else { return Ok(None) };
        std::env::remove_var(ENV);
        Notifier::new(&address.to_string_lossy()).map(Some)
    }

    /// `address`: an absolute path, or `@NAME` for a name in the abstract namespace (as systemd
    /// passes it to services in containers and to `systemd-run`).
    pub fn new(address: &str) -> Result<Notifier, NotifyError> {
        let target = if let Some(name) = address.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes())
        } else if address.starts_with('/') {
            SocketAddr::from_pathname(address)
        } else {
            return Err(NotifyError::Address(address.to_owned()));
        }
        .map_err(|source| NotifyError::BadName { address: address.to_owned(), source })?;
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        Ok(Notifier { socket, target, address: address.to_owned() })
    }

    /// Sends one message: newline-separated assignments, e.g. `READY=1\nSTATUS=serving`.
    pub fn notify(&self, message: &str) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(message.as_bytes(), &self.target)
            .map(drop)
            .map_err(|source| NotifyError::Send { message: message.to_owned(), address: self.address.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn receive(socket: &UnixDatagram) -> String {
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification arrives");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn reaches_a_socket_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::new(path.to_str().unwrap()).unwrap();
        notifier.notify("READY=1\nSTATUS=up").unwrap();
        assert_eq!(receive(&listener), "READY=1\nSTATUS=up");
    }

    #[test]
    fn reaches_an_abstract_name() {
        let name = format!("blkrepl-notify-test-{}", std::process::id());
        let listener = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        Notifier::new(&format!("@{name}")).unwrap().notify("STOPPING=1").unwrap();
        assert_eq!(receive(&listener), "STOPPING=1");
    }

    #[test]
    fn errors_say_what_failed() {
        let relative = Notifier::new("run/notify").unwrap_err().to_string();
        assert!(relative.contains("run/notify") && relative.contains("absolute"), "{relative}");
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let err = Notifier::new(missing.to_str().unwrap()).unwrap().notify("READY=1").unwrap_err().to_string();
        assert!(err.contains("READY=1") && err.contains("gone"), "{err}");
    }
}
