//! An NBD export as a disk (the backend of remote plexes): qemu-nbd serves
//! an image file over a Unix socket or TCP, and `NbdDisk` reads, writes,
//! flushes and zeroes it as a disk; what it wrote is in the file. An export
//! that is read-only or not there is refused; a server that went away fails
//! the request in flight, and a server back on the same address is used by
//! the next request.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::serve::{qemu_io, status_on, wait_status_on};
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
    assert!(e.to_string().contains("broke"), "{e}");
    assert!(d.health().is_err(), "the group sees the disk broken");
    // Reconnected only when asked, and only when what answers passes the
    // check (the group's: label, config, generation; here a byte).
    let first_byte = |disk: &dyn Disk| {
        let mut b = vec![0u8; 512];
        disk.read_at(&mut b, 0).map(|()| b[0])
    };
    let refuse = |disk: &dyn Disk| match first_byte(disk)? {
        0x77 => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not the disk that left",
        )),
        _ => Ok(()),
    };
    let e = d.reconnect(&refuse).unwrap().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    assert!(d.health().is_err(), "refused: still broken");
    assert!(d.read_at(&mut back, 0).is_err());
    // Accepted, it serves from the new connections.
    d.reconnect(&|disk| first_byte(disk).map(drop))
        .unwrap()
        .unwrap();
    assert!(d.health().is_ok());
    d.read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0x77));
    // Asked again, it drops the connections it has for new ones, checked:
    // refused, it is broken.
    assert_eq!(
        d.reconnect(&refuse).unwrap().unwrap_err().kind(),
        std::io::ErrorKind::InvalidData
    );
    assert!(d.health().is_err(), "never back on unchecked connections");
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
    sb.mv_on(&disks, &["init", &local, &uri, "--style", "raw"])
        .ok();
    sb.mv_on(&disks, &["create", "data", "--size", "16M", "--mirror"])
        .ok();
    let (src, want) = sb.data_file("in.bin", 16 << 20, 4);
    sb.mv_on(&disks, &["copy", &src, "vol:data"]).ok();
    Remote {
        server: Some(server),
        remote,
        sock,
        uri,
        disks,
        want,
    }
}

/// `serve` of the group on `SANDBOX/vol.sock`, its log in
/// `SANDBOX/serve.log`, stopped (SIGTERM, exit 0 checked) by `stop`, killed
/// when dropped.
struct Serving(std::process::Child, std::path::PathBuf);

impl Serving {
    fn start(sb: &Sandbox, disks: &str, extra: &[&str]) -> (Serving, String) {
        let vol = sb.path("vol.sock");
        let log = sb.path("serve.log");
        let child = Command::new(common::bin())
            .env("MIRRORVOL_DISKS", disks)
            .env("MIRRORVOL_RUN_DIR", sb.path("run"))
            .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
            .env("MIRRORVOL_LOG", "warn")
            .arg("serve")
            .args(extra)
            .arg("--listen")
            .arg(format!("unix:{}", vol.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let serving = Serving(child, log);
        let start = Instant::now();
        while !vol.exists() || sb.mv_on(disks, &["status"]).code != 0 {
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
        assert!(
            self.0.wait().unwrap().success(),
            "serve exits 0:\n{}",
            self.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }

    /// The resyncs of volume `data` onto `disk` it reported.
    fn resyncs_onto(&self, disk: &str) -> Vec<(u64, bool)> {
        common::resyncs_in_log(&self.log(), "data", disk)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let st = status_on(&sb, &r.disks);
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
    let st = status_on(&sb, &r.disks);
    assert_eq!(common::disk(&st, &r.uri)["state"], "failed", "{st:#}");
    assert_eq!(common::volume(&st, "data")["state"], "failed-redundancy");
    serving.stop();
    // With its server down (and its socket gone) the group opens without
    // it, as without a file that is absent.
    let st = status_on(&sb, &r.disks);
    assert!(
        st["unreadable"][0]["path"] == r.uri.as_str(),
        "the export is reported, not fatal: {st:#}"
    );
    assert_eq!(common::volume(&st, "data")["state"], "failed-redundancy");

    // Back: reactivated, resynced, and alone it holds the volume.
    let _back = QemuNbd::unix(&r.remote, &r.sock, &[]);
    let out = sb.mv_on(&r.disks, &["reactivate", &r.uri]).ok().stdout;
    assert!(out.contains("reactivated disk nbd+unix://"), "{out}");
    sb.mv_on(&r.disks, &["status", "-x"]).ok();
    let copy = sb.p("remote-only.bin");
    sb.mv_on(&r.uri, &["copy", "vol:data", &copy]).ok();
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
    let st = status_on(&sb, &r.disks);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        took < Duration::from_secs(9),
        "the write waited {took:?}: one remote deadline is 5 s (the local 30 s)"
    );
    assert_eq!(common::disk(&st, &r.uri)["state"], "failed", "{st:#}");
    assert_eq!(common::volume(&st, "data")["state"], "failed-redundancy");
    serving.stop();
}

/// The export's server killed under `serve` and started again: the disk is
/// failed with no error to the client, shown as a link lost, reconnected by
/// itself once the server is back, checked (label, config, generation),
/// reactivated, and only the regions the bitmaps name are copied onto it:
/// not the 16 MiB volume.
#[test]
fn a_remote_disk_whose_server_returns_is_taken_back_and_resynced_from_the_bitmaps() {
    if !tools() || !have_tool("qemu-io") {
        return;
    }
    let sb = Sandbox::new();
    let mut r = remote_mirror(&sb);
    let (serving, served) = Serving::start(&sb, &r.disks, &[]);
    qemu_io(&served, &["write -P 0x5a 0 1M"]);
    drop(r.server.take());
    qemu_io(&served, &["write -P 0x5b 8M 1M", "read -P 0x5b 8M 1M"]);
    let st = wait_status_on(&sb, &r.disks, 30, "the export is failed", |st| {
        common::disk(st, &r.uri)["state"] == "failed"
    });
    let link = common::disk(&st, &r.uri)["link"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(link.starts_with("lost "), "{link}");
    assert_eq!(common::disk(&st, "a.img")["link"], serde_json::Value::Null);
    // Written while it is away.
    qemu_io(&served, &["write -P 0x5c 12M 2M"]);

    let _back = QemuNbd::unix(&r.remote, &r.sock, &[]);
    let st = wait_status_on(&sb, &r.disks, 60, "the export is back in sync", |st| {
        common::volume(st, "data")["state"] == "healthy"
    });
    assert_eq!(common::disk(&st, &r.uri)["state"], "online", "{st:#}");
    assert_eq!(common::disk(&st, &r.uri)["link"], "connected", "{st:#}");
    let log = serving.log();
    assert!(
        log.contains("the remote disk answers again"),
        "the return is logged:\n{log}"
    );
    let resyncs = serving.resyncs_onto(&r.uri);
    assert_eq!(resyncs.len(), 1, "{log}");
    let (bytes, from_bitmaps) = resyncs[0];
    assert!(from_bitmaps, "{log}");
    // What was written while it was away (3 MiB), and at most the regions
    // written just before, whose bits were still set: not the volume.
    assert!(
        (3 << 20..=4 << 20).contains(&bytes),
        "{bytes} bytes resynced:\n{log}"
    );
    serving.stop();
    // Alone, the export holds the volume.
    let copy = sb.p("remote-only.bin");
    sb.mv_on(&r.uri, &["copy", "vol:data", &copy]).ok();
    let mut expect = std::mem::take(&mut r.want);
    expect[..1 << 20].fill(0x5a);
    expect[8 << 20..9 << 20].fill(0x5b);
    expect[12 << 20..14 << 20].fill(0x5c);
    assert!(
        std::fs::read(&copy).unwrap() == expect,
        "the remote plex holds the volume"
    );
}

/// The export swapped behind the same address (another image with the
/// same label: a copy taken before the writes) is not taken back: status
/// says why, and it stays failed.
#[test]
fn an_export_that_is_not_the_disk_that_left_is_not_taken_back() {
    if !tools() || !have_tool("qemu-io") {
        return;
    }
    let sb = Sandbox::new();
    let mut r = remote_mirror(&sb);
    let (serving, served) = Serving::start(&sb, &r.disks, &[]);
    let old = sb.path("old-copy.img");
    // A copy of the export as it is now; the writes below make it old.
    std::fs::copy(&r.remote, &old).unwrap();
    qemu_io(&served, &["write -P 0x5a 0 1M"]);
    drop(r.server.take());
    qemu_io(&served, &["write -P 0x5b 8M 1M"]);
    wait_status_on(&sb, &r.disks, 30, "the export is failed", |st| {
        common::disk(st, &r.uri)["state"] == "failed"
    });
    let _other = QemuNbd::unix(&old, &r.sock, &[]);
    let st = wait_status_on(&sb, &r.disks, 60, "the old copy is refused", |st| {
        common::disk(st, &r.uri)["link"]
            .as_str()
            .is_some_and(|l| l.contains("not taken back"))
    });
    let link = common::disk(&st, &r.uri)["link"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(link.contains("data generation"), "{link}");
    assert_eq!(common::disk(&st, &r.uri)["state"], "failed", "{st:#}");
    assert_eq!(common::volume(&st, "data")["state"], "failed-redundancy");
    let text = sb.mv_on(&r.disks, &["status"]).ok().stdout;
    assert!(
        text.contains(&format!("Link of {}: answers, but", r.uri)),
        "{text}"
    );
    serving.stop();
}

/// A fresh group whose export's server dies before anything was written
/// (the disk never held a data generation) takes it back too: it left
/// with none, and holds none.
#[test]
fn an_export_lost_before_the_first_write_is_taken_back() {
    if !tools() {
        return;
    }
    let sb = Sandbox::new();
    let local = sb.image("a.img", 64);
    let remote = image(&sb, 64);
    let sock = sb.path("nbd.sock");
    let server = QemuNbd::unix(&remote, &sock, &[]);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let disks = format!("{local},{uri}");
    sb.mv_on(&disks, &["init", &local, &uri, "--style", "raw"])
        .ok();
    sb.mv_on(&disks, &["create", "data", "--size", "8M", "--mirror"])
        .ok();
    let (serving, _) = Serving::start(&sb, &disks, &[]);
    drop(server);
    // The claim's renewal, once a second, meets the dead connection.
    wait_status_on(&sb, &disks, 30, "the export is failed", |st| {
        common::disk(st, &uri)["state"] == "failed"
    });
    let _back = QemuNbd::unix(&remote, &sock, &[]);
    let st = wait_status_on(&sb, &disks, 60, "the export is taken back", |st| {
        common::volume(st, "data")["state"] == "healthy"
    });
    assert_eq!(common::disk(&st, &uri)["link"], "connected", "{st:#}");
    assert_eq!(serving.resyncs_onto(&uri), [(0, true)], "{}", serving.log());
    serving.stop();
}

/// nbdkit on a Unix socket with `filters`, then `plugin` (the plugin, its
/// arguments and the filters' settings), logging every request to `log`;
/// killed when dropped.
struct Nbdkit(Child);

impl Nbdkit {
    fn start(
        sb: &Sandbox,
        filters: &[&str],
        plugin: &[String],
    ) -> (Nbdkit, String, std::path::PathBuf) {
        let sock = sb.path("kit.sock");
        let log = sb.path("kit.log");
        let pidfile = sb.path("kit.pid");
        // Left by one killed before.
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = Command::new("nbdkit");
        cmd.arg("-f").arg("-U").arg(&sock).arg("-P").arg(&pidfile);
        for f in filters.iter().chain(&["log"]) {
            cmd.arg(format!("--filter={f}"));
        }
        let child = cmd
            .args(plugin)
            .arg(format!("logfile={}", log.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(sb.path("kit.err")).unwrap())
            .spawn()
            .expect("nbdkit");
        let kit = Nbdkit(child);
        let start = Instant::now();
        while !pidfile.exists() {
            assert!(
                start.elapsed() < TIMEOUT,
                "nbdkit did not start: {}",
                std::fs::read_to_string(sb.path("kit.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (kit, format!("nbd+unix:///?socket={}", sock.display()), log)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The request lines of nbdkit's log of `kind` (Write, Flush, ...).
fn logged(log: &Path, kind: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!(" {kind} id=")))
        .map(String::from)
        .collect()
}

#[test]
fn many_requests_are_in_flight_on_one_connection_at_once() {
    if !have_tool("nbdkit") {
        return skip_or_fail("nbdkit is not installed");
    }
    let sb = Sandbox::new();
    // One connection (no multi-conn), every write 300 ms late: 16 writes
    // one after another would take 4.8 s.
    let (_kit, uri, log) = Nbdkit::start(
        &sb,
        &["multi-conn", "delay"],
        &strings(&[
            "memory",
            "64M",
            "multi-conn-mode=disable",
            "delay-write=300ms",
        ]),
    );
    let disk = NbdDisk::open(&uri, TIMEOUT).unwrap();
    assert_eq!(disk.max_connections(), 1);
    assert!(disk.structured(), "nbdkit offers structured replies");
    let started = Instant::now();
    std::thread::scope(|s| {
        for i in 0..16u64 {
            let disk = &disk;
            s.spawn(move || disk.write_at(&pattern(4096, i), i * 65536).unwrap());
        }
    });
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2400),
        "16 delayed writes took {took:?}"
    );
    for i in 0..16u64 {
        let mut buf = vec![0u8; 4096];
        disk.read_at(&mut buf, i * 65536).unwrap();
        assert_eq!(buf, pattern(4096, i), "write {i}");
    }
    // A read of a hole comes back as zeroes (a hole chunk, where offered).
    let mut buf = vec![1u8; 8192];
    disk.read_at(&mut buf, 32 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(logged(&log, "Write").len(), 16);
}

/// Through a disk queue with 2 workers, 64 writes (a FUA one among them),
/// then 64 reads and a flush, are all in flight on the export at once:
/// the workers send and go on, the answers complete them. A worker
/// waiting for each answer took 32 delays of 300 ms (9.6 s) for the
/// writes alone.
#[test]
fn a_disk_queue_keeps_more_requests_in_flight_on_an_export_than_it_has_workers() {
    use mirrorvol::disk::AlignedBuf;
    use mirrorvol::volume::queue::{DiskQueue, Op, read_data, wait};
    if !have_tool("nbdkit") {
        return skip_or_fail("nbdkit is not installed");
    }
    let sb = Sandbox::new();
    let (_kit, uri, log) = Nbdkit::start(
        &sb,
        &["multi-conn", "delay"],
        &strings(&[
            "memory",
            "64M",
            "multi-conn-mode=disable",
            "delay-write=300ms",
            "delay-read=300ms",
        ]),
    );
    let disk: Arc<dyn Disk> = Arc::new(NbdDisk::open(&uri, TIMEOUT).unwrap());
    let queue = DiskQueue::start(&uri, disk, 2, TIMEOUT);
    let started = Instant::now();
    let answers: Vec<_> = (0..64u64)
        .map(|i| {
            let (done, rx) = mirrorvol::volume::queue::channel();
            let mut data = AlignedBuf::recycled(4096);
            data.copy_from_slice(&pattern(4096, i));
            let op = Op::Write {
                offset: i * 65536,
                data: Arc::new(data),
                fua: i == 7,
            };
            queue.submit(op, true, done);
            rx
        })
        .collect();
    for (i, rx) in answers.into_iter().enumerate() {
        rx.recv()
            .unwrap()
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "64 delayed writes took {took:?}"
    );
    let started = Instant::now();
    let reads: Vec<_> = (0..64u64)
        .map(|i| {
            let (done, rx) = mirrorvol::volume::queue::channel();
            queue.submit(
                Op::Read {
                    offset: i * 65536,
                    len: 4096,
                },
                true,
                done,
            );
            rx
        })
        .collect();
    for (i, rx) in reads.into_iter().enumerate() {
        let got = read_data(rx.recv().unwrap()).unwrap();
        assert_eq!(&got[..], &pattern(4096, i as u64)[..], "read {i}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "64 delayed reads took {took:?}"
    );
    wait(|done| queue.submit(Op::Flush, true, done)).unwrap();
    // Each went out as one request; the FUA write with its flag.
    assert_eq!(logged(&log, "Write").len(), 64);
    assert_eq!(logged(&log, "Read").len(), 64);
    assert!(
        logged(&log, "Write")
            .iter()
            .filter(|l| l.contains("fua=1"))
            .count()
            == 1,
        "{:?}",
        logged(&log, "Write")
    );
    queue.close();
}

#[test]
fn metadata_written_then_flushed_goes_out_with_fua_where_the_export_takes_it() {
    if !have_tool("nbdkit") {
        return skip_or_fail("nbdkit is not installed");
    }
    let a = pattern(4096, 1);
    let b = pattern(512, 2);
    for fua in [true, false] {
        let sb = Sandbox::new();
        let plugin = if fua {
            strings(&["memory", "64M"])
        } else {
            // nbdkit's eval plugin over a file, saying it cannot do FUA.
            let img = image(&sb, 64);
            let f = img.display();
            vec![
                "eval".into(),
                "get_size=echo 67108864".into(),
                format!(
                    "pread=dd if={f} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"
                ),
                format!("pwrite=dd of={f} seek=$4 conv=notrunc oflag=seek_bytes status=none"),
                "can_write=exit 0".into(),
                "can_flush=exit 0".into(),
                "flush=exit 0".into(),
                "can_fua=echo none".into(),
            ]
        };
        let (_kit, uri, log) = Nbdkit::start(&sb, &[], &plugin);
        let disk = NbdDisk::open(&uri, TIMEOUT).unwrap();
        disk.write_all_then_flush(&[(8192, &a[..]), (65536, &b[..])], true)
            .unwrap();
        let writes = logged(&log, "Write");
        let flushes = logged(&log, "Flush");
        assert_eq!(writes.len(), 2, "{writes:?}");
        if fua {
            assert!(writes.iter().all(|w| w.contains("fua=1")), "{writes:?}");
            assert!(flushes.is_empty(), "no flush needed: {flushes:?}");
        } else {
            assert!(writes.iter().all(|w| w.contains("fua=0")), "{writes:?}");
            assert_eq!(flushes.len(), 1, "one flush after both writes");
        }
        let mut got = vec![0u8; 4096];
        disk.read_at(&mut got, 8192).unwrap();
        assert_eq!(got, a);
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// A partition: the host serving the mirror loses its remote plex and
/// goes on writing; meanwhile the remote host serves its own disk alone
/// (another host, its claim forced) and writes too. When the export
/// answers again, the return is refused as a split brain, and once serve
/// stops, status names both sides with what each changed.
#[test]
fn both_sides_of_a_partition_written_is_a_split_brain_with_what_each_changed() {
    if !tools() || !have_tool("qemu-io") {
        return;
    }
    let sb = Sandbox::new();
    let mut r = remote_mirror(&sb);
    // A short deadline: the other host waits for this one's claim to lapse
    // (the deadline and five renewals) before it takes the disk.
    let (serving, served) = Serving::start(&sb, &r.disks, &["--io-timeout", "3s"]);
    qemu_io(&served, &["write -P 0x5a 0 1M"]);
    drop(r.server.take());
    // This side writes 2 MiB with the remote disk away.
    qemu_io(&served, &["write -P 0x5b 4M 2M"]);
    wait_status_on(&sb, &r.disks, 30, "the export is failed", |st| {
        common::disk(st, &r.uri)["state"] == "failed"
    });

    // The other host serves its disk alone and writes 3 MiB.
    let remote = r.remote.display().to_string();
    let other_sock = sb.path("other.sock");
    let mut other = Command::new(common::bin())
        .env("MIRRORVOL_DISKS", &remote)
        .env("MIRRORVOL_RUN_DIR", sb.path("other-run"))
        .env("MIRRORVOL_HOST_ID_FILE", sb.path("other-host-id"))
        .env("MIRRORVOL_FORCE_CLAIM", "1")
        .args(["serve", "--listen"])
        .arg(format!("unix:{}", other_sock.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(sb.path("other.log")).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !other_sock.exists() {
        assert!(
            start.elapsed() < TIMEOUT,
            "the other host's serve did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    qemu_io(
        &format!("nbd+unix:///data?socket={}", other_sock.display()),
        &["write -P 0xb3 10M 3M"],
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(other.id() as i32, libc::SIGTERM) };
    assert!(
        other.wait().unwrap().success(),
        "{}",
        std::fs::read_to_string(sb.path("other.log")).unwrap()
    );

    // The link is back: the export answers, and is not taken back, on
    // its own or by an admin.
    let _back = QemuNbd::unix(&r.remote, &r.sock, &[]);
    let asked = sb.mv_on(&r.disks, &["reactivate", &r.uri]);
    assert_eq!(asked.code, 2, "{}{}", asked.stdout, asked.stderr);
    assert!(asked.stderr.contains("split brain"), "{}", asked.stderr);
    let st = wait_status_on(&sb, &r.disks, 60, "the return is refused", |st| {
        common::disk(st, &r.uri)["link"]
            .as_str()
            .is_some_and(|l| l.contains("split brain"))
    });
    assert_eq!(common::disk(&st, &r.uri)["state"], "failed", "{st:#}");
    serving.stop();
    assert!(
        common::resyncs_in_log(
            &std::fs::read_to_string(sb.path("serve.log")).unwrap(),
            "data",
            &r.uri
        )
        .is_empty(),
        "nothing was copied over either side"
    );

    let st = sb.mv_on(&r.disks, &["status", "--json"]);
    let st: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
    let sides = st["split_brain"]
        .as_array()
        .unwrap_or_else(|| panic!("no split brain in status: {st:#}"));
    assert_eq!(sides.len(), 2, "{st:#}");
    let changed = |disk: &str| -> u64 {
        let side = sides
            .iter()
            .find(|s| {
                s["disks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|d| d.as_str().unwrap().contains(disk))
            })
            .unwrap_or_else(|| panic!("no side holds {disk}: {st:#}"));
        side["volumes"][0]["bytes"].as_u64().unwrap()
    };
    // What each side wrote alone, and at most the 1 MiB written together
    // just before the cut, whose bits were still set.
    let (here, there) = (changed("a.img"), changed("disk?socket="));
    assert!(
        (2 << 20..=3 << 20).contains(&here),
        "this side changed {here} bytes: {st:#}"
    );
    assert!(
        (3 << 20..=4 << 20).contains(&there),
        "the other changed {there} bytes: {st:#}"
    );
    // Writes are refused until an admin keeps one side.
    let refused = sb.mv_on(&r.disks, &["create", "more", "--size", "1M"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("is split"), "{}", refused.stderr);
}

/// Bytes read from each disk under serve since it opened them (iostat).
fn read_bytes(sb: &Sandbox, disks: &str) -> std::collections::HashMap<String, f64> {
    let st: serde_json::Value =
        serde_json::from_str(sb.mv_on(disks, &["iostat", "--json"]).ok().stdout.trim()).unwrap();
    st["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["path"].as_str().unwrap().to_string(),
                d["read_bytes"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// md's write-mostly on the far disk: every write reaches it, no read goes
/// to it while the local plex is in sync; turned off under serve, reads
/// spread over both; with the local disk failed, it serves them alone.
#[test]
fn a_write_mostly_remote_disk_takes_writes_but_serves_reads_only_when_alone() {
    if !tools() || !have_tool("qemu-io") {
        return;
    }
    let sb = Sandbox::new();
    let r = remote_mirror(&sb);
    let set = sb.mv_on(&r.disks, &["set-disk", &r.uri, "--write-mostly", "on"]);
    assert!(set.ok().stdout.contains("is write-mostly"));
    let st = status_on(&sb, &r.disks);
    assert_eq!(common::disk(&st, &r.uri)["write_mostly"], true, "{st:#}");
    assert_eq!(common::disk(&st, "a.img")["write_mostly"], false);
    let text = sb.mv_on(&r.disks, &["status"]).ok().stdout;
    assert!(text.contains("Online (write-mostly)"), "{text}");
    // Refusals name what is wrong and change nothing.
    let none = sb.mv_on(&r.disks, &["set-disk", &r.uri]);
    assert_eq!(none.code, 2);
    assert!(none.stderr.contains("names no setting"), "{}", none.stderr);
    let unknown = sb.mv_on(
        &r.disks,
        &["set-disk", "/nonexistent.img", "--write-mostly", "on"],
    );
    assert_eq!(unknown.code, 2, "{}", unknown.stderr);

    let (serving, served) = Serving::start(&sb, &r.disks, &[]);
    let reads: Vec<String> = (0..16).map(|i| format!("read {}k 64k", i * 1024)).collect();
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    let before = read_bytes(&sb, &r.disks);
    qemu_io(&served, &["write -P 0x77 0 2M"]);
    qemu_io(&served, &reads);
    let after = read_bytes(&sb, &r.disks);
    let local = sb.path("disks/a.img").display().to_string();
    assert_eq!(
        after[&r.uri] - before[&r.uri],
        0.0,
        "no read went to the write-mostly disk"
    );
    assert!(
        after[&local] - before[&local] >= (1 << 20) as f64,
        "{after:?}"
    );

    // Off under serve: reads spread again.
    sb.mv_on(&r.disks, &["set-disk", &r.uri, "--write-mostly", "off"])
        .ok();
    let before = read_bytes(&sb, &r.disks);
    qemu_io(&served, &reads);
    let after = read_bytes(&sb, &r.disks);
    assert!(after[&r.uri] > before[&r.uri], "{before:?} {after:?}");

    // On again, and the local disk failed: the far one serves alone, with
    // what was written.
    sb.mv_on(&r.disks, &["set-disk", &r.uri, "--write-mostly", "on"])
        .ok();
    sb.mv_on(&r.disks, &["fail", &local]).ok();
    qemu_io(&served, &["read -P 0x77 0 2M"]);
    let history = sb.mv_on(&r.disks, &["history"]).ok().stdout;
    assert!(history.contains("set-disk"), "{history}");
    serving.stop();
}

/// serve stopped right after answering writes still behind (each 1 s on
/// its way to the far disk) lets them land before its last flush: the far
/// image alone holds them, and the next start finds no dirty region to
/// resync (the stop was clean).
#[test]
fn a_stop_lets_the_writes_behind_land_and_is_clean() {
    if !have_tool("nbdkit") || !have_tool("qemu-io") {
        return skip_or_fail("nbdkit or qemu-io is not installed");
    }
    let sb = Sandbox::new();
    let local = sb.image("a.img", 64);
    let far = image(&sb, 64);
    let f = far.display().to_string();
    let (kit, uri, _log) = Nbdkit::start(&sb, &[], &strings(&["file", &f]));
    let disks = format!("{local},{uri}");
    sb.mv_on(&disks, &["init", &local, &uri, "--style", "raw"])
        .ok();
    sb.mv_on(&disks, &["create", "data", "--size", "8M", "--mirror"])
        .ok();
    sb.mv_on(
        &disks,
        &[
            "set-disk",
            &uri,
            "--write-mostly",
            "on",
            "--write-behind",
            "16",
        ],
    )
    .ok();
    drop(kit);
    let (_kit, _, _) = Nbdkit::start(
        &sb,
        &["delay"],
        &strings(&["file", &f, "delay-write=1000ms"]),
    );
    let (serving, served) = Serving::start(&sb, &disks, &["--remote-io-timeout", "20s"]);
    // The first write raises the data generation on every disk, the far
    // one included (waited for).
    qemu_io(&served, &["write -P 0x5b 0 4k"]);
    let started = Instant::now();
    qemu_io(&served, &["write -P 0x5c 1M 64k", "write -P 0x5d 2M 64k"]);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "answered before the far disk has them ({:?})",
        started.elapsed()
    );
    serving.stop();
    let copy = sb.p("far-only.bin");
    sb.mv_on(&uri, &["copy", "vol:data", &copy]).ok();
    let got = std::fs::read(&copy).unwrap();
    assert!(got[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0x5c));
    assert!(got[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 0x5d));
    let (again, _) = Serving::start(&sb, &disks, &[]);
    let log = again.log();
    again.stop();
    assert!(!log.contains("unclean stop"), "{log}");
}

/// Waits (30 s at most) until the image at `path` holds `bytes` at a 4 KiB
/// boundary: a write behind reached it.
fn wait_for_bytes(path: &Path, bytes: &[u8]) {
    let waited = Instant::now();
    while !std::fs::read(path)
        .unwrap()
        .windows(bytes.len())
        .step_by(4096)
        .any(|w| w == bytes)
    {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the write behind never reached {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A client's flush is answered once the plexes that do not write behind
/// are flushed: the far disk's flush (3 s here: nbdkit's eval plugin over
/// a file, sleeping in its flush once told to) goes on behind, as its
/// writes do. With write-behind off, the same flush waits for it.
#[test]
fn a_clients_flush_does_not_wait_for_a_write_behind_disk() {
    if !have_tool("nbdkit") || !have_tool("qemu-io") {
        return skip_or_fail("nbdkit or qemu-io is not installed");
    }
    let sb = Sandbox::new();
    let local = sb.image("a.img", 64);
    let far = image(&sb, 64);
    let slow = sb.path("slow-flush");
    let f = far.display().to_string();
    let (_kit, uri, _log) = Nbdkit::start(
        &sb,
        &[],
        &strings(&[
            "eval",
            &format!("get_size=stat -L -c %s {f}"),
            &format!("pread=dd if={f} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"),
            &format!("pwrite=dd of={f} seek=$4 conv=notrunc oflag=seek_bytes status=none"),
            &format!(
                "flush=if [ -e {} ]; then sleep 3; fi; exit 0",
                slow.display()
            ),
            // FUA done by the write itself (the claim's and the bitmap's
            // writes), not by a flush.
            "can_fua=echo native",
        ]),
    );
    let disks = format!("{local},{uri}");
    sb.mv_on(&disks, &["init", &local, &uri, "--style", "raw"])
        .ok();
    sb.mv_on(&disks, &["create", "data", "--size", "8M", "--mirror"])
        .ok();
    sb.mv_on(
        &disks,
        &[
            "set-disk",
            &uri,
            "--write-mostly",
            "on",
            "--write-behind",
            "16",
        ],
    )
    .ok();
    // Flushes one after another on the far disk stay within its deadline.
    let (serving, served) = Serving::start(&sb, &disks, &["--remote-io-timeout", "20s"]);
    // The first write raises the data generation on every disk and sets
    // its bits; it lands on the far disk before the flushes turn slow (an
    // overlapping write would wait for it).
    qemu_io(&served, &["write -P 0x31 0 64k", "flush"]);
    wait_for_bytes(&far, &[0x31; 65536]);
    std::fs::write(&slow, b"").unwrap();
    let timed = |byte: u8| {
        let start = Instant::now();
        qemu_io(&served, &[&format!("write -P {byte} 0 4k"), "flush"]);
        start.elapsed()
    };
    let behind = timed(0x32);
    sb.mv_on(&disks, &["set-disk", &uri, "--write-behind", "0"])
        .ok();
    let waited = timed(0x33);
    eprintln!("write and flush: {behind:?} with write-behind, {waited:?} without");
    assert!(
        waited >= Duration::from_secs(3),
        "{waited:?}: the far disk's flush is slow: {}",
        std::fs::read_to_string(sb.path("serve.log")).unwrap()
    );
    assert!(
        behind < Duration::from_secs(2),
        "{behind:?}: the flush waited for the write-behind disk"
    );
    std::fs::remove_file(&slow).unwrap();
    serving.stop();
    // Both writes reached the far disk all the same.
    let copy = sb.p("far-only.bin");
    sb.mv_on(&uri, &["copy", "vol:data", &copy]).ok();
    let got = std::fs::read(&copy).unwrap();
    assert!(got[..4096].iter().all(|&b| b == 0x33));
    assert!(got[4096..65536].iter().all(|&b| b == 0x31));
}

/// md's write-behind on a far disk 20 ms away (nbdkit's delay filter):
/// writes are answered once the local plex has them, so 48 of them one
/// after another take a fraction of what they take when each waits for
/// the far disk; every one lands there all the same.
#[test]
fn write_behind_answers_before_a_slow_far_disk_and_every_write_lands_there() {
    if !have_tool("nbdkit") || !have_tool("qemu-io") {
        return skip_or_fail("nbdkit or qemu-io is not installed");
    }
    let sb = Sandbox::new();
    let local = sb.image("a.img", 64);
    let far = image(&sb, 64);
    let (_kit, uri, _log) = Nbdkit::start(
        &sb,
        &["delay"],
        &strings(&[
            "file",
            &far.display().to_string(),
            "delay-write=20ms",
            "delay-zero=20ms",
        ]),
    );
    let disks = format!("{local},{uri}");
    sb.mv_on(&disks, &["init", &local, &uri, "--style", "raw"])
        .ok();
    sb.mv_on(&disks, &["create", "data", "--size", "8M", "--mirror"])
        .ok();
    let set = sb.mv_on(
        &disks,
        &[
            "set-disk",
            &uri,
            "--write-mostly",
            "on",
            "--write-behind",
            "64",
        ],
    );
    assert!(set.ok().stdout.contains("up to 64 writes behind"));
    let st = status_on(&sb, &disks);
    assert_eq!(common::disk(&st, &uri)["write_behind"], 64, "{st:#}");
    // Write-behind without write-mostly is refused, and changes nothing.
    let alone = sb.mv_on(&disks, &["set-disk", &local, "--write-behind", "8"]);
    assert_eq!(alone.code, 2, "{}", alone.stderr);
    assert!(
        alone.stderr.contains("not write-mostly"),
        "{}",
        alone.stderr
    );

    let (serving, served) = Serving::start(&sb, &disks, &[]);
    // 48 writes of 4 KiB, one after another, none overlapping.
    let writes = |base: u64, byte: u8| -> Vec<String> {
        (0..48u64)
            .map(|i| format!("write -P {byte} {} 4k", base + i * 4096))
            .collect()
    };
    let timed = |cmds: &[String]| {
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        let start = Instant::now();
        qemu_io(&served, &cmds);
        start.elapsed()
    };
    let behind = timed(&writes(0, 0x41));
    sb.mv_on(&disks, &["set-disk", &uri, "--write-behind", "0"])
        .ok();
    let waited = timed(&writes(2 << 20, 0x42));
    eprintln!("48 writes: {behind:?} with write-behind, {waited:?} waiting for the far disk");
    assert!(
        waited >= Duration::from_millis(48 * 20),
        "{waited:?}: the far disk is slow"
    );
    assert!(
        behind * 3 < waited,
        "{behind:?} with write-behind, {waited:?} without"
    );
    serving.stop();

    // Every write reached the far disk: alone, it holds them all.
    let copy = sb.p("far-only.bin");
    sb.mv_on(&uri, &["copy", "vol:data", &copy]).ok();
    let got = std::fs::read(&copy).unwrap();
    assert!(got[..48 * 4096].iter().all(|&b| b == 0x41));
    assert!(
        got[2 << 20..(2 << 20) + 48 * 4096]
            .iter()
            .all(|&b| b == 0x42)
    );
}

/// A write that waits in the far server past the deadline fails the far
/// disk; the disk is not taken back (and nothing is resynced onto it)
/// before the server has done that write, so the resync's newer data is
/// not overwritten by it afterwards. The far server is nbdkit's eval
/// plugin over a file, taking 6 s for any write whose data starts with
/// 0x44.
#[test]
fn a_write_still_in_the_far_server_lands_before_the_disk_is_taken_back() {
    if !have_tool("nbdkit") || !have_tool("qemu-io") {
        return skip_or_fail("nbdkit or qemu-io is not installed");
    }
    let sb = Sandbox::new();
    let local = sb.image("a.img", 64);
    let far = image(&sb, 64);
    let f = far.display().to_string();
    let plugin = vec![
        "eval".to_string(),
        "thread_model=echo parallel".into(),
        "get_size=echo 67108864".into(),
        format!("pread=dd if={f} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"),
        format!(
            "pwrite=t=$(mktemp); cat > $t; if [ \"$(head -c1 $t | od -An -tx1 | tr -d ' ')\" = 44 ]; then sleep 6; fi; dd if=$t of={f} seek=$4 conv=notrunc oflag=seek_bytes status=none; rm -f $t"
        ),
        "can_write=exit 0".into(),
        "can_flush=exit 0".into(),
        "flush=exit 0".into(),
        "can_fua=echo emulate".into(),
    ];
    let (_kit, uri, _log) = Nbdkit::start(&sb, &[], &plugin);
    let disks = format!("{local},{uri}");
    sb.mv_on(&disks, &["init", &local, &uri, "--style", "raw"])
        .ok();
    sb.mv_on(&disks, &["create", "data", "--size", "8M", "--mirror"])
        .ok();
    let (serving, served) = Serving::start(&sb, &disks, &["--remote-io-timeout", "2s"]);
    // Answered from the local plex once the far one timed out.
    let slow = Instant::now();
    qemu_io(&served, &["write -P 0x44 0 64k"]);
    wait_status_on(&sb, &disks, 30, "the far disk is failed", |st| {
        common::disk(st, &uri)["state"] == "failed"
    });
    qemu_io(&served, &["write -P 0x66 0 64k"]);
    wait_status_on(&sb, &disks, 60, "the far disk is back in sync", |st| {
        common::volume(st, "data")["state"] == "healthy"
    });
    // Long enough for the slow write to have landed, whenever it did.
    std::thread::sleep(Duration::from_secs(8).saturating_sub(slow.elapsed()));
    serving.stop();
    let copy = sb.p("far-only.bin");
    sb.mv_on(&uri, &["copy", "vol:data", &copy]).ok();
    let got = std::fs::read(&copy).unwrap();
    assert!(
        got[..65536].iter().all(|&b| b == 0x66),
        "the far plex holds the newest write, not the late one: {:#x}",
        got[0]
    );
}

/// After an unclean stop, the dirty regions are copied from a plex that
/// is not write-behind, even when the write-behind one is listed first:
/// it may lack writes that were answered. The far disk is a file behind
/// nbdkit's delay filter (every write 3 s late); the host and the far
/// server are killed while a write is still on its way there.
#[test]
fn after_a_crash_a_write_behind_plex_is_not_the_source_of_the_resync() {
    if !have_tool("nbdkit") || !have_tool("qemu-io") {
        return skip_or_fail("nbdkit or qemu-io is not installed");
    }
    let sb = Sandbox::new();
    let remote = image(&sb, 64);
    let r = remote.display().to_string();
    let (kit, uri, _log) = Nbdkit::start(&sb, &[], &strings(&["file", &r]));
    let local = sb.image("a.img", 64);
    // The far disk first.
    let disks = format!("{uri},{local}");
    sb.mv_on(&disks, &["init", &uri, &local, "--style", "raw"])
        .ok();
    sb.mv_on(&disks, &["create", "data", "--size", "8M", "--mirror"])
        .ok();
    sb.mv_on(
        &disks,
        &[
            "set-disk",
            &uri,
            "--write-mostly",
            "on",
            "--write-behind",
            "16",
        ],
    )
    .ok();
    // From now on every write to the far disk is 3 s late.
    drop(kit);
    let (kit, _, _) = Nbdkit::start(
        &sb,
        &["delay"],
        &strings(&["file", &r, "delay-write=3000ms"]),
    );
    let (mut serving, served) = Serving::start(&sb, &disks, &["--remote-io-timeout", "20s"]);
    qemu_io(&served, &["write -P 0x11 0 64k"]);
    // Landed on the far disk too (after its write-intent bit there, each
    // 3 s late, which the answer did not wait for).
    wait_for_bytes(&remote, &[0x11; 65536]);
    let start = Instant::now();
    qemu_io(&served, &["write -P 0x22 0 64k"]);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "answered before the far disk has it (took {:?})",
        start.elapsed()
    );
    // The host crashes, and the far server with the write in hand.
    serving.0.kill().unwrap();
    serving.0.wait().unwrap();
    drop(kit);
    let (_back, uri2, _) = Nbdkit::start(&sb, &[], &strings(&["file", &r]));
    assert_eq!(uri2, uri);
    // serve again: the dirty regions are resynced first.
    let (serving, _) = Serving::start(&sb, &disks, &[]);
    serving.stop();
    let log = std::fs::read_to_string(sb.path("serve.log")).unwrap();
    assert!(log.contains("after an unclean stop"), "{log}");
    // Each plex alone holds it (the resync after the crash went from the
    // local plex to the far one).
    for (alone, name) in [(&uri, "far"), (&local, "local")] {
        let copy = sb.p(&format!("{name}.bin"));
        sb.mv_on(alone, &["copy", "vol:data", &copy]).ok();
        let got = std::fs::read(&copy).unwrap();
        assert!(
            got[..65536].iter().all(|&b| b == 0x22),
            "the answered write survives the crash on the {name} plex: {:#x}",
            got[0]
        );
    }
}

/// The export's server is down when `serve` starts (with --force-claim: one
/// disk of two is no majority): the group goes on without it, status says
/// it is not reached yet, and once the server is up the disk is opened,
/// checked, taken back and resynced from the bitmaps: only what was
/// written meanwhile.
#[test]
fn an_export_not_reached_when_serve_starts_is_taken_back_once_it_answers() {
    if !tools() || !have_tool("qemu-io") {
        return;
    }
    let sb = Sandbox::new();
    let mut r = remote_mirror(&sb);
    drop(r.server.take());
    let (serving, served) = Serving::start(&sb, &r.disks, &["--force-claim"]);
    let st = wait_status_on(&sb, &r.disks, 30, "the export is tried", |st| {
        common::disk(st, &r.uri)["link"]
            .as_str()
            .is_some_and(|l| l.contains("not reached since serve started"))
    });
    assert_eq!(common::volume(&st, "data")["state"], "failed-redundancy");
    qemu_io(&served, &["write -P 0x5a 4M 1M"]);

    let _back = QemuNbd::unix(&r.remote, &r.sock, &[]);
    let st = wait_status_on(&sb, &r.disks, 60, "the export is back in sync", |st| {
        common::volume(st, "data")["state"] == "healthy"
    });
    assert_eq!(common::disk(&st, &r.uri)["state"], "online", "{st:#}");
    assert_eq!(
        st["unreadable"].as_array().map_or(0, |u| u.len()),
        0,
        "{st:#}"
    );
    assert_eq!(
        serving.resyncs_onto(&r.uri),
        [(1 << 20, true)],
        "only the region written meanwhile:\n{}",
        serving.log()
    );
    serving.stop();
    let copy = sb.p("remote-only.bin");
    sb.mv_on(&r.uri, &["copy", "vol:data", &copy]).ok();
    let mut expect = std::mem::take(&mut r.want);
    expect[4 << 20..5 << 20].fill(0x5a);
    assert!(
        std::fs::read(&copy).unwrap() == expect,
        "the remote plex holds the volume"
    );
}

/// A remote disk lost under `serve`, which then restarts while the export
/// is still down: the config remembers that its link was lost, so the new
/// `serve` reconnects it too, and what both wrote meanwhile comes from the
/// bitmaps.
#[test]
fn a_remote_disk_lost_before_serve_restarts_is_reconnected_by_the_next_serve() {
    if !tools() || !have_tool("qemu-io") {
        return;
    }
    let sb = Sandbox::new();
    let mut r = remote_mirror(&sb);
    let (serving, served) = Serving::start(&sb, &r.disks, &[]);
    drop(r.server.take());
    qemu_io(&served, &["write -P 0x5b 8M 1M"]);
    wait_status_on(&sb, &r.disks, 30, "the export is failed", |st| {
        common::disk(st, &r.uri)["state"] == "failed"
    });
    serving.stop();

    let (serving, served) = Serving::start(&sb, &r.disks, &["--force-claim"]);
    let st = wait_status_on(&sb, &r.disks, 30, "the export is tried again", |st| {
        common::disk(st, &r.uri)["link"]
            .as_str()
            .is_some_and(|l| l.contains("reconnecting"))
    });
    assert_eq!(common::disk(&st, &r.uri)["state"], "failed", "{st:#}");
    qemu_io(&served, &["write -P 0x5c 12M 1M"]);
    let _back = QemuNbd::unix(&r.remote, &r.sock, &[]);
    wait_status_on(&sb, &r.disks, 60, "the export is back in sync", |st| {
        common::volume(st, "data")["state"] == "healthy"
    });
    let resyncs = serving.resyncs_onto(&r.uri);
    assert_eq!(resyncs.len(), 1, "{}", serving.log());
    let (bytes, from_bitmaps) = resyncs[0];
    assert!(from_bitmaps, "{}", serving.log());
    assert!(
        (2 << 20..=3 << 20).contains(&bytes),
        "{bytes} bytes resynced: the 2 MiB written while it was away, not the volume:\n{}",
        serving.log()
    );
    serving.stop();
    let copy = sb.p("remote-only.bin");
    sb.mv_on(&r.uri, &["copy", "vol:data", &copy]).ok();
    let mut expect = std::mem::take(&mut r.want);
    expect[8 << 20..9 << 20].fill(0x5b);
    expect[12 << 20..13 << 20].fill(0x5c);
    assert!(
        std::fs::read(&copy).unwrap() == expect,
        "the remote plex holds the volume"
    );
}

/// A hot spare leaves a remote disk being reconnected alone for
/// --remote-spare-delay: a server back within it keeps its plex (resynced
/// from the bitmaps, the spare unused), also when it is back after the
/// last attempt the backoff made before the delay ended (attempts 1, 3, 7
/// and 15 s after the loss: back at 9 s of 12, it is tried once more at
/// 12 s before the spare takes over; before, the spare took it); one that
/// stays away longer has its plex rebuilt onto the spare.
#[test]
fn a_hot_spare_waits_for_a_remote_disk_being_reconnected() {
    if !tools() || !have_tool("qemu-io") {
        return;
    }
    let sb = Sandbox::new();
    let mut r = remote_mirror(&sb);
    let spare = sb.image("s.img", 64);
    let disks = format!("{},{spare}", r.disks);
    sb.mv_on(&disks, &["init", &spare, "--style", "raw", "--spare"])
        .ok();
    let (serving, served) = Serving::start(&sb, &disks, &["--remote-spare-delay", "12"]);
    let spare_is_spare = |st: &serde_json::Value| common::disk(st, &spare)["spare"] == true;

    // Back within the delay, after the backoff's last attempt in it: the
    // spare stays a spare.
    drop(r.server.take());
    let lost = Instant::now();
    qemu_io(&served, &["write -P 0x5a 0 1M"]);
    let st = wait_status_on(&sb, &disks, 30, "the export is failed", |st| {
        common::disk(st, &r.uri)["state"] == "failed"
    });
    assert!(spare_is_spare(&st), "{st:#}");
    std::thread::sleep(Duration::from_secs(9).saturating_sub(lost.elapsed()));
    r.server = Some(QemuNbd::unix(&r.remote, &r.sock, &[]));
    let st = wait_status_on(&sb, &disks, 60, "the export is back in sync", |st| {
        common::volume(st, "data")["state"] == "healthy"
    });
    assert!(spare_is_spare(&st), "the spare was not used: {st:#}");

    // Away past the delay: the spare takes its plex.
    drop(r.server.take());
    qemu_io(&served, &["write -P 0x5b 1M 1M"]);
    let lost = Instant::now();
    wait_status_on(&sb, &disks, 30, "the export is failed", |st| {
        common::disk(st, &r.uri)["state"] == "failed"
    });
    let st = wait_status_on(&sb, &disks, 60, "the spare takes the plex", |st| {
        common::volume(st, "data")["state"] == "healthy"
    });
    let took = lost.elapsed();
    assert!(
        took >= Duration::from_secs(12),
        "the spare waited the delay, took over after {took:?}"
    );
    assert!(!spare_is_spare(&st), "{st:#}");
    let plexes = common::volume(&st, "data")["plexes"].to_string();
    assert!(
        plexes.contains("s.img") && !plexes.contains(&r.uri),
        "{plexes}"
    );
    serving.stop();
}

/// A plex on an export that qemu-nbd serves only over TLS, with client
/// certificates (verify-peer): named `nbds+unix://…&tls-certificates=DIR`,
/// it takes the mirror's writes, comes back over TLS after its server is
/// killed and started again, and holds the volume alone. The same export
/// named without TLS, or with certificates from another CA, is not read.
#[test]
fn an_export_served_over_tls_is_a_disk_with_nbds() {
    if !tools() || !have_tool("qemu-io") || !have_tool("openssl") || !have_tool("nbdcopy") {
        return;
    }
    let sb = Sandbox::new();
    let certs = sb.path("tls");
    common::tls::certificates(&certs);
    let other = sb.path("other-ca");
    common::tls::ca_with_client(&other, "another-ca");
    let local = sb.image("a.img", 64);
    let remote = image(&sb, 64);
    let sock = sb.path("nbd.sock");
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=on",
        certs.display()
    );
    let tls_args = ["--object", &creds, "--tls-creds", "tls0"];
    let mut server = Some(QemuNbd::unix(&remote, &sock, &tls_args));
    let uri = format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        sock.display(),
        certs.display()
    );
    let disks = format!("{local},{uri}");
    sb.mv_on(&disks, &["init", &local, &uri, "--style", "raw"])
        .ok();
    sb.mv_on(&disks, &["create", "data", "--size", "16M", "--mirror"])
        .ok();
    let (serving, served) = Serving::start(&sb, &disks, &[]);
    qemu_io(&served, &["write -P 0x5a 0 1M"]);
    // Killed and back: reconnected over TLS.
    drop(server.take());
    qemu_io(&served, &["write -P 0x5b 4M 1M"]);
    wait_status_on(&sb, &disks, 30, "the export is failed", |st| {
        common::disk(st, &uri)["state"] == "failed"
    });
    server = Some(QemuNbd::unix(&remote, &sock, &tls_args));
    wait_status_on(&sb, &disks, 60, "the export is back in sync", |st| {
        common::volume(st, "data")["state"] == "healthy"
    });
    assert_eq!(serving.resyncs_onto(&uri).len(), 1, "{}", serving.log());
    // Reads from the remote plex only (the local one write-mostly), many
    // large ones at once: TLS records arrive faster than they are read.
    sb.mv_on(&disks, &["set-disk", &local, "--write-mostly", "on"])
        .ok();
    let through = sb.p("through.bin");
    let out = Command::new("nbdcopy")
        .args(["--requests=64", "--request-size=65536", &served, &through])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = status_on(&sb, &disks);
    assert_eq!(common::disk(&st, &uri)["state"], "online", "{st:#}");
    serving.stop();
    let mut want = vec![0u8; 16 << 20];
    want[..1 << 20].fill(0x5a);
    want[4 << 20..5 << 20].fill(0x5b);
    assert!(std::fs::read(&through).unwrap() == want, "read over TLS");

    let copy = sb.p("remote-only.bin");
    sb.mv_on(&uri, &["copy", "vol:data", &copy]).ok();
    assert!(
        std::fs::read(&copy).unwrap() == want,
        "the remote plex, read over TLS, holds the volume"
    );

    // Without TLS, and with another CA: the export is not read.
    let plain = format!("nbd+unix:///disk?socket={}", sock.display());
    let r = sb.mv_on(&plain, &["status"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stderr.contains("the server requires TLS"), "{}", r.stderr);
    let wrong = format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        sock.display(),
        other.display()
    );
    let r = sb.mv_on(&wrong, &["status"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stderr.contains("TLS"), "{}", r.stderr);
    drop(server);
}

/// A remote disk slower than its deadline (every write 1.5 s late through
/// nbdkit's delay filter, the deadline 1 s): `serve` starts without it
/// (its bitmap's first write times out: the disk is failed, not the
/// group), and it answers the checks of its return and is lost again at
/// its first writes: each time in a row it
/// waits four times longer before the next attempt (4 s, 16 s, ...), so
/// it is not reconnected and resynced every few seconds, and status says
/// it flaps.
#[test]
fn a_remote_disk_lost_again_soon_after_each_return_is_tried_less_and_less_often() {
    if !have_tool("nbdkit") || !have_tool("qemu-io") {
        return skip_or_fail("nbdkit or qemu-io is not installed");
    }
    let sb = Sandbox::new();
    let local = sb.image("a.img", 64);
    let far = image(&sb, 64);
    let file = far.display().to_string();
    let (kit, uri, _log) = Nbdkit::start(&sb, &[], &strings(&["file", &file]));
    let disks = format!("{local},{uri}");
    sb.mv_on(&disks, &["init", &local, &uri, "--style", "raw"])
        .ok();
    sb.mv_on(&disks, &["create", "data", "--size", "8M", "--mirror"])
        .ok();
    drop(kit);
    let (_kit, _, _) = Nbdkit::start(
        &sb,
        &["delay"],
        &strings(&["file", &file, "delay-write=1500ms", "delay-zero=1500ms"]),
    );
    let (serving, served) =
        Serving::start(&sb, &disks, &["--force-claim", "--remote-io-timeout", "1s"]);
    let start = Instant::now();
    // A client writing twice a second all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                qemu_io(
                    &served,
                    &[&format!(
                        "write -P 0x{:x} {}K 4K",
                        i % 255 + 1,
                        i % 2048 * 4
                    )],
                );
                i += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let st = wait_status_on(&sb, &disks, 40, "the disk flaps", |st| {
        common::disk(st, &uri)["link"]
            .as_str()
            .is_some_and(|l| l.contains("in a row soon after it came back"))
    });
    let link = common::disk(&st, &uri)["link"]
        .as_str()
        .unwrap()
        .to_string();
    // Watched for 14 s from the start: lost at once, back after 1 s, lost
    // at its first writes, back 4 s later, lost again, next try 16 s on.
    // Without the growing wait it would come back every 2-3 s.
    std::thread::sleep(Duration::from_secs(14).saturating_sub(start.elapsed()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let log = serving.log();
    let returns = log.matches("the remote disk answers again").count();
    eprintln!("{returns} returns in 14 s; status: {link}");
    assert!(
        (1..=3).contains(&returns),
        "{returns} returns in 14 s:\n{log}"
    );
    assert!(
        log.contains("the remote disk was lost again soon after it came back"),
        "{log}"
    );
    serving.stop();
}

/// One export named by two URIs (its socket and a link to it): the same
/// disk UUID answers twice, which mirrorvol cannot tell from a copy of the
/// disk: refused, both named, the case said, nothing written.
#[test]
fn one_export_named_twice_is_refused_naming_both() {
    if !tools() {
        return;
    }
    let sb = Sandbox::new();
    let mut r = remote_mirror(&sb);
    // Both names connected at once (qemu-nbd takes one client unless
    // told more; each disk opens up to four).
    drop(r.server.take());
    let _server = QemuNbd::unix(&r.remote, &r.sock, &["--shared=16"]);
    let link = sb.path("link.sock");
    std::os::unix::fs::symlink(&r.sock, &link).unwrap();
    let again = format!("nbd+unix:///disk?socket={}", link.display());
    let before = std::fs::read(&r.remote).unwrap();
    let out = sb.mv_on(&format!("{},{again}", r.disks), &["status"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains(&r.uri)
            && out.stderr.contains(&again)
            && out.stderr.contains("both name the same export"),
        "{}",
        out.stderr
    );
    assert!(
        std::fs::read(&r.remote).unwrap() == before,
        "nothing written"
    );
}

/// `fail` of a remote disk whose link was lost, given while no `serve`
/// runs, is kept: the next `serve` does not reconnect it, even with its
/// server back.
#[test]
fn an_offline_fail_of_a_disk_whose_link_was_lost_stops_its_reconnection() {
    if !tools() || !have_tool("qemu-io") {
        return;
    }
    let sb = Sandbox::new();
    let mut r = remote_mirror(&sb);
    let (serving, served) = Serving::start(&sb, &r.disks, &[]);
    drop(r.server.take());
    qemu_io(&served, &["write -P 0x5b 8M 1M"]);
    wait_status_on(&sb, &r.disks, 30, "the export is failed", |st| {
        common::disk(st, &r.uri)["state"] == "failed"
    });
    serving.stop();
    let out = sb.mv_on(&r.disks, &["fail", &r.uri]).ok().stdout;
    assert!(out.contains("no longer reconnected"), "{out}");
    let _back = QemuNbd::unix(&r.remote, &r.sock, &[]);
    let (serving, _) = Serving::start(&sb, &r.disks, &["--force-claim"]);
    std::thread::sleep(Duration::from_secs(3));
    let st = status_on(&sb, &r.disks);
    assert_eq!(common::disk(&st, &r.uri)["state"], "failed", "{st:#}");
    assert!(
        !serving.log().contains("the remote disk answers again"),
        "{}",
        serving.log()
    );
    serving.stop();
}

/// A disk's own deadline (`set-disk --timeout`) holds in place of the
/// group's: a far disk whose writes take 1.5 s (nbdkit's delay filter)
/// stays in service under `--remote-io-timeout 1s` once given 4 s, and
/// takes the writes; status shows the deadline.
#[test]
fn a_disk_with_a_deadline_of_its_own_is_waited_for_that_long() {
    if !have_tool("nbdkit") || !have_tool("qemu-io") {
        return skip_or_fail("nbdkit or qemu-io is not installed");
    }
    let sb = Sandbox::new();
    let local = sb.image("a.img", 64);
    let far = image(&sb, 64);
    let file = far.display().to_string();
    let (kit, uri, _log) = Nbdkit::start(&sb, &[], &strings(&["file", &file]));
    let disks = format!("{local},{uri}");
    sb.mv_on(&disks, &["init", &local, &uri, "--style", "raw"])
        .ok();
    sb.mv_on(&disks, &["create", "data", "--size", "8M", "--mirror"])
        .ok();
    let out = sb
        .mv_on(&disks, &["set-disk", &uri, "--timeout", "4s"])
        .ok()
        .stdout;
    assert!(out.contains("has a deadline of 4 s"), "{out}");
    let r = sb.mv_on(&disks, &["set-disk", &uri, "--timeout", "10ms"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("too short"), "{}", r.stderr);
    drop(kit);
    let (_kit, _, _) = Nbdkit::start(
        &sb,
        &["delay"],
        &strings(&["file", &file, "delay-write=1500ms", "delay-zero=1500ms"]),
    );
    let (serving, served) = Serving::start(&sb, &disks, &["--remote-io-timeout", "1s"]);
    qemu_io(&served, &["write -P 0x5a 0 64K", "write -P 0x5b 1M 64K"]);
    let st = status_on(&sb, &disks);
    let d = common::disk(&st, &uri);
    assert_eq!(d["state"], "online", "{st:#}");
    assert_eq!(d["timeout_ms"], 4000, "{st:#}");
    assert_eq!(common::volume(&st, "data")["state"], "healthy", "{st:#}");
    let text = sb.mv_on(&disks, &["status"]).ok().stdout;
    assert!(text.contains("(deadline 4 s)"), "{text}");
    // Back to the group's: 1 s, which its writes outlast.
    let out = sb
        .mv_on(&disks, &["set-disk", &uri, "--timeout", "0"])
        .ok()
        .stdout;
    assert!(out.contains("the group's deadline again (1 s)"), "{out}");
    qemu_io(&served, &["write -P 0x5c 2M 64K"]);
    wait_status_on(&sb, &disks, 30, "the slow disk is failed", |st| {
        common::disk(st, &uri)["state"] == "failed"
    });
    serving.stop();
}

/// An export asked where its holes are (NBD_CMD_BLOCK_STATUS,
/// `base:allocation`): qemu-nbd over a sparse file says hole (reads as
/// zeroes) up to the first MiB written, data over it, hole after.
#[test]
fn an_export_says_where_its_holes_are() {
    if !tools() {
        return;
    }
    let sb = Sandbox::new();
    let file = image(&sb, 16);
    let sock = sb.path("nbd.sock");
    let _server = QemuNbd::unix(&file, &sock, &[]);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let d = NbdDisk::open(&uri, TIMEOUT).unwrap();
    assert_eq!(d.extent_at(0, 16 << 20).unwrap(), (false, 16 << 20));
    d.write_at(&pattern(1 << 20, 5), 4 << 20).unwrap();
    d.flush().unwrap();
    assert_eq!(d.extent_at(0, 16 << 20).unwrap(), (false, 4 << 20));
    assert_eq!(d.extent_at(4 << 20, 12 << 20).unwrap(), (true, 1 << 20));
    assert_eq!(d.extent_at(5 << 20, 11 << 20).unwrap(), (false, 11 << 20));
    // Asked for less than the extent: that much.
    assert_eq!(d.extent_at(4 << 20, 4096).unwrap(), (true, 4096));
}

/// The bytes read from the data area of an export (from `from` on), as
/// nbdkit's log of it says.
fn read_from(log: &Path, from: u64) -> u64 {
    let hex = |l: &str, key: &str| {
        let at = l.find(key).unwrap() + key.len();
        let end = l[at..].find(' ').map_or(l.len(), |e| at + e);
        u64::from_str_radix(l[at..end].trim_start_matches("0x"), 16).unwrap()
    };
    logged(log, "Read")
        .iter()
        .filter(|l| hex(l, "offset=") >= from)
        .map(|l| hex(l, "count="))
        .sum()
}

/// A resync whose only source is an NBD export asks it where its holes
/// are and reads only its data: repairing a 40 MiB mirror that holds 4 MiB
/// onto a new local disk reads those 4 MiB from the export's data area,
/// not 40 (before: 40), and the new copy alone holds the volume.
#[test]
fn a_resync_from_an_export_reads_only_where_it_holds_data() {
    if !have_tool("nbdkit") {
        return skip_or_fail("nbdkit is not installed");
    }
    let sb = Sandbox::new();
    let local = sb.image("a.img", 64);
    let spare = sb.image("c.img", 64);
    let remote = image(&sb, 64);
    let (_kit, uri, log) = Nbdkit::start(
        &sb,
        &[],
        &["file".to_string(), remote.display().to_string()],
    );
    let disks = format!("{local},{uri},{spare}");
    sb.mv_on(&disks, &["init", &local, &uri, &spare, "--style", "raw"])
        .ok();
    sb.mv_on(
        &disks,
        &[
            "create", "data", "--size", "40M", "--mirror", "--disk", &local, "--disk", &uri,
        ],
    )
    .ok();
    let (src, want) = sb.data_file("in.bin", 4 << 20, 6);
    sb.mv_on(&disks, &["copy", &src, "vol:data"]).ok();
    sb.mv_on(&disks, &["fail", &local]).ok();
    // The plex's data area starts after the metadata, at 8 MiB.
    let before = read_from(&log, 8 << 20);
    let out = sb.mv_on(&disks, &["repair", "data"]).ok().stdout;
    assert!(out.contains("c.img"), "{out}");
    let read = read_from(&log, 8 << 20) - before;
    assert!(
        (4 << 20..=8 << 20).contains(&read),
        "read {read} bytes of the export's data area for 4 MiB written"
    );
    assert!(
        !logged(&log, "Extents").is_empty(),
        "block status was asked"
    );
    let copy = sb.p("c-only.bin");
    sb.mv_on(&spare, &["copy", "vol:data", &copy]).ok();
    let got = std::fs::read(&copy).unwrap();
    assert_eq!(got.len(), 40 << 20);
    assert!(got[..4 << 20] == want[..], "the data, from the export");
    assert!(got[4 << 20..].iter().all(|&b| b == 0), "zeroes after it");
}

/// A client's read or block status never waits on a far export: a read
/// long enough to be checked for holes (1 MiB), over data or over a hole,
/// sends the export no block status (it counts as data there; only a
/// resync asks it), and reads the right bytes.
#[test]
fn a_clients_read_sends_the_far_export_no_block_status() {
    if !have_tool("nbdkit") || !have_tool("qemu-io") {
        return skip_or_fail("nbdkit or qemu-io is not installed");
    }
    let sb = Sandbox::new();
    let local = sb.image("a.img", 64);
    let remote = image(&sb, 64);
    let (_kit, uri, log) = Nbdkit::start(
        &sb,
        &[],
        &["file".to_string(), remote.display().to_string()],
    );
    let disks = format!("{local},{uri}");
    sb.mv_on(&disks, &["init", &local, &uri, "--style", "raw"])
        .ok();
    sb.mv_on(&disks, &["create", "data", "--size", "16M", "--mirror"])
        .ok();
    let (serving, served) = Serving::start(&sb, &disks, &[]);
    qemu_io(&served, &["write -P 0x3c 0 2M"]);
    qemu_io(
        &served,
        &["read -P 0x3c 0 1M", "read -P 0x3c 1M 1M", "read -P 0 8M 1M"],
    );
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts"])
        .arg(format!(
            "driver=nbd,path={},export=data",
            sb.path("vol.sock").display()
        ))
        .output()
        .unwrap();
    assert!(
        map.status.success(),
        "{}",
        String::from_utf8_lossy(&map.stderr)
    );
    assert_eq!(
        logged(&log, "Extents"),
        Vec::<String>::new(),
        "no block status went to the far export"
    );
    serving.stop();
}
