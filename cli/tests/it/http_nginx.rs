//! `http://` and `https://` names against nginx: oxcow and QEMU's curl
//! driver read the same URL and must agree (info, map, convert), `io -r`,
//! `compare`, an overlay with copy-on-read that fetches each base cluster
//! once (counted in nginx's access log), and one-line errors for a
//! missing object and an untrusted certificate.

use crate::support::nginx::Nginx;
use crate::support::process::capture;
use crate::support::*;
use std::path::Path;
use std::process::Command;

const PATS: &[(u8, u64, u64)] = &[(0x11, 0, 65536), (0x22, 1 << 20, 200_000), (0x33, (3 << 20) + 512, 4096)];

/// A web root with a qcow2 base (patterns of PATS) and its raw twin.
fn setup(dir: &Path) -> Option<Nginx> {
    let www = dir.join("www");
    std::fs::create_dir(&www).unwrap();
    ok(&www, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_write(&www, "base.qcow2", PATS, &[]);
    ok(&www, "qemu-img", &["convert", "-O", "raw", "base.qcow2", "base.raw"]);
    Nginx::start(dir, &www)
}

/// Whether QEMU's curl block driver is installed (qemu-block-extra).
fn qemu_curl() -> bool {
    let r = capture(Command::new("qemu-img").args(["--help"]));
    let have = r.1.contains(" http ") || r.1.contains(" https");
    if !have {
        assert!(std::env::var_os("CI").is_none(), "QEMU's curl driver is missing (CI installs qemu-block-extra)");
        eprintln!("note: QEMU's curl driver not installed; comparing with the local file only");
    }
    have
}

/// oxcow and qemu-img convert `name` to the same raw disk.
fn convert_matches(dir: &Path, name: &str, extra: &[&str]) {
    for tool in [OXCOW, "qemu-img"] {
        let mut a = vec!["convert", "-O", "raw"];
        a.extend_from_slice(extra);
        a.extend([name, if tool == OXCOW { "ours.raw" } else { "theirs.raw" }]);
        ok(dir, tool, &a);
    }
    ok(dir, "qemu-img", &["compare", "-f", "raw", "-F", "raw", "ours.raw", "theirs.raw"]);
    ok(dir, "qemu-img", &["compare", "-f", "raw", "-F", "raw", "ours.raw", "www/base.raw"]);
}

/// Runs oxcow with `env` added.
fn ox_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let (code, stdout, stderr) = capture(Command::new(OXCOW).args(args).current_dir(dir).envs(env.iter().copied()));
    Run { code, stdout, stderr }
}

#[test]
fn oxcow_and_qemu_curl_agree_over_http() {
    let dir = tmp();
    let d = dir.path();
    let Some(n) = setup(d) else { return };
    let url = n.http("base.qcow2");
    if qemu_curl() {
        assert_info_matches(d, &url, &[]);
        assert_map_matches(d, &url, &[]);
        convert_matches(d, &url, &[]);
    }
    assert_patterns(d, &url, PATS, &[]);
    ok(d, OXCOW, &["compare", &url, "www/base.raw"]);
    ok(d, OXCOW, &["compare", &n.http("base.raw"), "www/base.qcow2"]);
    // A local qcow2 converted from the URL holds the same disk.
    ok(d, OXCOW, &["convert", "-O", "qcow2", &url, "copy.qcow2"]);
    ok(d, "qemu-img", &["compare", "copy.qcow2", "www/base.qcow2"]);
}

#[test]
fn https_checks_the_certificate_unless_told_not_to() {
    let dir = tmp();
    let d = dir.path();
    let Some(n) = setup(d) else { return };
    let url = n.https("base.qcow2");
    let ca = n.ca_file.display().to_string();
    let trusted = format!("driver=qcow2,file.driver=https,file.url={url},file.cafile={ca}");
    let r = ok(d, OXCOW, &["info", "--output=json", "--image-opts", &trusted]);
    assert_eq!(json(&r.stdout)["virtual-size"], 4 << 20);
    // The CA from the environment, as curl and OpenSSL take it.
    let r = ox_env(d, &["compare", &url, "www/base.qcow2"], &[("SSL_CERT_FILE", &ca)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // An unknown CA: refused, in one line, without retrying for long.
    let r = ox_env(d, &["info", &url], &[("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")]);
    assert_ne!(r.code, 0);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("certificate") || r.stderr.contains("Certificate"), "{}", r.stderr);
    // sslverify=off, as QEMU's curl driver takes it: both tools agree.
    let off = format!("driver=qcow2,file.driver=https,file.url={url},file.sslverify=off");
    if qemu_curl() {
        // JSON only: QEMU's human map names the file by a json: string.
        let args = ["map", "--output=json", "--image-opts", &off];
        assert_eq!(json(&ok(d, OXCOW, &args).stdout), json(&ok(d, "qemu-img", &args).stdout));
        convert_matches(d, &off, &["--image-opts"]);
    }
    let r = ox_env(d, &["io", "-r", "-c", "read -P 0x22 1M 200000", &url], &[("SSL_CERT_FILE", &ca)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

#[test]
fn overlay_on_http_base_copy_on_read_fetches_each_cluster_once() {
    let dir = tmp();
    let d = dir.path();
    let Some(n) = setup(d) else { return };
    let url = n.http("base.raw");
    let allow = [("OXCOW_ALLOW_NETWORK_BACKING", "1")];
    let r = ox_env(d, &["create", "-q", "-f", "qcow2", "-b", &url, "-F", "raw", "ov.qcow2"], &allow);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Without the permission the base is not contacted.
    let before = n.log().len();
    let r = ox_env(d, &["io", "-r", "-c", "read 0 4k", "ov.qcow2"], &[]);
    assert_ne!(r.code, 0);
    assert_eq!(n.log().len(), before);
    let reads: Vec<String> =
        PATS.iter().map(|(p, o, l)| format!("read -q -P {p} {o} {l}")).chain(["read -q 0 4M".into()]).collect();
    let mut args = vec!["io", "-C"];
    for c in &reads {
        args.extend(["-c", c.as_str()]);
    }
    args.push("ov.qcow2");
    let r = ox_env(d, &args, &allow);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let first: Vec<String> = n.log().into_iter().skip(before).filter(|l| l.contains(" 206 ")).collect();
    // Every fetched byte range lies in clusters no other fetch touched
    // (the length probe excepted).
    let mut seen = std::collections::HashSet::new();
    for line in &first {
        let range = line.split_whitespace().nth(2).unwrap().trim_start_matches("bytes=");
        let (a, b) = range.split_once('-').unwrap();
        let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
        if (a, b) == (0, 0) {
            continue;
        }
        for c in a / 65536..=b / 65536 {
            assert!(seen.insert(c), "cluster {c} fetched twice: {first:?}");
        }
    }
    // Read again: all local now; only the length probe reaches the server.
    let r = ox_env(d, &args, &allow);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let again: Vec<String> = n.log().into_iter().skip(before + first.len()).collect();
    assert!(again.iter().all(|l| l.contains("bytes=0-0")), "second pass fetched data: {again:?}");
    let r = ox_env(d, &["stream", "ov.qcow2"], &allow);
    assert_eq!(r.code, 0, "{}", r.stderr);
    ok(d, "qemu-img", &["compare", "ov.qcow2", "www/base.raw"]);
}

#[test]
fn missing_object_is_one_line_and_nonzero() {
    let dir = tmp();
    let d = dir.path();
    let Some(n) = setup(d) else { return };
    let r = oxcow(d, &["info", &n.http("nope.qcow2")]);
    assert_ne!(r.code, 0);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("no such object (HTTP 404)"), "{}", r.stderr);
}

mod s3 {
    //! `convert -O qcow2 local s3://...` (multipart upload) and reading the
    //! object back by its `s3://` name, with the endpoint and credentials
    //! from the AWS environment variables, against the library tests'
    //! in-test S3 endpoint.
    use super::*;
    use crate::support::s3_server::{S3Server, KEY_ID, SECRET};

    fn aws_env(srv: &S3Server, key: &str) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), srv.endpoint()),
            ("AWS_REGION".into(), "garage".into()),
            ("AWS_ACCESS_KEY_ID".into(), key.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET.into()),
            // No profile of the machine's user may leak in.
            ("AWS_CONFIG_FILE".into(), "/nonexistent".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/nonexistent".into()),
        ]
    }

    fn ox_aws(dir: &Path, args: &[&str], env: &[(String, String)]) -> Run {
        let (code, stdout, stderr) = capture(
            Command::new(OXCOW).args(args).current_dir(dir).envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        );
        Run { code, stdout, stderr }
    }

    #[test]
    fn convert_uploads_to_s3_and_reads_back() {
        let dir = tmp();
        let d = dir.path();
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", "src.qcow2", "12M"]);
        qemu_write(d, "src.qcow2", &[(0x41, 0, 3 << 20), (0x42, 9 << 20, 2 << 20)], &[]);
        let srv = S3Server::start();
        let env = aws_env(&srv, KEY_ID);
        let r = ox_aws(d, &["convert", "-O", "qcow2", "src.qcow2", "s3://images/base.qcow2"], &env);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(srv.store.lock().unwrap().objects.contains_key("images/base.qcow2"));
        let r = ox_aws(d, &["info", "--output=json", "s3://images/base.qcow2"], &env);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(json(&r.stdout)["format"], "qcow2");
        let r = ox_aws(d, &["compare", "s3://images/base.qcow2", "src.qcow2"], &env);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        // A wrong key: one line, non-zero, for reads and uploads alike.
        let bad = aws_env(&srv, "GKwrong");
        for args in [
            &["info", "s3://images/base.qcow2"][..],
            &["convert", "-O", "qcow2", "src.qcow2", "s3://images/other.qcow2"][..],
        ] {
            let r = ox_aws(d, args, &bad);
            assert_ne!(r.code, 0);
            assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
            assert!(r.stderr.contains("access denied"), "{}", r.stderr);
        }
        let r = ox_aws(d, &["info", "s3://images/missing.qcow2"], &env);
        assert_ne!(r.code, 0);
        assert!(r.stderr.contains("no such object (HTTP 404)"), "{}", r.stderr);
    }
}
