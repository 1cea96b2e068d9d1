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
fn a_server_that_went_away_fails_requests_and_one_back_serves_the_next() {
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
    drop(server);
    let start = Instant::now();
    let mut back = vec![0u8; data.len()];
    assert!(d.read_at(&mut back, 0).is_err(), "the server is gone");
    assert!(
        start.elapsed() < TIMEOUT,
        "failed at once, not at the deadline"
    );
    let _again = QemuNbd::unix(&file, &sock, &[]);
    d.read_at(&mut back, 0).unwrap();
    assert_eq!(back, data, "a new connection to the server back");
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
