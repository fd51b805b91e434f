//! A certificate's subject as the identity string QEMU's TLS code hands
//! to `--tls-authz`: attributes as `KEY=value` joined by commas, in the
//! order they appear in the certificate (the order
//! `gnutls_x509_crt_get_dn` prints, checked against qemu-nbd), RFC 4514
//! escaping. Like gnutls, a value whose string type its attribute does
//! not allow (a country as UTF8String, say) is printed as `#` and the hex
//! of its DER encoding: `C=#0c024742`.

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

/// The one string type gnutls accepts for attributes whose syntax is not
/// a DirectoryString choice: 19 PrintableString, 22 IA5String.
fn fixed_string_tag(oid: &str) -> Option<u32> {
    match oid {
        "2.5.4.6" | "2.5.4.5" | "2.5.4.46" => Some(19),
        "1.2.840.113549.1.9.1" | "0.9.2342.19200300.100.1.25" => Some(22),
        _ => None,
    }
}

/// `#` and the hex of a value's DER encoding (tag, length, content).
fn hex_der(tag: u32, content: &[u8], out: &mut String) {
    out.push('#');
    let mut der = Vec::with_capacity(content.len() + 6);
    // Universal, primitive tags below 31 fit in one byte; others are not
    // strings and are not worth a full encoder: show the content alone.
    if tag < 31 {
        der.push(tag as u8);
        let n = content.len();
        if n < 128 {
            der.push(n as u8);
        } else {
            let bytes: Vec<u8> = n.to_be_bytes().into_iter().skip_while(|&b| b == 0).collect();
            der.push(0x80 | bytes.len() as u8);
            der.extend_from_slice(&bytes);
        }
    }
    der.extend_from_slice(content);
    for b in der {
        out.push_str(&format!("{b:02x}"));
    }
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
            let tag = attr.attr_value().tag().0;
            let allowed = fixed_string_tag(&oid).is_none_or(|t| t == tag);
            match attr.as_str() {
                Ok(v) if allowed => escape(v, &mut out),
                _ => hex_der(tag, attr.as_slice(), &mut out),
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::{escape, hex_der};

    #[test]
    fn values_of_the_wrong_type_print_as_der_hex() {
        let mut s = String::new();
        hex_der(12, b"GB", &mut s);
        assert_eq!(s, "#0c024742");
        let mut s = String::new();
        hex_der(12, &[b'x'; 200], &mut s);
        assert!(s.starts_with("#0c81c87878"));
    }

    #[test]
    fn escapes_as_rfc4514() {
        let mut s = String::new();
        escape("#Acme, Inc. ", &mut s);
        assert_eq!(s, "\\#Acme\\, Inc.\\ ");
    }
}
