//! X.509 certificates for the TLS tests, made with openssl: a CA, a server
//! certificate for localhost and 127.0.0.1, and a client certificate, in
//! the files qemu-nbd and libnbd read from a directory.

use std::path::Path;
use std::process::Command;

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
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ],
    );
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
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
        ],
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
