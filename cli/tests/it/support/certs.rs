//! Certificates for the TLS tests, made with rcgen in QEMU's directory
//! layout: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
//! `client-cert.pem`, `client-key.pem`. ECDSA P-256 keys: milliseconds.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// A certificate authority that signs the others.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A name `C=GB,O=<org>,CN=<cn>`, the country as a PrintableString (as
/// certtool and openssl write it) or, with `utf8_country`, as a
/// UTF8String, which gnutls prints as hex.
fn dn(org: &str, cn: &str, utf8_country: bool) -> rcgen::DistinguishedName {
    let mut d = rcgen::DistinguishedName::new();
    if utf8_country {
        d.push(DnType::CountryName, "GB");
    } else {
        d.push(DnType::CountryName, DnValue::PrintableString("GB".try_into().unwrap()));
    }
    d.push(DnType::OrganizationName, org);
    d.push(DnType::CommonName, cn);
    d
}

impl Ca {
    /// A self-signed CA named `C=GB,O=<org>,CN=<org> CA`.
    pub fn new(org: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(org, &format!("{org} CA"), false);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn leaf(&self, cn: &str, server: bool) -> (String, String) {
        self.leaf_named(dn("Example", cn, false), server)
    }

    fn leaf_named(&self, name: rcgen::DistinguishedName, server: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = name;
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

    /// Writes a client's credential directory `root/name`: this CA's
    /// certificate and a client certificate `C=GB,O=Example,CN=<cn>`.
    /// With `utf8_country`, the country is a UTF8String.
    pub fn client_dir(&self, root: &Path, name: &str, cn: &str, utf8_country: bool) -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca-cert.pem"), self.cert.pem()).unwrap();
        let (c, k) = self.leaf_named(dn("Example", cn, utf8_country), false);
        std::fs::write(d.join("client-cert.pem"), c).unwrap();
        std::fs::write(d.join("client-key.pem"), k).unwrap();
        d
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
