//! Who a TLS export lets in: plaintext clients, certificates from another
//! CA, clients without a certificate, identities outside the access list
//! and wrong host names are refused, by `oxcow serve` as by qemu-nbd and
//! by oxcow's client as by QEMU's; and before STARTTLS the server answers
//! every option exactly as qemu-nbd does, without a word about the export.

use crate::support::certs::Ca;
use crate::support::process::{run, s};
use crate::tls_interop::{client_creds, nbds_url, oxcow_serve, qemu_io_tls, qemu_nbd, server_creds, setup, Server};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

const OXCOW: &str = env!("CARGO_BIN_EXE_oxcow");

fn oxcow_reads(url: &str) -> (i32, String, String) {
    run(OXCOW, &["io", "-f", "raw", "-r", "-c", "read 0 4k", url])
}

#[test]
fn plaintext_clients_are_refused() {
    let t = setup();
    let _server = oxcow_serve(&t.img, &t.sock, &["--object", &server_creds(&t.creds, true), "--tls-creds", "tls0"]);
    let plain = format!("nbd+unix:///disk?socket={}", s(&t.sock));
    let (code, out, err) = run("qemu-io", &["-f", "raw", "-r", "-c", "read 0 4k", &plain]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("TLS"), "qemu-io says why: {err}");
    let (code, out, err) = oxcow_reads(&plain);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("TLS negotiation required before option 7 (go)"), "{err}");
    // A TLS client still gets in afterwards.
    assert_eq!(oxcow_reads(&nbds_url(&t.creds, &t.sock)).0, 0);
}

#[test]
fn certificates_from_another_ca_are_refused_both_ways() {
    let t = setup();
    let other = Ca::new("Elsewhere").dir(t.dir.path(), "other", Some("client1"));
    let obj = server_creds(&t.creds, true);
    {
        let _oxcow = oxcow_serve(&t.img, &t.sock, &["--object", &obj, "--tls-creds", "tls0"]);
        let (code, out, err) = qemu_io_tls(&other, &t.sock, &["read 0 4k"]);
        assert_ne!(code, 0, "qemu-io with a foreign CA got in: {out}{err}");
        let (code, out, err) = oxcow_reads(&nbds_url(&other, &t.sock));
        assert_ne!(code, 0, "oxcow with a foreign CA got in: {out}{err}");
        assert_eq!(oxcow_reads(&nbds_url(&t.creds, &t.sock)).0, 0, "the right CA still works");
    }
    std::fs::remove_file(&t.sock).unwrap();
    let _qemu = qemu_nbd(&t.img, &t.sock, &["--object", &obj, "--tls-creds", "tls0"]);
    let (code, out, err) = oxcow_reads(&nbds_url(&other, &t.sock));
    assert_ne!(code, 0, "qemu-nbd let a foreign CA in, or oxcow accepted its certificate: {out}{err}");
    assert_eq!(oxcow_reads(&nbds_url(&t.creds, &t.sock)).0, 0);
}

#[test]
fn a_client_without_certificate_is_refused_unless_verify_peer_is_off() {
    let t = setup();
    let anon = Ca::new("Example").dir(t.dir.path(), "anon", None);
    // The anonymous client trusts the server's CA, but has no certificate.
    std::fs::copy(t.creds.join("ca-cert.pem"), anon.join("ca-cert.pem")).unwrap();
    {
        let _s = oxcow_serve(&t.img, &t.sock, &["--object", &server_creds(&t.creds, true), "--tls-creds", "tls0"]);
        let (code, out, err) = qemu_io_tls(&anon, &t.sock, &["read 0 4k"]);
        assert_ne!(code, 0, "{out}{err}");
        assert_ne!(oxcow_reads(&nbds_url(&anon, &t.sock)).0, 0);
    }
    std::fs::remove_file(&t.sock).unwrap();
    let _s = oxcow_serve(&t.img, &t.sock, &["--object", &server_creds(&t.creds, false), "--tls-creds", "tls0"]);
    let (code, out, err) = qemu_io_tls(&anon, &t.sock, &["read 0 4k"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(oxcow_reads(&nbds_url(&anon, &t.sock)).0, 0);
}

/// Serves with `authz` (an `--object` defining `auth0`) and tells
/// whether the client certificates `CN=client1` and `CN=client2` (same CA;
/// with `utf8_country`, client2's country is a UTF8String) get in.
fn admitted(serve: fn(&Path, &Path, &[&str]) -> Server, authz: &str, utf8_country: bool) -> (bool, bool) {
    let t = setup();
    let two = t.ca.client_dir(t.dir.path(), "two", "client2", utf8_country);
    let obj = server_creds(&t.creds, true);
    let _s =
        serve(&t.img, &t.sock, &["--object", &obj, "--object", authz, "--tls-creds", "tls0", "--tls-authz", "auth0"]);
    (oxcow_reads(&nbds_url(&t.creds, &t.sock)).0 == 0, oxcow_reads(&nbds_url(&two, &t.sock)).0 == 0)
}

#[test]
fn authz_lets_in_exactly_the_listed_identities() {
    let simple = "authz-simple,id=auth0,identity=C=GB,,O=Example,,CN=client1";
    let exact = "authz-list,id=auth0,policy=deny,rules.0.match=C=GB,,O=Example,,CN=client2,rules.0.policy=allow";
    let glob = "authz-list,id=auth0,policy=allow,rules.0.match=*CN=client1,rules.0.policy=deny,rules.0.format=glob";
    let json = r#"{"qom-type":"authz-list","id":"auth0","rules":[{"match":"C=GB,O=Example,CN=client*","policy":"allow","format":"glob"}]}"#;
    // gnutls prints a country that is not a PrintableString as DER hex.
    let hex = "authz-simple,id=auth0,identity=C=#0c024742,,O=Example,,CN=client2";
    let cases = [(simple, (true, false)), (exact, (false, true)), (glob, (false, true)), (json, (true, true))];
    for (authz, want) in cases {
        assert_eq!(admitted(oxcow_serve, authz, false), want, "oxcow serve with {authz}");
    }
    assert_eq!(admitted(oxcow_serve, hex, true), (false, true), "oxcow serve with {hex}");
    // qemu-nbd reads the same identity strings the same way: gnutls's DN
    // order and value printing are the ones oxcow matches.
    for (authz, want, utf8) in
        [(simple, (true, false), false), (exact, (false, true), false), (hex, (false, true), true)]
    {
        assert_eq!(admitted(qemu_nbd, authz, utf8), want, "qemu-nbd with {authz}");
    }
}

#[test]
fn the_server_name_is_checked_against_the_host() {
    let t = setup();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let obj = server_creds(&t.creds, true);
    let img = s(&t.img);
    let mut child = std::process::Command::new(OXCOW)
        .args([
            "serve",
            "-t",
            "-e",
            "4",
            "-f",
            "qcow2",
            "-x",
            "disk",
            "-p",
            &port,
            "--object",
            &obj,
            "--tls-creds",
            "tls0",
            img,
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    crate::support::process::wait_ready("oxcow serve on TCP", Some(&mut child), || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    let _server = Server::adopt(child);
    let creds = s(&t.creds);
    // The certificate names localhost and 127.0.0.1.
    for (host, extra, ok) in [
        ("127.0.0.1", "", true),
        ("localhost", "", true),
        ("127.0.0.1", "&tls-hostname=other.example", false),
        ("127.0.0.1", "&tls-hostname=localhost", true),
    ] {
        let url = format!("nbds://{host}:{port}/disk?tls-certificates={creds}{extra}");
        let (code, out, err) = oxcow_reads(&url);
        assert_eq!(code == 0, ok, "{url}: {out}{err}");
    }
    let obj = client_creds(&t.creds);
    let opts = format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,tls-creds=tls0,tls-hostname=other.example");
    let (code, out, err) = run("qemu-io", &["--object", &obj, "--image-opts", "-r", "-c", "read 0 4k", &opts]);
    assert_ne!(code, 0, "qemu-io accepted a certificate for the wrong name: {out}{err}");
    let opts = opts.replace(",tls-hostname=other.example", "");
    let (code, out, err) = run("qemu-io", &["--object", &obj, "--image-opts", "-r", "-c", "read 0 4k", &opts]);
    assert_eq!(code, 0, "{out}{err}");
}

/// The reply types a server sends to options before STARTTLS, in order;
/// `None` once the server closed the connection. Fails if any reply
/// mentions the export's name.
fn replies_before_tls(sock: &Path, options: &[(u32, Vec<u8>)]) -> Vec<Option<u32>> {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    let mut out = Vec::new();
    for (opt, data) in options {
        let mut m = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        if c.write_all(&m).is_err() {
            out.push(None);
            break;
        }
        let mut h = [0u8; 20];
        if c.read_exact(&mut h).is_err() {
            out.push(None);
            break;
        }
        assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), *opt, "reply to another option");
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        c.read_exact(&mut body).unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("disk") && !text.contains("secret export"), "reply leaks the export: {text}");
        out.push(Some(u32::from_be_bytes(h[12..16].try_into().unwrap())));
    }
    out
}

#[test]
fn options_before_starttls_get_the_replies_qemu_nbd_gives() {
    let t = setup();
    let info = {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        d
    };
    let meta = {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        d
    };
    // LIST, INFO, GO, STRUCTURED_REPLY, LIST/SET_META_CONTEXT, an unknown
    // option, EXTENDED_HEADERS, then ABORT (answered, then closed).
    let options: Vec<(u32, Vec<u8>)> = vec![
        (3, vec![]),
        (6, info.clone()),
        (7, info),
        (8, vec![]),
        (9, meta.clone()),
        (10, meta),
        (0x4242, vec![1, 2, 3]),
        (11, vec![]),
        (2, vec![]),
        (3, vec![]),
    ];
    let name_first: Vec<(u32, Vec<u8>)> = vec![(1, b"disk".to_vec())];
    let starttls_with_data: Vec<(u32, Vec<u8>)> = vec![(5, vec![0]), (3, vec![])];
    let obj = server_creds(&t.creds, true);
    let args = ["--object", obj.as_str(), "--tls-creds", "tls0", "-D", "secret export"];
    let mut seen = Vec::new();
    for serve in [qemu_nbd as fn(&Path, &Path, &[&str]) -> Server, oxcow_serve] {
        let _ = std::fs::remove_file(&t.sock);
        let _s = serve(&t.img, &t.sock, &args);
        seen.push((
            replies_before_tls(&t.sock, &options),
            replies_before_tls(&t.sock, &name_first),
            replies_before_tls(&t.sock, &starttls_with_data),
        ));
    }
    let tls_reqd = Some((1 << 31) + 5);
    let (opts, name, bad_tls) = &seen[1];
    assert_eq!(opts[..9], vec![tls_reqd; 9][..], "every option but STARTTLS gets NBD_REP_ERR_TLS_REQD");
    assert_eq!(opts[9], None, "ABORT ends the connection");
    assert_eq!(name, &vec![None], "NBD_OPT_EXPORT_NAME before TLS closes the connection");
    assert_eq!(bad_tls, &vec![Some((1 << 31) + 3), None], "STARTTLS with data is invalid and fatal");
    assert_eq!(seen[0], seen[1], "qemu-nbd and oxcow serve differ");
}

#[test]
fn object_errors_read_as_qemu_img() {
    let t = setup();
    let img = s(&t.img);
    let missing = t.dir.path().join("missing");
    let creds = s(&t.creds);
    let cases = [
        "foo,id=x".to_string(),
        "id=x".to_string(),
        "tls-creds-x509,dir=/tmp".to_string(),
        "tls-creds-x509,id=x".to_string(),
        format!("tls-creds-x509,id=x,dir={}", s(&missing)),
        format!("tls-creds-x509,id=x,dir={},endpoint=server", s(&missing)),
        format!("tls-creds-x509,id=x,dir={creds},endpoint=bad"),
        format!("tls-creds-x509,id=x,dir={creds},bogus=1"),
        format!("tls-creds-x509,id=x,dir={creds},verify-peer=maybe"),
        format!("tls-creds-psk,id=p,dir={creds},endpoint=server"),
        "authz-simple,id=a".to_string(),
        "authz-list,id=a,rules.0.match=x,rules.0.policy=maybe".to_string(),
    ];
    for obj in &cases {
        let (qcode, _, qerr) = run("qemu-img", &["info", "--object", obj, img]);
        let (ocode, _, oerr) = run(OXCOW, &["info", "--object", obj, img]);
        let strip = |e: &str| e.lines().next().unwrap_or("").split_once(": ").map(|(_, m)| m.to_string());
        assert!(qcode != 0 && ocode != 0, "{obj}: qemu-img {qcode}, oxcow {ocode}");
        assert_eq!(strip(&oerr), strip(&qerr), "--object {obj}");
    }
    // Accepted by both.
    let good = [
        format!("tls-creds-x509,id=x,dir={creds}"),
        format!("tls-creds-x509,id=x,dir={creds},endpoint=server,verify-peer=off"),
    ];
    for obj in &good {
        assert_eq!(run("qemu-img", &["info", "--object", obj, img]).0, 0, "{obj}");
        let (code, out, err) = run(OXCOW, &["info", "--object", obj, img]);
        assert_eq!(code, 0, "{obj}: {out}{err}");
    }
}

/// `qemu-img info` (QEMU's, and oxcow's under that name) of the TLS export
/// on `sock`, with client credentials from `creds` (none: a plain client)
/// and `extra` image options; returns the error after "Could not open
/// '...': ", hints included.
fn info_refusal(prog: &str, creds: Option<&Path>, sock: &Path, extra: &str) -> String {
    let obj = creds.map(client_creds);
    let tls = if obj.is_some() { ",tls-creds=tls0" } else { "" };
    let opts = format!("driver=nbd,server.type=unix,server.path={},export=disk{tls}{extra}", s(sock));
    let mut args = vec!["info"];
    if let Some(o) = &obj {
        args.extend(["--object", o.as_str()]);
    }
    args.extend(["--image-opts", opts.as_str()]);
    let (code, out, err) = run(prog, &args);
    assert_ne!(code, 0, "{prog} got in: {out}{err}");
    err.split_once("': ").map(|(_, e)| e.to_string()).unwrap_or(err)
}

/// 233 (iotest): oxcow's client words each refusal as QEMU's does, each
/// against the same oxcow server: a plain client, a CA it does not know,
/// no host name to check over a Unix socket, a name the certificate does
/// not carry, an identity the access list refuses, a TLS client to a
/// plain server.
#[test]
fn client_refusals_read_as_qemu_img() {
    let t = setup();
    let dropin = tempfile::tempdir().unwrap();
    let ours_img = dropin.path().join("qemu-img");
    std::os::unix::fs::symlink(OXCOW, &ours_img).unwrap();
    let ours = s(&ours_img);
    let other = Ca::new("Elsewhere").client_dir(t.dir.path(), "other", "client2", false);
    let both = |creds: Option<&Path>, extra: &str| {
        let want = info_refusal("qemu-img", creds, &t.sock, extra);
        assert_eq!(info_refusal(ours, creds, &t.sock, extra), want, "creds {creds:?} {extra}");
        want
    };
    {
        let obj = server_creds(&t.creds, true);
        let _server = oxcow_serve(&t.img, &t.sock, &["--object", &obj, "--tls-creds", "tls0"]);
        let plain = both(None, "");
        assert!(plain.starts_with("TLS negotiation required before option 7 (go)\n"), "{plain}");
        both(Some(&other), ",tls-hostname=localhost");
        assert_eq!(both(Some(&t.creds), ""), "No hostname for certificate validation\n");
        both(Some(&t.creds), ",tls-hostname=elsewhere.example");
    }
    std::fs::remove_file(&t.sock).ok();
    {
        let obj = server_creds(&t.creds, true);
        let authz = "authz-simple,id=authz0,identity=CN=nobody";
        let _server = oxcow_serve(
            &t.img,
            &t.sock,
            &["--object", &obj, "--object", authz, "--tls-creds", "tls0", "--tls-authz", "authz0"],
        );
        both(Some(&t.creds), ",tls-hostname=localhost");
    }
    std::fs::remove_file(&t.sock).ok();
    let _server = oxcow_serve(&t.img, &t.sock, &[]);
    let refused = both(Some(&t.creds), ",tls-hostname=localhost");
    assert!(refused.starts_with("Denied by server for option 5 (starttls)\n"), "{refused}");
}
