//! Certificate authorities and node certificates for the TLS tests, written as PEM files the
//! way an operator would give them to blkrepl.

use blkrepl::config::NodeCertificate;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A CA whose certificate is in `ca` (PEM): the root a resource trusts.
pub struct Pki {
    pub ca: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    /// For an intermediate CA: its certificate, which the certificates it issues carry after
    /// their own.
    chain: String,
}

impl Pki {
    /// A new CA named `name`, its certificate written to `dir/name.pem`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let (params, key) = ca_params(name);
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.join(format!("{name}.pem"));
        std::fs::write(&ca, cert.pem()).unwrap();
        Pki { ca, issuer: Issuer::new(params, key), dir: dir.to_owned(), chain: String::new() }
    }

    /// A CA this one signs: its certificates chain to this one's root through it.
    pub fn intermediate(&self, name: &str) -> Pki {
        let (params, key) = ca_params(name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pki { ca: self.ca.clone(), issuer: Issuer::new(params, key), dir: self.dir.clone(), chain: cert.pem() + &self.chain }
    }

    /// A certificate for `names` signed by this CA, and its key (mode 600), written to
    /// `dir/file.crt` and `dir/file.key`.
    pub fn issue(&self, file: &str, names: &[&str]) -> NodeCertificate {
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (certificate, key_path) = (self.dir.join(format!("{file}.crt")), self.dir.join(format!("{file}.key")));
        std::fs::write(&certificate, cert.pem() + &self.chain).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        NodeCertificate { certificate, key: key_path }
    }
}

fn ca_params(name: &str) -> (CertificateParams, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.distinguished_name.push(DnType::CommonName, name);
    (params, KeyPair::generate().unwrap())
}
