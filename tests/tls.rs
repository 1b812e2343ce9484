//! TLS links. Seen from the path between the nodes, by a proxy that beta's resource file puts
//! in front of alpha: an eavesdropper reads none of the replicated data (and on a plain link, to
//! show that the probe can see it, all of it); a data frame changed, dropped or sent twice on
//! the way drops the link with the reason, nothing of a changed or dropped frame is written,
//! and the resync after the reconnect repairs what the write missed. With
//! certificates instead of a secret: nodes whose certificates one CA signed replicate, and a
//! certificate another CA signed, or that names another node, is refused.

mod common;

use blkrepl::config::NodeCertificate;
use blkrepl::tls::{LinkTls, TlsError};
use common::pki::Pki;
use common::{free_ports, text, Cluster, Options, BIN};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;
const PLAIN: &str = "transport = \"plain\"";

/// What the proxy does to the next data frame from alpha to beta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tamper {
    /// Flips a bit in the middle of its payload.
    Flip,
    /// Leaves it out.
    Drop,
    /// Sends it twice.
    Replay,
}

/// What the proxy does with the bytes from alpha to beta.
#[derive(Default)]
struct Path {
    /// Every byte alpha sent beta, in order.
    heard: Mutex<Vec<u8>>,
    /// Done to the next data frame, once; then new connections are refused until `closed` is
    /// cleared.
    tamper: Mutex<Option<Tamper>>,
    closed: AtomicBool,
}

/// Bytes of the unit at the start of `bytes` (a TLS record or a blkrepl frame with its MAC or
/// tag), once its header is there.
fn unit_len(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < 5 {
        return None;
    }
    if bytes[..4] != *b"BLKR" {
        return Some(5 + usize::from(u16::from_be_bytes([bytes[3], bytes[4]])));
    }
    let header = bytes.get(..16)?;
    let flags = u16::from_be_bytes([header[6], header[7]]);
    let len = u32::from_be_bytes(header[8..12].try_into().unwrap()) as usize;
    Some(16 + len + if flags != 0 { 16 } else { 0 })
}

/// Whether `unit` is a Data frame (message type 0x0010).
fn is_data(unit: &[u8]) -> bool {
    unit.starts_with(b"BLKR") && unit[4..6] == [0x00, 0x10]
}

/// Forwards connections from `listener` to `target`, recording and maybe changing what flows
/// back from the target.
fn proxy(listener: TcpListener, target: String, path: Arc<Path>) {
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            if path.closed.load(Ordering::SeqCst) {
                continue;
            }
            let Ok(upstream) = TcpStream::connect(&target) else { continue };
            let (client_r, upstream_w) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            std::thread::spawn(move || pump(client_r, upstream_w, None));
            let path = path.clone();
            std::thread::spawn(move || pump(upstream, client, Some(path)));
        }
    });
}

/// Forwards `from` to `to`; with `path`, whole units (TLS records, frames), recorded, the next
/// data frame tampered with as `path` says.
fn pump(mut from: TcpStream, mut to: TcpStream, path: Option<Arc<Path>>) {
    let mut buf = vec![0u8; 256 << 10];
    let mut pending = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Some(path) = &path else {
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            continue;
        };
        path.heard.lock().unwrap().extend_from_slice(&buf[..n]);
        pending.extend_from_slice(&buf[..n]);
        let mut out = Vec::new();
        while let Some(len) = unit_len(&pending).filter(|len| *len <= pending.len()) {
            let mut unit: Vec<u8> = pending.drain(..len).collect();
            let tamper = if is_data(&unit) { path.tamper.lock().unwrap().take() } else { None };
            if tamper.is_some() {
                path.closed.store(true, Ordering::SeqCst);
            }
            match tamper {
                None => out.extend_from_slice(&unit),
                Some(Tamper::Flip) => {
                    let middle = unit.len() / 2;
                    unit[middle] ^= 0x01;
                    out.extend_from_slice(&unit);
                }
                Some(Tamper::Drop) => {}
                Some(Tamper::Replay) => out.extend_from_slice(&[unit.clone(), unit].concat()),
            }
        }
        if to.write_all(&out).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// alpha and beta (`extra` in their resource file), with beta reaching alpha through a proxy;
/// up, alpha Primary, beta UpToDate.
fn pair_through_a_proxy(extra: &'static str) -> (Cluster, Arc<Path>) {
    let c = Cluster::new(&["alpha", "beta"], Options { disk_mib: 16, extra, ..Options::default() });
    let config = std::fs::read_to_string(c.config_dir().join("r0.toml")).unwrap();
    let alpha = blkrepl::config::ResourceConfig::load(&c.config_dir(), "r0").unwrap().node("alpha").unwrap().address;
    let via = format!("127.0.0.1:{}", free_ports(1)[0]);
    let listener = TcpListener::bind(&via).unwrap();
    let beta_dir = beta_config_dir(&c);
    std::fs::create_dir_all(&beta_dir).unwrap();
    std::fs::write(beta_dir.join("r0.toml"), config.replace(&alpha.to_string(), &via)).unwrap();
    let path = Arc::new(Path::default());
    proxy(listener, alpha.to_string(), path.clone());
    c.ok("alpha", &["create-md", "r0"]);
    c.ok("alpha", &["up", "r0"]);
    beta_ok(&c, &["create-md", "r0"]);
    beta_ok(&c, &["up", "r0"]);
    c.wait_for("alpha", "beta connected", |s| Cluster::peer(s, "beta")["connection"] == "Connected");
    c.ok("alpha", &["primary", "--force", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    (c, path)
}

fn beta_config_dir(c: &Cluster) -> PathBuf {
    c.dir.path().join("etc-beta")
}

/// `blkrepl` on beta with its own resource file (alpha's address is the proxy's).
fn beta_ok(c: &Cluster, args: &[&str]) {
    let out = Command::new(BIN)
        .arg("--config-dir")
        .arg(beta_config_dir(c))
        .arg("--run-dir")
        .arg(c.run_dir())
        .args(["--node", "beta"])
        .args(args)
        .env("BLKREPL_LOG", "debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "blkrepl {args:?} on beta failed: {}\n{}", text(&out.stderr), c.logs());
}

/// The longest run of `byte` in `bytes`.
fn longest_run(bytes: &[u8], byte: u8) -> usize {
    bytes.split(|b| *b != byte).map(<[u8]>::len).max().unwrap_or(0)
}

#[test]
fn an_eavesdropper_reads_no_replicated_data_on_a_tls_link_and_all_of_it_on_a_plain_one() {
    for (extra, tls) in [("", true), (PLAIN, false)] {
        let (c, path) = pair_through_a_proxy(extra);
        c.write("alpha", &[(4 * MIB, MIB, 0x3c)]);
        assert!(c.data_of("beta", 5 * MIB)[4 * MIB as usize..].iter().all(|b| *b == 0x3c), "replicated");
        let heard = path.heard.lock().unwrap();
        assert!(heard.len() as u64 > MIB, "the data went through the proxy ({} bytes)", heard.len());
        let run = longest_run(&heard, 0x3c);
        if tls {
            assert!(run < 16, "a run of {run} bytes of the data in clear on a TLS link");
        } else {
            assert!(run >= 4096, "the probe sees the data on a plain link (longest run {run})");
        }
    }
}

#[test]
fn a_data_frame_changed_dropped_or_replayed_on_a_tls_link_drops_it_and_the_resync_repairs_the_write() {
    for tamper in [Tamper::Flip, Tamper::Drop, Tamper::Replay] {
        tampered_write_is_caught(tamper);
    }
}

fn tampered_write_is_caught(tamper: Tamper) {
    let (c, path) = pair_through_a_proxy("");
    *path.tamper.lock().unwrap() = Some(tamper);
    c.write("alpha", &[(2 * MIB, MIB, 0x5a)]);
    assert_eq!(*path.tamper.lock().unwrap(), None, "{tamper:?}: the proxy saw the write's frame");
    c.wait_for("alpha", "beta lost", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    if tamper != Tamper::Replay {
        let beta = c.data_of("beta", 3 * MIB);
        assert!(!beta[2 * MIB as usize..].contains(&0x5a), "{tamper:?}: beta wrote something of the frame");
    }
    let log = std::fs::read_to_string(c.run_dir().join("r0.beta.log")).unwrap();
    assert!(log.contains("does not decrypt"), "{tamper:?}: beta says why it dropped the link:\n{}", c.logs());
    path.closed.store(false, Ordering::SeqCst);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    let (ok, out) = c.check("alpha", &[(2 * MIB, MIB, 0x5a)]);
    assert!(ok, "{out}");
    let beta = c.data_of("beta", 3 * MIB);
    assert!(beta[2 * MIB as usize..].iter().all(|b| *b == 0x5a), "the resync brought the write to beta");
}

/// A handshake between `dialer` and `acceptor` over loopback, the dialer naming `dialed`:
/// what each side got.
fn handshake(dialer: LinkTls, acceptor: LinkTls, dialed: &str) -> (Result<blkrepl::tls::Session, TlsError>, Result<blkrepl::tls::Session, TlsError>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    for s in [&stream, &accepted] {
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    }
    let accepting = std::thread::spawn(move || {
        let session = acceptor.accept(&accepted, &accepted);
        drop(accepted);
        session
    });
    let dialed = dialer.dial(&stream, &stream, dialed);
    drop(stream);
    (dialed, accepting.join().unwrap())
}

#[test]
fn certificates_from_the_resource_ca_that_name_their_node_are_all_a_link_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, other) = (Pki::new(dir.path(), "ca"), Pki::new(dir.path(), "other-ca"));
    let tls = |own: &NodeCertificate, node: &str| LinkTls::with_certificates(&pki.ca, own, node).unwrap();
    let (alpha, beta) = (pki.issue("alpha", &["alpha"]), pki.issue("beta", &["beta"]));

    let (dialed, accepted) = handshake(tls(&beta, "beta"), tls(&alpha, "alpha"), "alpha");
    let (dialed, accepted) = (dialed.unwrap(), accepted.unwrap());
    assert_eq!(dialed.channel, accepted.channel);
    assert!(accepted.names("beta"), "the dialer's certificate names it");
    assert!(!accepted.names("alpha") && !accepted.names("gamma"), "and no other node");

    // A dialer whose certificate an intermediate CA signed (its file carries the chain).
    let through = pki.intermediate("intermediate").issue("beta-via", &["beta"]);
    let (dialed, accepted) = handshake(tls(&through, "beta"), tls(&alpha, "alpha"), "alpha");
    assert!(dialed.is_ok(), "{dialed:?}");
    assert!(accepted.unwrap().names("beta"), "the chain through the intermediate names beta");

    // beta dials alpha's address, and a node holding gamma's certificate answers.
    let gamma = pki.issue("gamma", &["gamma"]);
    let (dialed, _) = handshake(tls(&beta, "beta"), tls(&gamma, "gamma"), "alpha");
    assert!(matches!(dialed, Err(TlsError::Handshake(_))), "a certificate for another node");

    // A certificate another CA signed, in either role.
    let stranger = LinkTls::with_certificates(&other.ca, &other.issue("stranger", &["beta"]), "beta").unwrap();
    let (dialed, accepted) = handshake(stranger, tls(&alpha, "alpha"), "alpha");
    assert!(dialed.is_err() && matches!(accepted, Err(TlsError::Handshake(_))), "a dialer from another CA");
    let stranger = LinkTls::with_certificates(&other.ca, &other.issue("stranger2", &["alpha"]), "alpha").unwrap();
    let (dialed, _) = handshake(tls(&beta, "beta"), stranger, "alpha");
    assert!(matches!(dialed, Err(TlsError::Handshake(_))), "an acceptor from another CA");
    // A dialer with the secret's throwaway certificate and none from the CA. (In TLS 1.3 the
    // client's side of the handshake ends before the server has checked its certificate: it
    // hears the refusal at its first read.)
    let (_, accepted) = handshake(LinkTls::for_this_run().unwrap(), tls(&alpha, "alpha"), "alpha");
    assert!(matches!(accepted, Err(TlsError::Handshake(_))), "a dialer without a certificate from the CA");
}

#[test]
fn a_node_whose_own_certificate_or_key_is_wrong_cannot_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (pki, other) = (Pki::new(dir.path(), "ca"), Pki::new(dir.path(), "other-ca"));
    let error = |own: &NodeCertificate, node: &str| LinkTls::with_certificates(&pki.ca, own, node).err().expect("refused").to_string();
    let alpha = pki.issue("alpha", &["alpha"]);
    assert!(error(&alpha, "beta").contains("does not pass the checks its peers make"), "{}", error(&alpha, "beta"));
    let foreign = other.issue("foreign", &["alpha"]);
    assert!(error(&foreign, "alpha").contains("does not pass the checks"), "{}", error(&foreign, "alpha"));
    std::fs::set_permissions(&alpha.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = error(&alpha, "alpha");
    assert!(err.contains("readable by other users") && err.contains("chmod 600"), "{err}");
    let missing = NodeCertificate { certificate: dir.path().join("none.crt"), key: alpha.key.clone() };
    assert!(error(&missing, "alpha").contains("cannot read"), "{}", error(&missing, "alpha"));
    std::fs::write(dir.path().join("empty.pem"), "not a certificate\n").unwrap();
    let empty = NodeCertificate { certificate: dir.path().join("empty.pem"), key: alpha.key.clone() };
    assert!(error(&empty, "alpha").contains("no PEM certificate"), "{}", error(&empty, "alpha"));
}

const CERTIFICATES: &str = "tls_ca = \"@CA@\"";
const CERTIFICATES_AND_NBD_TLS: &str = "tls_ca = \"@CA@\"\nnbd_tls = true";

/// alpha and beta authenticated by certificates (no secret; `extra`: one of the above): the
/// resource's `tls_ca` is `pki`'s, alpha's certificate is from `pki` and beta's from
/// `beta_pki`. Not up yet.
fn pair_with_certificates(pki: &Pki, beta_pki: &Pki, extra: &'static str) -> Cluster {
    let c = Cluster::new(&["alpha", "beta"], Options { disk_mib: 16, extra, ..Options::default() });
    c.edit_config("@CA@", &pki.ca.display().to_string());
    for (node, issuer) in [("alpha", pki), ("beta", beta_pki)] {
        let own = issuer.issue(node, &[node]);
        let keys = format!("certificate = \"{}\"\ncertificate_key = \"{}\"\n", own.certificate.display(), own.key.display());
        c.edit_config(&format!("name = \"{node}\"\n"), &format!("name = \"{node}\"\n{keys}"));
    }
    c
}

#[test]
fn nodes_with_certificates_from_the_resource_ca_replicate_without_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "ca");
    let c = pair_with_certificates(&pki, &pki, CERTIFICATES);
    c.create_md_and_up();
    c.wait_for("alpha", "beta connected", |s| Cluster::peer(s, "beta")["connection"] == "Connected");
    c.ok("alpha", &["primary", "--force", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.write("alpha", &[(MIB, MIB, 0x6b)]);
    assert!(c.data_of("beta", 2 * MIB)[MIB as usize..].iter().all(|b| *b == 0x6b), "the write reached beta");
}

#[test]
fn a_node_whose_certificate_another_ca_signed_is_refused_and_both_logs_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, other) = (Pki::new(dir.path(), "ca"), Pki::new(dir.path(), "other-ca"));
    // beta's file names the right CA, but its certificate is from another: it cannot start.
    let c = pair_with_certificates(&pki, &other, CERTIFICATES);
    c.ok("alpha", &["create-md", "r0"]);
    c.ok("alpha", &["up", "r0"]);
    c.ok("beta", &["create-md", "r0"]);
    let out = c.cli("beta", &["up", "r0"]);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("does not pass the checks its peers make"), "{err}");
    // Started anyway with another CA in its own file (a misconfigured node): each side's
    // handshake fails and says so.
    let beta_dir = beta_config_dir(&c);
    std::fs::create_dir_all(&beta_dir).unwrap();
    let config = std::fs::read_to_string(c.config_dir().join("r0.toml")).unwrap();
    std::fs::write(beta_dir.join("r0.toml"), config.replace(&pki.ca.display().to_string(), &other.ca.display().to_string())).unwrap();
    beta_ok(&c, &["up", "r0"]);
    let logs_say = |node: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(c.run_dir().join(format!("r0.{node}.log"))).unwrap_or_default();
            if log.contains("TLS handshake") {
                return log;
            }
            assert!(std::time::Instant::now() < deadline, "{node} never said why:\n{}", c.logs());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let (alpha_log, beta_log) = (logs_say("alpha"), logs_say("beta"));
    assert!(alpha_log.contains("TLS handshake") && beta_log.contains("TLS handshake"));
    assert_ne!(Cluster::peer(&c.status("alpha"), "beta")["connection"], "Connected");
}

/// qemu-io on alpha's export with `commands`, over TLS with the credentials in `creds` (a
/// directory as qemu wants it), or in clear: whether it succeeded, and what it said.
fn qemu_io(c: &Cluster, creds: Option<&std::path::Path>, commands: &[&str]) -> (bool, String) {
    let mut qemu = Command::new("qemu-io");
    let port = c.nbd_ports[0];
    match creds {
        Some(dir) => {
            qemu.arg("--object").arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", dir.display()));
            qemu.args(["--image-opts", &format!("driver=nbd,host=127.0.0.1,port={port},export=r0,tls-creds=tls0,tls-hostname=alpha")]);
        }
        None => {
            qemu.args(["-f", "raw", &format!("nbd://127.0.0.1:{port}/r0")]);
        }
    }
    for command in commands {
        qemu.args(["-c", command]);
    }
    let out = qemu.output().expect("qemu-io runs");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    // qemu-io reports a failed command on stdout and still exits 0.
    (out.status.success() && !said.contains("failed") && !said.contains("can't open"), said)
}

/// A directory of qemu client credentials: `ca`'s certificate, and a client certificate from
/// `issuer` (none: the client has no certificate).
fn qemu_credentials(dir: &std::path::Path, name: &str, ca: &Pki, issuer: Option<&Pki>) -> PathBuf {
    let creds = dir.join(name);
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::copy(&ca.ca, creds.join("ca-cert.pem")).unwrap();
    if let Some(issuer) = issuer {
        let own = issuer.issue(&format!("{name}-client"), &[name]);
        std::fs::copy(&own.certificate, creds.join("client-cert.pem")).unwrap();
        std::fs::copy(&own.key, creds.join("client-key.pem")).unwrap();
    }
    creds
}

#[test]
fn an_nbd_client_needs_tls_and_a_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, other) = (Pki::new(dir.path(), "ca"), Pki::new(dir.path(), "other-ca"));
    let c = pair_with_certificates(&pki, &pki, CERTIFICATES_AND_NBD_TLS);
    c.create_md_and_up();
    c.wait_for("alpha", "beta connected", |s| Cluster::peer(s, "beta")["connection"] == "Connected");
    c.ok("alpha", &["primary", "--force", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");

    let vm = qemu_credentials(dir.path(), "vm1", &pki, Some(&pki));
    let (ok, said) = qemu_io(&c, Some(&vm), &["write -P 0x4d 1M 1M", "read -P 0x4d 1M 1M"]);
    assert!(ok, "a client with a certificate from the CA: {said}");

    let (ok, said) = qemu_io(&c, None, &["write -P 0x11 1M 4k"]);
    assert!(!ok && said.contains("requires TLS"), "a client in clear: {said}");
    let no_certificate = qemu_credentials(dir.path(), "anonymous", &pki, None);
    let (ok, said) = qemu_io(&c, Some(&no_certificate), &["write -P 0x12 1M 4k"]);
    assert!(!ok, "a client without a certificate: {said}");
    let foreign = qemu_credentials(dir.path(), "foreign", &pki, Some(&other));
    let (ok, said) = qemu_io(&c, Some(&foreign), &["write -P 0x13 1M 4k"]);
    assert!(!ok, "a client whose certificate another CA signed: {said}");

    let (ok, said) = qemu_io(&c, Some(&vm), &["read -P 0x4d 1M 1M"]);
    assert!(ok, "nothing the refused clients sent was written: {said}");
    assert!(c.data_of("beta", 2 * MIB)[MIB as usize..].iter().all(|b| *b == 0x4d), "replicated");
    let log = std::fs::read_to_string(c.run_dir().join("r0.alpha.log")).unwrap();
    assert!(log.contains("peer sent no certificates"), "alpha says why it closed the anonymous client:\n{}", c.logs());
}
