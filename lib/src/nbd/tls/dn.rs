//! A certificate's subject as the identity string QEMU's TLS code hands
//! to `--tls-authz`: attributes as `KEY=value` joined by commas, in the
//! order they appear in the certificate (the order
//! `gnutls_x509_crt_get_dn` prints), RFC 4514 escaping.

use x509_parser::prelude::*;

/// Short names gnutls uses for the attribute types it knows.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.42" => "GN",
        "2.5.4.43" => "initials",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "EMAIL",
        _ => return None,
    })
}

fn escape(value: &str, out: &mut String) {
    let n = value.chars().count();
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

/// The subject of the DER certificate `der`, or `None` if it does not parse.
pub fn subject_dn(der: &[u8]) -> Option<String> {
    let (_, cert) = parse_x509_certificate(der).ok()?;
    let mut out = String::new();
    for rdn in cert.subject().iter() {
        for (i, attr) in rdn.iter().enumerate() {
            if !out.is_empty() {
                out.push(if i == 0 { ',' } else { '+' });
            }
            let oid = attr.attr_type().to_id_string();
            out.push_str(short_name(&oid).unwrap_or(&oid));
            out.push('=');
            match attr.as_str() {
                Ok(v) => escape(v, &mut out),
                Err(_) => {
                    out.push('#');
                    for b in attr.as_slice() {
                        out.push_str(&format!("{b:02x}"));
                    }
                }
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_as_rfc4514() {
        let mut s = String::new();
        escape("#Acme, Inc. ", &mut s);
        assert_eq!(s, "\\#Acme\\, Inc.\\ ");
    }
}
