//! TLS for NBD clients (issue 14): `serve --tls-certs DIR` with real
//! clients (nbdinfo, nbdcopy, qemu-io, qemu-img) over a Unix socket and
//! TCP; clients without TLS, or with a certificate from another CA, are
//! refused; `--tls allow` and `--tls-verify-peer no`; and the refusals of a
//! TLS set-up that does not hold or of a listener beyond loopback without
//! TLS.

mod common;

use std::process::Command;

use common::serve::{Served, mirror_group, ok, run, tools};
use common::{MIB, Sandbox, tls};

fn tls_uri(s: &Served, volume: &str, certs: &str) -> String {
    format!(
        "nbds+unix:///{volume}?socket={}&tls-certificates={certs}",
        s.sock.display()
    )
}

/// qemu's TLS client options for a Unix socket (`path`) or TCP
/// (`host`/`port`) image.
fn qemu_tls(certs: &str, target: &str) -> Vec<String> {
    vec![
        "--object".into(),
        format!("tls-creds-x509,id=tls0,endpoint=client,dir={certs}"),
        "--image-opts".into(),
        format!("driver=nbd,{target},export=data,tls-creds=tls0,tls-hostname=localhost"),
    ]
}

#[test]
fn tls_clients_read_and_write_and_clients_without_it_or_from_another_ca_are_refused() {
    if !tools(&["openssl", "nbdinfo", "nbdcopy", "qemu-io", "qemu-img"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    let certs = sb.p("tls");
    tls::certificates(&sb.path("tls"));
    let s = Served::start_args(
        &sb,
        &["--tls-certs", &certs, "--listen", "127.0.0.1:0"],
        &[("MIRRORVOL_LOG", "mirrorvol=info")],
    );
    let uri = tls_uri(&s, "data", &certs);
    let size = ok(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(size.trim(), (32 * MIB).to_string());

    // qemu-io writes a pattern and reads it back over TLS.
    let sock = format!("path={}", s.sock.display());
    let mut io = Command::new("qemu-io");
    io.args(qemu_tls(&certs, &sock)).args([
        "-c",
        "write -P 0x5c 1M 2M",
        "-c",
        "read -P 0x5c 1M 2M",
    ]);
    let out = ok(&mut io);
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // nbdcopy on four connections in and out, equal.
    let (src, data) = sb.data_file("src.bin", 16 * MIB as usize, 3);
    ok(Command::new("nbdcopy").args(["--connections=4", "--flush", &src, &uri]));
    let back = sb.p("back.bin");
    ok(Command::new("nbdcopy").args(["--connections=4", &uri, &back]));
    assert!(std::fs::read(&back).unwrap()[..data.len()] == data[..]);

    // qemu-img over TCP, with the certificate checked for localhost.
    let port = s.addrs[1].rsplit(':').next().unwrap().to_string();
    let mut info = Command::new("qemu-img");
    info.arg("info")
        .args(qemu_tls(&certs, &format!("host=localhost,port={port}")));
    let out = ok(&mut info);
    assert!(out.contains("32 MiB"), "{out}");

    // Without TLS: refused, and the client says why.
    let plain = format!("nbd+unix:///data?socket={}", s.sock.display());
    let (code, _, err) = run(Command::new("nbdinfo").args(["--size", &plain]));
    assert_ne!(code, 0);
    assert!(err.contains("TLS"), "{err}");
    // A client certificate from another CA (the client trusts the server).
    let other = sb.path("other");
    tls::ca_with_client(&other, "another-ca");
    std::fs::copy(sb.path("tls/ca-cert.pem"), other.join("ca-cert.pem")).unwrap();
    let (code, out, err) = run(Command::new("nbdinfo")
        .args(["--size", &tls_uri(&s, "data", &other.display().to_string())]));
    assert_ne!(code, 0, "a client of another CA was served: {out}");
    assert!(err.contains("nbd_connect_uri"), "{err}");
    // The server says why: the client showed no certificate it trusts.
    let said = std::time::Instant::now();
    while !s.stderr().contains("certificate") && said.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        s.stderr().contains("certificate"),
        "serve said nothing of the certificate:\n{}",
        s.stderr()
    );
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
    assert!(sb.read_volume("data")[..data.len()] == data[..]);
}

#[test]
fn tls_allow_serves_both_and_verify_peer_no_takes_clients_without_certificates() {
    if !tools(&["openssl", "nbdinfo"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    let certs = sb.p("tls");
    tls::certificates(&sb.path("tls"));
    // Only the CA: this client has no certificate of its own.
    let anonymous = sb.path("anonymous");
    std::fs::create_dir_all(&anonymous).unwrap();
    std::fs::copy(sb.path("tls/ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();
    let s = Served::start_args(
        &sb,
        &[
            "--tls-certs",
            &certs,
            "--tls",
            "allow",
            "--tls-verify-peer",
            "no",
        ],
        &[],
    );
    let plain = format!("nbd+unix:///data?socket={}", s.sock.display());
    for uri in [
        plain,
        tls_uri(&s, "data", &certs),
        tls_uri(&s, "data", &anonymous.display().to_string()),
    ] {
        let size = ok(Command::new("nbdinfo").args(["--size", &uri]));
        assert_eq!(size.trim(), (32 * MIB).to_string(), "{uri}");
    }
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");

    // With peer verification (the default), the anonymous client is not.
    let s = Served::start_args(&sb, &["--tls-certs", &certs, "--tls", "allow"], &[]);
    let (code, _, _) = run(Command::new("nbdinfo").args([
        "--size",
        &tls_uri(&s, "data", &anonymous.display().to_string()),
    ]));
    assert_ne!(code, 0);
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
}

#[test]
fn tls_set_ups_that_do_not_hold_and_open_listeners_without_tls_are_refused() {
    if !tools(&["openssl"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    sb.mv(&["serve", "--tls", "require"]).refused("--tls-certs");
    let missing = sb.p("nowhere");
    sb.mv(&["serve", "--tls-certs", &missing])
        .refused("server-cert.pem");
    sb.mv(&["serve", "--tls", "maybe"]).refused("maybe");
    // Beyond loopback without TLS: refused unless said so, then warned.
    sb.mv(&["serve", "--listen", "0.0.0.0:0"])
        .refused("--insecure-listen");
    let s = Served::start_args(&sb, &["--listen", "0.0.0.0:0", "--insecure-listen"], &[]);
    assert!(
        s.stderr()
            .contains("warning: listening on 0.0.0.0:0 without requiring TLS")
    );
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
    // With TLS required, an open listener needs nothing more.
    let certs = sb.p("tls");
    tls::certificates(&sb.path("tls"));
    let s = Served::start_args(&sb, &["--listen", "0.0.0.0:0", "--tls-certs", &certs], &[]);
    assert!(!s.stderr().contains("warning"), "{}", s.stderr());
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
}
