//! An NBD export as a disk (the backend of remote plexes): qemu-nbd serves
//! an image file over a Unix socket or TCP, and `NbdDisk` reads, writes,
//! flushes and zeroes it as a disk; what it wrote is in the file. An export
//! that is read-only or not there is refused; a server that went away fails
//! the request in flight, and a server back on the same address is used by
//! the next request.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Sandbox, have_tool, pattern, skip_or_fail};
use mirrorvol::disk::Disk;
use mirrorvol::disk::nbd::NbdDisk;

const TIMEOUT: Duration = Duration::from_secs(10);

/// qemu-nbd serving `file` as export "disk"; killed when dropped.
struct QemuNbd(Child);

impl QemuNbd {
    fn start(file: &Path, address: &[&str], extra: &[&str], ready: impl Fn() -> bool) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args([
                "--format=raw",
                "--persistent",
                "--export-name=disk",
                "--cache=none",
            ])
            .args(address)
            .args(extra)
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        let start = Instant::now();
        while !ready() {
            assert!(start.elapsed() < TIMEOUT, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd(child)
    }

    fn unix(file: &Path, sock: &Path, extra: &[&str]) -> QemuNbd {
        let _ = std::fs::remove_file(sock);
        let s = sock.display().to_string();
        QemuNbd::start(file, &["--socket", &s], extra, || sock.exists())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tools() -> bool {
    if !have_tool("qemu-nbd") {
        skip_or_fail("qemu-nbd is not installed");
        return false;
    }
    true
}

fn image(sb: &Sandbox, mib: u64) -> std::path::PathBuf {
    let p = sb.path("export.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

fn read_file(p: &Path, at: u64, len: usize) -> Vec<u8> {
    common::read_range(p, at, len)
}

#[test]
fn an_export_over_a_unix_socket_reads_writes_flushes_and_zeroes_as_a_disk() {
    if !tools() {
        return;
    }
    let sb = Sandbox::new();
    let file = image(&sb, 16);
    let sock = sb.path("nbd.sock");
    let _server = QemuNbd::unix(&file, &sock, &[]);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let d = NbdDisk::open(&uri, TIMEOUT).unwrap();
    assert_eq!(d.size(), 16 << 20);
    // qemu-nbd does not advertise multi-conn here: one connection.
    assert_eq!(d.max_connections(), 1);
    assert!(d.identity().controller.unwrap().starts_with("nbd:"));

    // A write larger than one request of some servers, unaligned to MiB.
    let data = pattern(3 << 20, 1);
    d.write_at(&data, (1 << 20) + 4096).unwrap();
    d.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    d.read_at(&mut back, (1 << 20) + 4096).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        read_file(&file, (1 << 20) + 4096, data.len()),
        data,
        "in the file"
    );

    // Four callers at once, each on its own connection from the pool.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let d = &d;
            s.spawn(move || {
                let mine = pattern(256 << 10, 10 + t);
                let at = (8 << 20) + t * (1 << 20);
                for _ in 0..8 {
                    d.write_at(&mine, at).unwrap();
                    let mut got = vec![0u8; mine.len()];
                    d.read_at(&mut got, at).unwrap();
                    assert_eq!(got, mine);
                }
            });
        }
    });
    d.flush().unwrap();
    for t in 0..4u64 {
        let at = (8 << 20) + t * (1 << 20);
        assert_eq!(read_file(&file, at, 256 << 10), pattern(256 << 10, 10 + t));
    }

    // Zeroes, kept allocated or not, and a discard: read back as zeroes
    // (qemu-nbd's discard of a raw file punches a hole).
    d.write_zeroes(1 << 20, 64 << 10).unwrap();
    d.zero_range((2 << 20) + 8192, 64 << 10).unwrap();
    d.flush().unwrap();
    assert!(read_file(&file, 1 << 20, 64 << 10).iter().all(|&b| b == 0));
    assert!(
        read_file(&file, (2 << 20) + 8192, 64 << 10)
            .iter()
            .all(|&b| b == 0)
    );
    // What lies after the zeroed ranges is still the pattern.
    assert_eq!(
        read_file(&file, (1 << 20) + (64 << 10), 4096),
        data[(64 << 10) - 4096..64 << 10]
    );
}

#[test]
fn an_export_over_tcp_is_a_disk_too() {
    if !tools() {
        return;
    }
    let sb = Sandbox::new();
    let file = image(&sb, 8);
    // A port free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = port.to_string();
    let _server = QemuNbd::start(&file, &["--bind=127.0.0.1", "--port", &p], &[], || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let d = NbdDisk::open(&format!("nbd://127.0.0.1:{port}/disk"), TIMEOUT).unwrap();
    let data = pattern(1 << 20, 2);
    d.write_at(&data, 4096).unwrap();
    d.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    d.read_at(&mut back, 4096).unwrap();
    assert_eq!(back, data);
    assert_eq!(read_file(&file, 4096, data.len()), data);
    assert_eq!(
        d.identity().controller.unwrap(),
        format!("nbd:127.0.0.1:{port}")
    );
}

#[test]
fn a_read_only_or_absent_export_is_refused() {
    if !tools() {
        return;
    }
    let sb = Sandbox::new();
    let file = image(&sb, 8);
    let sock = sb.path("nbd.sock");
    let _server = QemuNbd::unix(&file, &sock, &["--read-only"]);
    let e = NbdDisk::open(
        &format!("nbd+unix:///disk?socket={}", sock.display()),
        TIMEOUT,
    )
    .unwrap_err();
    assert!(e.to_string().contains("is read-only"), "{e}");
    let e = NbdDisk::open(
        &format!("nbd+unix:///other?socket={}", sock.display()),
        TIMEOUT,
    )
    .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    let e = NbdDisk::open(
        &format!("nbd+unix:///disk?socket={}", sb.p("none.sock")),
        TIMEOUT,
    )
    .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
}

#[test]
fn a_connection_that_broke_breaks_the_disk_and_a_new_open_reads_the_export_again() {
    if !tools() {
        return;
    }
    let sb = Sandbox::new();
    let file = image(&sb, 8);
    let sock = sb.path("nbd.sock");
    let server = QemuNbd::unix(&file, &sock, &[]);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let d = NbdDisk::open(&uri, TIMEOUT).unwrap();
    let data = pattern(64 << 10, 3);
    d.write_at(&data, 0).unwrap();
    d.flush().unwrap();
    assert!(d.health().is_ok());
    drop(server);
    let start = Instant::now();
    let mut back = vec![0u8; data.len()];
    assert!(d.read_at(&mut back, 0).is_err(), "the server is gone");
    assert!(
        start.elapsed() < TIMEOUT,
        "failed at once, not at the deadline"
    );
    // Whatever answers at that address now (here another export: a swapped
    // image) is not taken for the disk: no reconnection behind the group.
    let other = sb.path("other.img");
    std::fs::write(&other, vec![0x77u8; 8 << 20]).unwrap();
    let _swapped = QemuNbd::unix(&other, &sock, &[]);
    let e = d.read_at(&mut back, 0).unwrap_err();
    assert!(e.to_string().contains("is not reconnected"), "{e}");
    assert!(d.health().is_err(), "the group sees the disk broken");
    // Opened again (as reactivate does), it is the export there now.
    let again = NbdDisk::open(&uri, TIMEOUT).unwrap();
    again.read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0x77));
}

#[test]
fn a_volume_served_by_another_mirrorvol_is_a_disk_on_several_connections() {
    let sb = Sandbox::new();
    common::serve::mirror_group(&sb, 96, 32);
    let served = common::serve::Served::start(&sb, &[], &[]);
    // mirrorvol advertises multi-conn: four callers go at once.
    let d = NbdDisk::open(&served.uri("data"), TIMEOUT).unwrap();
    assert_eq!(d.size(), 32 << 20);
    assert_eq!(d.max_connections(), 4);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let d = &d;
            s.spawn(move || {
                let mine = pattern(1 << 20, 20 + t);
                d.write_at(&mine, t << 22).unwrap();
                d.flush().unwrap();
                let mut got = vec![0u8; mine.len()];
                d.read_at(&mut got, t << 22).unwrap();
                assert_eq!(got, mine);
            });
        }
    });
    drop(d);
    drop(served);
    // Offline, the volume holds what was written through the remote disk.
    let v = sb.read_volume("data");
    for t in 0..4u64 {
        let at = (t << 22) as usize;
        assert_eq!(&v[at..at + (1 << 20)], &pattern(1 << 20, 20 + t)[..]);
    }
}

/// `mirrorvol` run with the sandbox's run directory and `disks` as its
/// group's disks.
fn mv_disks(sb: &Sandbox, disks: &str, args: &[&str]) -> std::process::Output {
    Command::new(common::bin())
        .env("MIRRORVOL_DISKS", disks)
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
        .args(args)
        .output()
        .expect("run mirrorvol")
}

#[track_caller]
fn ok(o: std::process::Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A group of a local file and a qemu-nbd export (the URI given wherever a
/// disk path goes) with a 16 MiB mirror `data` holding a pattern.
struct Remote {
    server: Option<QemuNbd>,
    remote: std::path::PathBuf,
    sock: std::path::PathBuf,
    uri: String,
    disks: String,
    want: Vec<u8>,
}

fn remote_mirror(sb: &Sandbox) -> Remote {
    let local = sb.image("a.img", 64);
    let remote = image(sb, 64);
    let sock = sb.path("nbd.sock");
    let server = QemuNbd::unix(&remote, &sock, &[]);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let disks = format!("{local},{uri}");
    ok(mv_disks(
        sb,
        &disks,
        &["init", &local, &uri, "--style", "raw"],
    ));
    ok(mv_disks(
        sb,
        &disks,
        &["create", "data", "--size", "16M", "--mirror"],
    ));
    let (src, want) = sb.data_file("in.bin", 16 << 20, 4);
    ok(mv_disks(sb, &disks, &["copy", &src, "vol:data"]));
    Remote {
        server: Some(server),
        remote,
        sock,
        uri,
        disks,
        want,
    }
}

/// `serve` of the group on `SANDBOX/vol.sock`, stopped (SIGTERM, exit 0
/// checked) when dropped.
struct Serving(std::process::Child);

impl Serving {
    fn start(sb: &Sandbox, disks: &str, extra: &[&str]) -> (Serving, String) {
        let vol = sb.path("vol.sock");
        let child = Command::new(common::bin())
            .env("MIRRORVOL_DISKS", disks)
            .env("MIRRORVOL_RUN_DIR", sb.path("run"))
            .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
            .arg("serve")
            .args(extra)
            .arg("--listen")
            .arg(format!("unix:{}", vol.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let serving = Serving(child);
        let start = Instant::now();
        while !vol.exists() || mv_disks(sb, disks, &["status"]).status.code() != Some(0) {
            assert!(start.elapsed() < TIMEOUT, "serve did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        (
            serving,
            format!("nbd+unix:///data?socket={}", vol.display()),
        )
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        assert!(self.0.wait().unwrap().success(), "serve exits 0");
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// qemu-io commands on `uri`, which must all succeed.
#[track_caller]
fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = c.arg(uri).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?}: {text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn status_of(sb: &Sandbox, disks: &str) -> serde_json::Value {
    serde_json::from_str(&ok(mv_disks(sb, disks, &["status", "--json"]))).unwrap()
}

/// A mirror with one plex on a local file and one on an NBD export: the
/// export's server killed under `serve` fails that disk and the client
/// sees no error; back, the disk is reactivated and resynced, and holds
/// the volume alone.
#[test]
fn a_mirror_with_a_plex_on_an_nbd_export_survives_its_server_and_takes_it_back() {
    if !tools() || !have_tool("qemu-io") {
        return;
    }
    let sb = Sandbox::new();
    let mut r = remote_mirror(&sb);
    let st = status_of(&sb, &r.disks);
    let d = common::disk(&st, &r.uri);
    assert_eq!(d["state"], "online", "{st:#}");
    assert_eq!(
        d["controller"],
        format!("nbd:{}", r.sock.display()),
        "{st:#}"
    );
    assert_eq!(common::volume(&st, "data")["duplexed"], true, "{st:#}");

    let (serving, served) = Serving::start(&sb, &r.disks, &["--io-timeout", "3"]);
    qemu_io(&served, &["write -P 0x5a 0 1M"]);
    // The remote server dies: the next write fails that disk, not the
    // client's request.
    drop(r.server.take());
    qemu_io(
        &served,
        &[
            "write -P 0x5b 1M 1M",
            "read -P 0x5a 0 1M",
            "read -P 0x5b 1M 1M",
        ],
    );
    let st = status_of(&sb, &r.disks);
    assert_eq!(common::disk(&st, &r.uri)["state"], "failed", "{st:#}");
    assert_eq!(common::volume(&st, "data")["state"], "failed-redundancy");
    serving.stop();
    // With its server down (and its socket gone) the group opens without
    // it, as without a file that is absent.
    let st = status_of(&sb, &r.disks);
    assert!(
        st["unreadable"][0]["path"] == r.uri.as_str(),
        "the export is reported, not fatal: {st:#}"
    );
    assert_eq!(common::volume(&st, "data")["state"], "failed-redundancy");

    // Back: reactivated, resynced, and alone it holds the volume.
    let _back = QemuNbd::unix(&r.remote, &r.sock, &[]);
    let out = ok(mv_disks(&sb, &r.disks, &["reactivate", &r.uri]));
    assert!(out.contains("reactivated disk nbd+unix://"), "{out}");
    ok(mv_disks(&sb, &r.disks, &["status", "-x"]));
    let copy = sb.p("remote-only.bin");
    ok(mv_disks(&sb, &r.uri, &["copy", "vol:data", &copy]));
    let mut expect = std::mem::take(&mut r.want);
    expect[..1 << 20].fill(0x5a);
    expect[1 << 20..2 << 20].fill(0x5b);
    assert!(
        std::fs::read(&copy).unwrap() == expect,
        "the remote plex holds the volume"
    );
}

/// A remote server that hangs (SIGSTOP) is failed on the remote deadline
/// (5 s by default), not the local one (30 s): a client's write waits at
/// most two of them (its region's bit, then its data, as for a local disk
/// that hangs: measured 11.2 s here), and succeeds on the local plex.
#[test]
fn a_hung_export_is_failed_within_the_remote_deadline() {
    if !tools() || !have_tool("qemu-io") {
        return;
    }
    let sb = Sandbox::new();
    let r = remote_mirror(&sb);
    let (serving, served) = Serving::start(&sb, &r.disks, &[]);
    qemu_io(&served, &["write -P 0x11 0 1M"]);
    let pid = r.server.as_ref().unwrap().0.id() as i32;
    // SAFETY: kill(2) on our own child; it is continued below (and killed
    // when dropped).
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let start = Instant::now();
    qemu_io(&served, &["write -P 0x22 1M 1M", "read -P 0x22 1M 1M"]);
    let took = start.elapsed();
    eprintln!("the write with the export hung took {took:?}");
    let st = status_of(&sb, &r.disks);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        took < Duration::from_secs(16),
        "the write waited {took:?}: the remote deadline is 5 s (the local 30 s)"
    );
    assert_eq!(common::disk(&st, &r.uri)["state"], "failed", "{st:#}");
    assert_eq!(common::volume(&st, "data")["state"], "failed-redundancy");
    serving.stop();
}
