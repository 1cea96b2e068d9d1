//! X.509 certificates for the TLS tests, made with openssl: a CA, a server
//! certificate for localhost and 127.0.0.1, and a client certificate, in
//! the files qemu-nbd and libnbd read from a directory.

use std::path::Path;
use std::process::Command;

/// `openssl req` making a new P-256 key in `key` and, with `more`, what
/// they ask for (a request, or `-x509` a self-signed certificate).
fn new_key(dir: &Path, key: &str, subject: &str, more: &[&str]) {
    let mut args = vec!["req"];
    args.extend_from_slice(more);
    args.extend_from_slice(&[
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-subj",
        subject,
    ]);
    openssl(dir, &args);
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new key and certificate `name`-cert.pem / `name`-key.pem in `dir`,
/// signed by the CA there, with the extensions in `ext`.
fn signed(dir: &Path, name: &str, subject: &str, ext: &str) {
    let (key, csr, cert) = (
        format!("{name}-key.pem"),
        format!("{name}.csr"),
        format!("{name}-cert.pem"),
    );
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    new_key(dir, &key, subject, &["-out", &csr]);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &cert,
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

/// A CA named `ca` in `dir` (created), with a client certificate it signed.
pub fn ca_with_client(dir: &Path, ca: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let subject = format!("/CN={ca}");
    new_key(
        dir,
        "ca-key.pem",
        &subject,
        &["-x509", "-out", "ca-cert.pem", "-days", "2"],
    );
    signed(dir, "client", "/CN=client", "extendedKeyUsage=clientAuth\n");
}

/// Server and client certificates in `dir` under one new CA.
pub fn certificates(dir: &Path) {
    ca_with_client(dir, "mirrorvol-test-ca");
    signed(
        dir,
        "server",
        "/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
}
