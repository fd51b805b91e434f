//! Certificates for the TLS tests, made with rcgen in QEMU's directory
//! layout: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
//! `client-cert.pem`, `client-key.pem`. ECDSA P-256 keys: milliseconds.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// A certificate authority that signs the others.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn dn(parts: &[(DnType, &str)]) -> rcgen::DistinguishedName {
    let mut d = rcgen::DistinguishedName::new();
    for (t, v) in parts {
        d.push(t.clone(), *v);
    }
    d
}

impl Ca {
    /// A self-signed CA named `C=GB,O=<org>,CN=<org> CA`.
    pub fn new(org: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(&[
            (DnType::CountryName, "GB"),
            (DnType::OrganizationName, org),
            (DnType::CommonName, &format!("{org} CA")),
        ]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn leaf(&self, cn: &str, server: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name =
            dn(&[(DnType::CountryName, "GB"), (DnType::OrganizationName, "Example"), (DnType::CommonName, cn)]);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        if server {
            p.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a credential directory `root/name`: this CA's certificate, a
    /// server certificate for `localhost` and 127.0.0.1, and, unless
    /// `client_cn` is `None`, a client certificate named
    /// `C=GB,O=Example,CN=<client_cn>`.
    pub fn dir(&self, root: &Path, name: &str, client_cn: Option<&str>) -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca-cert.pem"), self.cert.pem()).unwrap();
        let (c, k) = self.leaf("localhost", true);
        std::fs::write(d.join("server-cert.pem"), c).unwrap();
        std::fs::write(d.join("server-key.pem"), k).unwrap();
        if let Some(cn) = client_cn {
            let (c, k) = self.leaf(cn, false);
            std::fs::write(d.join("client-cert.pem"), c).unwrap();
            std::fs::write(d.join("client-key.pem"), k).unwrap();
        }
        d
    }
}
