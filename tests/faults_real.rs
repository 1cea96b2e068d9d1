//! mirrorvol against real faulty disks, end to end: each faulty disk (the
//! rig of `common::faulty`) is an nbdkit server (a RAM disk behind the `error`, `pause` and `delay`
//! filters) exposed as a regular file through `nbdfuse`, and used as a raw
//! disk image of the group. Errors are switched on and off per operation by
//! trigger files, hangs by the pause filter's control socket. Disks that fill
//! up sit on a small tmpfs; others are truncated or deleted while served.
//!
//! Every command runs with `--io-timeout 2` (a global option): a disk request
//! that takes longer fails that disk, so no command and no client request
//! waits for a hung disk to come back.
//!
//! Needs root, /dev/fuse, nbdkit (with nbdkit-plugin-dev and a C compiler for
//! the small RAM-disk plugin whose flushes can fail: the error filter has no
//! flush trigger), nbdfuse, qemu-io and fio; otherwise each test skips loudly
//! (fails under MIRRORVOL_E2E=require).

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::faulty::{RealFaultyDisk, faulty_disk, mounted, rig_available, unmount};
use common::serve::{Served, fio_verify_command};
use common::{MIB, Sandbox, bin, disk, pattern, plex_read, volume};
use mirrorvol::volume::queue::IoEngine;

// ---- the deadline ----

/// The hang deadline every command and `serve` gets (`--io-timeout`).
const IO_TIMEOUT_SECS: u64 = 2;

/// `--io-timeout 2`, put before the subcommand (a global option).
const IO_TIMEOUT: [&str; 2] = ["--io-timeout", "2"];

/// How long a command may take when a disk hangs or fails: the deadline
/// three times over, plus slack for a loaded machine.
fn limit() -> Duration {
    Duration::from_secs(3 * IO_TIMEOUT_SECS + 10)
}

/// The longest a client request may take when a disk hangs under it: the
/// watchdog fails the disk after the deadline, the request completes on the
/// other plex.
fn request_limit() -> Duration {
    Duration::from_secs(2 * IO_TIMEOUT_SECS + 4)
}

// ---- a tmpfs that fills up ----

/// A small tmpfs mounted on a directory of its own; image files on it are
/// bind-mounted into the sandbox's disks directory, where the group finds
/// them. Dropping it unmounts everything it mounted.
struct SmallTmpfs {
    dir: tempfile::TempDir,
    binds: Vec<PathBuf>,
    mounted: bool,
}

impl SmallTmpfs {
    fn mount(mib: u64) -> SmallTmpfs {
        let dir = tempfile::Builder::new()
            .prefix("mirrorvol-tmpfs-")
            .tempdir()
            .unwrap();
        common::serve::ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}M"), "tmpfs"])
                .arg(dir.path()),
        );
        SmallTmpfs {
            dir,
            binds: Vec::new(),
            mounted: true,
        }
    }

    /// A sparse image of `mib` MiB (larger than the tmpfs, so that it fills
    /// up) on the tmpfs, bind-mounted at `at`.
    fn image_at(&mut self, name: &str, mib: u64, at: &Path) {
        let src = self.dir.path().join(name);
        fs::File::create(&src).unwrap().set_len(mib * MIB).unwrap();
        fs::create_dir_all(at.parent().unwrap()).unwrap();
        fs::File::create(at).unwrap();
        common::serve::ok(Command::new("mount").arg("--bind").arg(&src).arg(at));
        self.binds.push(at.to_path_buf());
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        for b in self.binds.drain(..).rev() {
            unmount(&b);
        }
        if self.mounted {
            unmount(self.dir.path());
        }
    }
}

// ---- running mirrorvol with a deadline ----

/// What one bounded run of the binary did.
struct Timed {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `mirrorvol --io-timeout 2 ARGS` (with the sandbox's disks and run
/// directory) and fails the test if it has not returned within [`limit`]:
/// a hung disk must never hang a command.
#[track_caller]
fn mvt(sb: &Sandbox, args: &[&str]) -> Timed {
    let mut full: Vec<&str> = IO_TIMEOUT.to_vec();
    full.extend(args);
    let child = Command::new(bin())
        .env("MIRRORVOL_DISKS", sb.disks_dir())
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .args(&full)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mirrorvol");
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit()) {
        Ok(o) => {
            let o = o.expect("wait for mirrorvol");
            Timed {
                code: o.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
                took: start.elapsed(),
            }
        }
        Err(_) => {
            // SAFETY: kill takes integers; the pid is our own child's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!(
                "mirrorvol {} did not return within {:?} (io timeout {IO_TIMEOUT_SECS} s): a hung disk hung the command",
                full.join(" "),
                limit()
            );
        }
    }
}

/// [`mvt`] that must succeed; returns stdout.
#[track_caller]
fn mvt_ok(sb: &Sandbox, args: &[&str]) -> String {
    let r = mvt(sb, args);
    assert_eq!(
        r.code, 0,
        "mirrorvol {args:?} failed after {:?}:\nstdout:\n{}\nstderr:\n{}",
        r.took, r.stdout, r.stderr
    );
    r.stdout
}

/// `status --json` within the deadline, parsed.
#[track_caller]
fn status_t(sb: &Sandbox) -> serde_json::Value {
    let out = mvt_ok(sb, &["status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is JSON ({e}):\n{out}"))
}

/// Polls `status --json` until `pred` holds, for at most `secs` seconds.
#[track_caller]
fn wait_status(
    sb: &Sandbox,
    secs: u64,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    common::serve::poll_status(
        secs,
        Duration::from_millis(200),
        what,
        || status_t(sb),
        pred,
        String::new,
    )
}

/// `serve` with `--io-timeout 2`, the page cache off (O_DIRECT, the
/// default), brisk resyncs, and the control socket in the sandbox.
fn serve(sb: &Sandbox) -> Served {
    serve_with(sb, &[])
}

/// [`serve`] with `extra` arguments.
fn serve_with(sb: &Sandbox, extra: &[&str]) -> Served {
    let ctl = sb.p("ctl.sock");
    let mut args = vec!["--control", &ctl, "--resync-min-rate", "200M"];
    args.extend_from_slice(extra);
    Served::start_with(sb, &IO_TIMEOUT, &args, &[])
}

/// A disk's state in a status report.
fn disk_state(st: &serde_json::Value, file: &str) -> String {
    disk(st, file)["state"].as_str().unwrap_or("").to_string()
}

fn vol_state(st: &serde_json::Value, name: &str) -> String {
    volume(st, name)["state"].as_str().unwrap_or("").to_string()
}

fn out_of_service(state: &str) -> bool {
    state == "failed" || state == "missing"
}

/// The disks of a volume's plexes (file names) with their states.
fn plexes(st: &serde_json::Value, name: &str) -> Vec<(String, String)> {
    volume(st, name)["plexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let d = p["disk"].as_str().unwrap_or("");
            (
                d.rsplit('/').next().unwrap().to_string(),
                p["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

// ---- clients ----

/// `qemu-io -f raw URI -c CMD...` that must succeed within [`limit`];
/// returns stdout.
#[track_caller]
fn qemu_io_t(uri: &str, cmds: &[&str]) -> String {
    let (code, out, err, took) = qemu_io_run(uri, cmds);
    assert!(
        code == 0 && !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {cmds:?} on {uri} failed (exit {code}, {took:?}):\n{out}\n{err}"
    );
    out
}

/// `qemu-io` bounded by [`limit`]: (exit code, stdout, stderr, time taken).
#[track_caller]
fn qemu_io_run(uri: &str, cmds: &[&str]) -> (i32, String, String, Duration) {
    bounded(
        Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .args(cmds.iter().flat_map(|c| ["-c", c])),
    )
}

/// Runs a client tool, failing the test if it has not finished within
/// [`limit`]: (exit code, stdout, stderr, time taken).
#[track_caller]
fn bounded(cmd: &mut Command) -> (i32, String, String, Duration) {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit()) {
        Ok(o) => {
            let o = o.unwrap();
            (
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
                start.elapsed(),
            )
        }
        Err(_) => {
            // SAFETY: kill takes integers; the pid is our own child's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!(
                "{what} did not complete within {:?}: a client request hung",
                limit()
            );
        }
    }
}

/// The whole of an export, read with `qemu-img convert` within [`limit`].
#[track_caller]
fn read_export(sb: &Sandbox, uri: &str) -> Vec<u8> {
    let out = sb.path("export.raw");
    let _ = fs::remove_file(&out);
    let (code, o, e, took) = bounded(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", uri])
            .arg(&out),
    );
    assert_eq!(code, 0, "reading {uri} failed after {took:?}:\n{o}\n{e}");
    fs::read(&out).unwrap()
}

/// fio writing `mib` MiB of a volume over NBD at random (4 KiB blocks,
/// `iodepth` deep, at most `iops` a second) with crc32c verification, its
/// report as JSON; `extra` adds options (`--fsync=N` to send flushes).
fn fio_start(uri: &str, mib: u32, iodepth: u32, iops: u32, extra: &[&str]) -> Child {
    fio_verify_command(uri, mib, iodepth, iops)
        .arg("--output-format=json")
        .args(extra)
        .spawn()
        .expect("spawn fio")
}

/// fio ended clean: exit 0, no I/O error, no verification failure, and no
/// request (write or verifying read) took longer than `max_latency`.
#[track_caller]
fn fio_clean(fio: Child, max_latency: Duration) {
    let o = fio.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "fio failed:\n{out}\n{err}");
    assert!(!err.contains("verify"), "fio verification failed:\n{err}");
    let json = &out[out.find('{').unwrap_or(0)..];
    let r: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON ({e}):\n{out}\n{err}"));
    let job = &r["jobs"][0];
    assert_eq!(job["error"], 0, "fio reported an error: {job:#}");
    for dir in ["write", "read"] {
        let ios = job[dir]["total_ios"].as_u64().unwrap_or(0);
        assert!(ios > 0, "fio did no {dir}s: {job:#}");
        let max_ns = job[dir]["lat_ns"]["max"].as_f64().unwrap_or(0.0);
        assert!(
            max_ns < max_latency.as_nanos() as f64,
            "a {dir} took {:.2} s, beyond {max_latency:?} (io timeout {IO_TIMEOUT_SECS} s)",
            max_ns / 1e9
        );
    }
}

/// Asserts fio is still running (else the fault came after the load).
#[track_caller]
fn still_running(fio: &mut Child) {
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio ended before the fault; the test proves nothing"
    );
}

// ---- group layouts ----

/// Ordinary sparse image files of 128 MiB in the disks directory.
fn plain(sb: &Sandbox, names: &[&str]) {
    for n in names {
        sb.image(n, 128);
    }
}

/// `init` of every disk in the disks directory as raw, in group `g` (no
/// fault is on yet).
fn init_all(sb: &Sandbox, names: &[&str]) {
    let paths: Vec<String> = names.iter().map(|n| sb.p(&format!("disks/{n}"))).collect();
    let mut args = vec!["init"];
    args.extend(paths.iter().map(String::as_str));
    args.extend(["--style", "raw", "--group", "g"]);
    sb.mv(&args).ok();
}

/// A mirrored volume `name` of `mib` MiB on the named disks.
fn mirror(sb: &Sandbox, name: &str, mib: u64, on: &[&str]) {
    let size = format!("{mib}M");
    let copies = on.len().to_string();
    let paths: Vec<String> = on.iter().map(|n| sb.p(&format!("disks/{n}"))).collect();
    let mut args = vec![
        "create", name, "--size", &size, "--mirror", "--copies", &copies,
    ];
    for p in &paths {
        args.extend(["--disk", p.as_str()]);
    }
    sb.mv(&args).ok();
}

/// Writes `len` bytes of pattern `seed` to the start of a volume with
/// `copy` (offline, no fault on); returns them.
fn fill(sb: &Sandbox, name: &str, len: usize, seed: u64) -> Vec<u8> {
    let (file, data) = sb.data_file(&format!("fill-{name}.bin"), len, seed);
    sb.mv(&["copy", &file, &format!("vol:{name}")]).ok();
    data
}

/// a.img and c.img ordinary files, b.img a real faulty disk of 64 MiB; the
/// mirror `data` (16 MiB) on a and b, its first 4 MiB written.
fn faulty_b(sb: &Sandbox) -> (RealFaultyDisk, Vec<u8>) {
    plain(sb, &["a.img", "c.img"]);
    let b = faulty_disk(sb, "b.img", 64);
    init_all(sb, &["a.img", "b.img", "c.img"]);
    mirror(sb, "data", 16, &["a.img", "b.img"]);
    let data = fill(sb, "data", 4 * MIB as usize, 7);
    (b, data)
}

/// Serves the group, starts fio on `data`, fails b with `fault` while fio
/// runs; fio must end clean, b `failed` and `data` `failed-redundancy`.
fn fails_under_load(fault: impl Fn(&RealFaultyDisk), fio_extra: &[&str]) {
    if !rig_available(&["fio"]) {
        return;
    }
    let sb = Sandbox::new();
    let (b, _) = faulty_b(&sb);
    let s = serve(&sb);
    let _resume = b.resume_on_drop();
    let mut fio = fio_start(&s.uri("data"), 16, 8, 800, fio_extra);
    std::thread::sleep(Duration::from_millis(1500));
    still_running(&mut fio);
    fault(&b);
    let st = wait_status(&sb, 30, "b.img failed", |st| {
        disk_state(st, "b.img") == "failed"
    });
    assert_eq!(vol_state(&st, "data"), "failed-redundancy", "{st:#}");
    fio_clean(fio, request_limit());
    let st = status_t(&sb);
    assert_eq!(disk_state(&st, "b.img"), "failed", "{st:#}");
    assert_eq!(disk_state(&st, "a.img"), "online", "{st:#}");
    assert_eq!(vol_state(&st, "data"), "failed-redundancy", "{st:#}");
    let (code, log) = s.stop();
    assert_eq!(code, 0, "serve's exit status:\n{log}");
}

/// Asserts that `got` starts with `want`, naming the first byte that
/// differs (and whether the volume gave zeroes there) when it does not.
#[track_caller]
fn assert_holds(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got.len() >= want.len(),
        "{what}: read {} bytes only",
        got.len()
    );
    if let Some(at) = (0..want.len()).find(|&i| got[i] != want[i]) {
        let end = (at + 4096).min(want.len());
        let zeroes = got[at..end].iter().all(|&b| b == 0);
        panic!(
            "{what}: the volume differs from what was written at offset {at}{}",
            if zeroes {
                " (it reads as zeroes there)"
            } else {
                ""
            }
        );
    }
}

// ---- the rig itself ----

/// A buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: ptr holds len initialised bytes, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated with this layout in new().
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

// SAFETY: Aligned owns its allocation like a Vec.
unsafe impl Send for Aligned {}

fn open_direct(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("O_DIRECT open of the FUSE file")
}

fn is_eio(r: std::io::Result<()>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EIO))
}

/// Proves the rig: through nbdfuse each trigger makes exactly its operation
/// fail with EIO (O_DIRECT accepted), a paused disk hangs a read until it
/// is resumed, the delay filter slows requests, and dropping the rig leaves
/// no mount and no process behind.
#[test]
fn the_rig_fails_hangs_and_delays_real_requests_and_cleans_up() {
    if !rig_available(&[]) {
        return;
    }
    let sb = Sandbox::new();
    let path = sb.path("disks").join("x.img");
    let rig = RealFaultyDisk::start(&path, 16);
    let pids = rig.pids();
    assert_eq!(pids.len(), 2);
    assert!(mounted(&path), "{} is a FUSE mount", path.display());

    let f = open_direct(&path);
    let mut buf = Aligned::new(4096);
    buf.buf().copy_from_slice(&pattern(4096, 3));
    f.write_all_at(buf.buf(), 8192).unwrap();
    f.sync_data().unwrap();
    let mut back = Aligned::new(4096);
    f.read_exact_at(back.buf(), 8192).unwrap();
    assert_eq!(back.buf(), &pattern(4096, 3)[..]);

    let read = |f: &fs::File| {
        let mut b = Aligned::new(4096);
        f.read_exact_at(b.buf(), 8192)
    };
    let write = |f: &fs::File| {
        let mut b = Aligned::new(4096);
        f.write_all_at(b.buf(), 16384)
    };
    rig.fail_reads();
    assert!(is_eio(read(&f)), "fail_reads: a read gets EIO");
    assert!(write(&f).is_ok(), "fail_reads: writes work");
    assert!(f.sync_data().is_ok(), "fail_reads: flushes work");
    rig.heal();
    assert!(read(&f).is_ok(), "healed: reads work");

    rig.fail_writes();
    assert!(is_eio(write(&f)), "fail_writes: a write gets EIO");
    assert!(read(&f).is_ok(), "fail_writes: reads work");
    // A buffered write reaches nbdkit at once (FUSE writes through).
    let buffered = fs::OpenOptions::new().write(true).open(&path).unwrap();
    assert!(
        is_eio(buffered.write_all_at(&[1u8; 4096], 0)),
        "fail_writes: a buffered write gets EIO at write(2)"
    );
    rig.heal();

    rig.fail_flushes();
    assert!(write(&f).is_ok(), "fail_flushes: writes work");
    assert!(is_eio(f.sync_data()), "fail_flushes: fdatasync gets EIO");
    rig.heal();
    assert!(f.sync_data().is_ok());

    rig.fail_all();
    assert!(is_eio(read(&f)) && is_eio(write(&f)) && is_eio(f.sync_data()));
    rig.heal();

    // Pause: a read hangs until resumed.
    rig.pause();
    let f2 = f.try_clone().unwrap();
    let (tx, rx) = mpsc::channel();
    // Timed from before the spawn: the wait below starts after it, so a
    // read that hung until the resume took at least that wait.
    let start = Instant::now();
    std::thread::spawn(move || {
        let mut b = Aligned::new(4096);
        let r = f2.read_exact_at(b.buf(), 65536);
        let _ = tx.send((r.is_ok(), start.elapsed()));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(1500)).is_err(),
        "a read on a paused disk hangs"
    );
    rig.resume();
    let (ok, took) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(ok && took >= Duration::from_millis(1500), "{ok} {took:?}");
    drop(f);
    drop(buffered);
    drop(rig);
    assert!(!mounted(&path), "the rig unmounted {}", path.display());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} of the rig is gone"
        );
    }

    // Delay: each request takes the delay.
    let slow = RealFaultyDisk::start_with(&path, 16, Some(Duration::from_millis(300)));
    let f = open_direct(&path);
    let start = Instant::now();
    let mut b = Aligned::new(4096);
    f.read_exact_at(b.buf(), 0).unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "delayed read"
    );
    drop(f);
    let pids = slow.pids();
    drop(slow);
    assert!(!mounted(&path));
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid}");
    }
}

/// A rig dropped by a panic while paused and busy (a read hung on it)
/// still resumes, unmounts and ends its processes.
#[test]
fn the_rig_cleans_up_after_a_panic_while_paused() {
    if !rig_available(&[]) {
        return;
    }
    let sb = Sandbox::new();
    let path = sb.path("disks").join("x.img");
    let (tx, rx) = mpsc::channel();
    let p = path.clone();
    let t = std::thread::spawn(move || {
        let rig = RealFaultyDisk::start(&p, 16);
        tx.send(rig.pids()).unwrap();
        rig.pause();
        let f = open_direct(&p);
        std::thread::spawn(move || {
            let mut b = Aligned::new(4096);
            let _ = f.read_exact_at(b.buf(), 0);
        });
        std::thread::sleep(Duration::from_millis(300));
        panic!("a test failing with the disk paused");
    });
    let pids = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(t.join().is_err(), "the thread panicked");
    assert!(!mounted(&path), "unmounted after the panic");
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid}");
    }
}

// ---- scenarios ----

#[test]
fn a_disk_dead_before_the_first_command_leaves_the_group_working_degraded() {
    if !rig_available(&["fio"]) {
        return;
    }
    let sb = Sandbox::new();
    let (b, data) = faulty_b(&sb);
    b.fail_all();

    // status: exit 0, the dead disk listed as unreadable with the I/O error.
    let st = status_t(&sb);
    let unreadable = st["unreadable"]
        .as_array()
        .unwrap_or_else(|| panic!("status --json has an \"unreadable\" list: {st:#}"));
    let entry = unreadable
        .iter()
        .find(|u| u["path"] == b.display().as_str())
        .unwrap_or_else(|| panic!("{} is listed unreadable: {st:#}", b.display()));
    let reason = entry["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("Input/output error") || reason.contains("I/O error"),
        "the reason names the I/O error: {entry}"
    );
    assert!(
        out_of_service(&disk_state(&st, "b.img")),
        "b.img's config member is missing or failed: {st:#}"
    );
    assert_eq!(disk_state(&st, "a.img"), "online", "{st:#}");
    assert_eq!(vol_state(&st, "data"), "failed-redundancy", "{st:#}");

    // copy out: the data, from a.
    let out = sb.p("out.img");
    mvt_ok(&sb, &["copy", "vol:data", &out]);
    let got = fs::read(&out).unwrap();
    assert_eq!(got.len() as u64, 16 * MIB);
    assert_holds(&got, &data, "copy vol:data with b dead");

    // serve: starts, and fio verifies over NBD.
    let s = serve(&sb);
    let fio = fio_start(&s.uri("data"), 8, 8, 2000, &[]);
    fio_clean(fio, request_limit());
    let (code, log) = s.stop();
    assert_eq!(code, 0, "serve's exit status:\n{log}");

    // repair: the plex moves to c, which has room.
    mvt_ok(&sb, &["repair", "data"]);
    let st = status_t(&sb);
    assert_eq!(vol_state(&st, "data"), "healthy", "{st:#}");
    assert_eq!(
        plexes(&st, "data"),
        vec![
            ("a.img".to_string(), "in-sync".to_string()),
            ("c.img".to_string(), "in-sync".to_string())
        ],
        "{st:#}"
    );
}

/// The rest of the commands with a disk dead from the start, each within
/// the deadline: `scrub` and `break` refuse (one in-sync plex is left, on
/// the live disk), `reactivate` of the dead disk fails and changes nothing,
/// `fail` records it failed; once the disk works again `reactivate` brings
/// it back and resyncs it, and a scrub finds the plexes equal.
#[test]
fn with_a_dead_disk_every_command_answers_and_reactivate_brings_it_back() {
    if !rig_available(&[]) {
        return;
    }
    let sb = Sandbox::new();
    let (b, data) = faulty_b(&sb);
    b.fail_all();
    let b_path = b.display();

    let r = mvt(&sb, &["scrub", "data"]);
    assert_eq!(r.code, 2, "scrub with b dead:\n{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("fewer than two in-sync plexes"),
        "{}",
        r.stderr
    );
    let r = mvt(&sb, &["break", "data", "--disk", &b_path]);
    assert_eq!(
        r.code, 2,
        "break off the dead disk:\n{}{}",
        r.stdout, r.stderr
    );
    let before = status_t(&sb);
    let r = mvt(&sb, &["reactivate", &b_path]);
    assert_ne!(
        r.code, 0,
        "reactivate of a dead disk:\n{}{}",
        r.stdout, r.stderr
    );
    let errors = error_lines(&r.stderr);
    assert!(
        errors.len() == 1
            && errors[0].contains("b.img")
            && errors[0].contains("Input/output error"),
        "one error naming the disk and its I/O error: {}",
        r.stderr
    );
    assert_eq!(
        status_t(&sb)["disks"],
        before["disks"],
        "a failed reactivate changed the disks' states"
    );
    mvt_ok(&sb, &["fail", &b_path]);
    let st = status_t(&sb);
    assert_eq!(disk_state(&st, "b.img"), "failed", "{st:#}");
    assert_eq!(vol_state(&st, "data"), "failed-redundancy", "{st:#}");

    // The disk works again: reactivate resyncs it in full (it failed).
    b.heal();
    let out = mvt_ok(&sb, &["reactivate", &b_path]);
    assert!(out.contains("resynced"), "{out}");
    let st = status_t(&sb);
    assert_eq!(disk_state(&st, "b.img"), "online", "{st:#}");
    assert_eq!(vol_state(&st, "data"), "healthy", "{st:#}");
    let out = mvt_ok(&sb, &["scrub", "data", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["mismatches"], 0, "{r:#}");
    assert_holds(&sb.read_volume("data"), &data, "data after b came back");
}

#[test]
fn a_disk_dying_under_load_is_failed_and_clients_see_no_error() {
    fails_under_load(RealFaultyDisk::fail_all, &[]);
}

#[test]
fn a_disk_failing_only_writes_is_failed_and_clients_see_no_error() {
    fails_under_load(RealFaultyDisk::fail_writes, &[]);
}

#[test]
fn a_disk_failing_only_flushes_is_failed_and_clients_see_no_error() {
    // fio sends a flush after every 16 writes.
    fails_under_load(RealFaultyDisk::fail_flushes, &["--fsync=16"]);
}

/// `init` of a new group on a disk that hangs answers within the deadline
/// (the lookup and the open run under it), names the disk, and writes
/// nothing on it. The answer is its error line: the process itself cannot
/// end while one of its threads waits in the kernel on the hung FUSE file,
/// so it is reaped once the disk is resumed.
#[test]
fn init_of_a_new_group_on_a_hung_disk_answers_within_the_deadline_and_writes_nothing() {
    if !rig_available(&[]) {
        return;
    }
    let sb = Sandbox::new();
    let n = faulty_disk(&sb, "n.img", 64);
    n.pause();
    let resume = n.resume_on_drop();
    let path = n.display();
    // No group to join: the disks to look at are an empty directory's.
    let none = sb.path("no-disks");
    fs::create_dir_all(&none).unwrap();
    let mut child = Command::new(bin())
        .env("MIRRORVOL_DISKS", &none)
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .args(IO_TIMEOUT)
        .args(["init", &path])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mirrorvol");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let error = loop {
        let left = limit().saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("error:") => break line,
            Ok(_) => {}
            Err(_) => panic!("init on a hung disk printed no error within {:?}", limit()),
        }
    };
    assert!(error.contains("n.img"), "the error names the disk: {error}");
    drop(resume);
    let status = child.wait().expect("mirrorvol ends once the disk answers");
    assert!(!status.success(), "init on a hung disk succeeded");
    let head = {
        let mut f = fs::File::open(&path).unwrap();
        let mut buf = vec![0u8; MIB as usize];
        std::io::Read::read_exact(&mut f, &mut buf).unwrap();
        buf
    };
    assert!(
        head.iter().all(|b| *b == 0),
        "init wrote on the disk it could not use"
    );
}

#[test]
fn a_disk_hung_before_serve_starts_does_not_stop_the_group_from_serving() {
    if !rig_available(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    let (b, data) = faulty_b(&sb);
    b.pause();

    // Offline status returns within the deadline, the disk out of service.
    let r = mvt(&sb, &["status", "--json"]);
    assert_eq!(r.code, 0, "status with a hung disk:\n{}", r.stderr);
    let st: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(
        out_of_service(&disk_state(&st, "b.img")),
        "the hung disk is failed or missing: {st:#}"
    );
    assert_eq!(vol_state(&st, "data"), "failed-redundancy", "{st:#}");

    // serve exports within the deadline.
    let start = Instant::now();
    let s = serve(&sb);
    let _resume = b.resume_on_drop();
    assert!(
        start.elapsed() < limit(),
        "serve took {:?} to export with a hung disk",
        start.elapsed()
    );
    // A client reads the data written before the hang, and writes.
    let uri = s.uri("data");
    let got = read_export(&sb, &uri);
    assert_holds(&got, &data, "reading the export with b hung");
    qemu_io_t(&uri, &["write -P 0x3c 8M 1M", "read -P 0x3c 8M 1M"]);
    let st = status_t(&sb);
    assert!(
        out_of_service(&disk_state(&st, "b.img")),
        "the hung disk is failed or missing under serve: {st:#}"
    );
    assert_eq!(vol_state(&st, "data"), "failed-redundancy", "{st:#}");
}

#[test]
fn disks_that_hang_cost_a_command_the_deadline_once_not_once_each() {
    if !rig_available(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    plain(&sb, &["a.img"]);
    let b = faulty_disk(&sb, "b.img", 64);
    let c = faulty_disk(&sb, "c.img", 64);
    init_all(&sb, &["a.img", "b.img", "c.img"]);
    mirror(&sb, "data", 16, &["a.img", "b.img", "c.img"]);
    fill(&sb, "data", 4 * MIB as usize, 13);
    b.pause();
    let _resume_b = b.resume_on_drop();
    c.pause();
    let _resume_c = c.resume_on_drop();

    // A daemon of another group recorded (gone since): the command asks
    // the disks which group they hold before it assembles.
    let run = sb.path("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("00000000-0000-4000-8000-000000000001.pid"),
        "4194304\n/nonexistent/mirrorvol.sock\n",
    )
    .unwrap();

    // The disks are asked, looked up, opened and read all at once: two
    // that hang cost one deadline (one at a time, each cost it twice in
    // turn: 8 s here).
    let r = mvt(&sb, &["status", "--json"]);
    assert_eq!(r.code, 0, "status with two hung disks:\n{}", r.stderr);
    assert!(
        r.took < Duration::from_secs(3 * IO_TIMEOUT_SECS),
        "status took {:?} with two disks hung (deadline {IO_TIMEOUT_SECS} s)\n{}",
        r.took,
        r.stderr
    );
    let st: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    for d in ["b.img", "c.img"] {
        assert!(
            out_of_service(&disk_state(&st, d)),
            "{d} hung is out of service: {st:#}"
        );
    }
    assert_eq!(vol_state(&st, "data"), "failed-redundancy", "{st:#}");
    // No second command here: its open of a FUSE file whose page a read
    // of this one left locked waits in the kernel, where no signal ends
    // it, until the disk answers.
}

#[test]
fn a_disk_hanging_under_fio_is_failed_within_the_deadline() {
    hung_under_fio_is_failed(&[], 8, 800);
}

/// Through the page cache (`--cache writeback`) at queue depth 1 a write
/// waits in its disk's ring thread (which writes a lone write itself): one
/// to a disk that hangs there is given up at the deadline, the disk
/// failed, and the client sees no error.
#[test]
fn a_disk_hanging_under_page_cache_writes_at_queue_depth_1_is_failed_within_the_deadline() {
    hung_under_fio_is_failed(&["--cache", "writeback"], 1, 400);
}

/// Through the page cache at QD 1 the ring's thread of a disk writes a
/// lone write itself; when b hangs in one, the writes that come after it
/// wait for that thread and time out with it. Once b returns they are not
/// made: b was failed, and a write landing after it had been taken back
/// would undo what its resync copied.
#[test]
fn writes_timed_out_behind_a_hung_page_cache_write_are_not_made_when_it_returns() {
    if !rig_available(&["qemu-io"]) {
        return;
    }
    if IoEngine::from_env() == IoEngine::Threads {
        // The worker threads start each write as it comes, each on a
        // worker of its own: those already in `pwrite` when the disk hung
        // land when it returns, on either engine. Only the ring's thread
        // holds writes back behind one it writes itself.
        eprintln!("not for --io-engine threads: no write waits behind another there");
        return;
    }
    let sb = Sandbox::new();
    let (b, _) = faulty_b(&sb);
    let s = serve_with(&sb, &["--cache", "writeback"]);
    let _resume = b.resume_on_drop();
    let uri = s.uri("data");
    // One at a time: each disk's ring thread takes to writing them itself.
    // The regions written below get their write-intent bits now (a write
    // to a clean region would wait for its bit on b, not reach b's ring).
    qemu_io_t(
        &uri,
        &[
            "write -P 0x01 0 4k",
            "write -P 0x02 1M 4k",
            "write -P 0x03 2M 4k",
            "write -P 0x04 3M 4k",
        ],
    );
    b.pause();
    // The first hangs in b's ring thread; the two after it reach b's queue
    // 300 ms later, and all three time out there.
    qemu_io_t(
        &uri,
        &[
            "aio_write -P 0x11 1M 4k",
            "sleep 300",
            "aio_write -P 0x22 2M 4k",
            "aio_write -P 0x33 3M 4k",
            "aio_flush",
        ],
    );
    let st = status_t(&sb);
    assert!(
        out_of_service(&disk_state(&st, "b.img")),
        "the hung disk is out of service: {st:#}"
    );
    b.resume();
    // The hung write goes on and lands; b's ring thread then has the two
    // that waited behind it.
    let landed = Instant::now();
    while plex_read(&sb, "b.img", "data", MIB, 4096) != vec![0x11; 4096] {
        assert!(
            landed.elapsed() < Duration::from_secs(10),
            "the write b hung in did not land after it returned"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    for (at, byte) in [(2 * MIB, 0x22u8), (3 * MIB, 0x33)] {
        assert_ne!(
            plex_read(&sb, "b.img", "data", at, 4096),
            vec![byte; 4096],
            "the write at {at} timed out on b and was made after b returned"
        );
    }
    qemu_io_t(&uri, &["read -P 0x22 2M 4k", "read -P 0x33 3M 4k"]);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "serve's exit status:\n{log}");
}

/// A write b hung in is still in the kernel after b was failed on its
/// deadline. Until it returns, b is not taken back: `reactivate` says why,
/// naming b, and changes nothing, so the late write can never land over
/// what a resync copied there. Once b answers, the write lands, and
/// `reactivate` resyncs b over it with what the volume holds.
#[test]
fn a_disk_with_a_write_still_in_the_kernel_is_not_taken_back_until_it_returns() {
    if !rig_available(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    let (b, _) = faulty_b(&sb);
    let b_path = b.display();
    let s = serve(&sb);
    let _resume = b.resume_on_drop();
    let uri = s.uri("data");
    qemu_io_t(&uri, &["write -P 0x01 1M 4k"]);
    b.pause();
    // Hangs on b, answered from a once b is failed on its deadline; then
    // the same block again, to a alone.
    qemu_io_t(&uri, &["write -P 0x11 1M 4k"]);
    let st = status_t(&sb);
    assert!(
        out_of_service(&disk_state(&st, "b.img")),
        "the hung disk is out of service: {st:#}"
    );
    qemu_io_t(&uri, &["write -P 0x22 1M 4k"]);

    let before = states(&status_t(&sb));
    let r = mvt(&sb, &["reactivate", &b_path]);
    assert_eq!(
        r.code, 1,
        "reactivate while b's write is stuck:\n{}{}",
        r.stdout, r.stderr
    );
    let errors = error_lines(&r.stderr);
    assert!(
        errors.len() == 1
            && errors[0].contains("b.img")
            && errors[0].contains("still has")
            && errors[0].contains("unanswered request"),
        "one error naming b and the request it has not returned: {}",
        r.stderr
    );
    assert_eq!(
        states(&status_t(&sb)),
        before,
        "a refused reactivate changed the disks' or the plexes' states"
    );

    b.resume();
    // The stuck write lands on b once it answers; reactivate then takes b
    // back and copies what the volume holds over it.
    let landed = Instant::now();
    while plex_read(&sb, "b.img", "data", MIB, 4096) != vec![0x11; 4096] {
        assert!(
            landed.elapsed() < Duration::from_secs(10),
            "the write b hung in did not land after it returned"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    reactivate_once_answered(&sb, &b_path);
    assert_eq!(
        plex_read(&sb, "b.img", "data", MIB, 4096),
        vec![0x22; 4096],
        "b holds the volume's last write after its resync"
    );
    let (code, log) = s.stop();
    assert_eq!(code, 0, "serve's exit status:\n{log}");
}

/// `reactivate PATH`, tried again until it is taken (the disk may still
/// be counting out the requests it just answered), for at most 10 s; then
/// waits for volume `data` to be back in sync.
#[track_caller]
fn reactivate_once_answered(sb: &Sandbox, path: &str) {
    let taken = Instant::now();
    loop {
        let r = mvt(sb, &["reactivate", path]);
        if r.code == 0 {
            break;
        }
        assert!(
            taken.elapsed() < Duration::from_secs(10),
            "reactivate after the disk answered:\n{}{}",
            r.stdout,
            r.stderr
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_status(sb, 20, "the disk back in sync", |st| {
        vol_state(st, "data") == "healthy"
    });
}

/// The `error:` lines of a command's stderr.
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("error:")).collect()
}

/// The disks' states and the plexes' of volume `data`, from a status
/// report: what a refused command must leave as it was (the error counts
/// may still move, with requests timing out meanwhile).
fn states(st: &serde_json::Value) -> [Vec<(String, String)>; 2] {
    let disks = st["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["path"].as_str().unwrap_or("").to_string(),
                d["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    [disks, plexes(st, "data")]
}

/// An online `copy` into the volume writes from the command's thread,
/// through that thread's own ring. When b hangs in one of its writes, the
/// write times out, b is failed, and the copy ends on a; the command's
/// thread then ends with the write still in its ring, and `reactivate` is
/// refused. Once b answers (within a few seconds), that write is seen to
/// end and counted out, so `reactivate` takes b back: a thread that ended
/// does not leave b owing a request for good.
#[test]
fn a_write_left_in_an_ended_threads_ring_is_counted_out_when_the_disk_answers() {
    if !rig_available(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    let (b, _) = faulty_b(&sb);
    let b_path = b.display();
    let s = serve(&sb);
    let _resume = b.resume_on_drop();
    let (file, data) = sb.data_file("in.bin", 256 << 10, 11);
    // The region's write-intent bit is set now: the copy's first write
    // goes straight to b's data, not to its bitmap first.
    qemu_io_t(&s.uri("data"), &["write -P 0x01 0 4k"]);
    b.pause();
    mvt_ok(&sb, &["copy", &file, "vol:data"]);
    assert!(
        out_of_service(&disk_state(&status_t(&sb), "b.img")),
        "b was failed under the copy"
    );
    // The write is still in b (in the ended thread's ring; under
    // --io-engine threads, in a worker): b is not taken back yet.
    let r = mvt(&sb, &["reactivate", &b_path]);
    assert!(
        r.code == 1 && r.stderr.contains("unanswered request"),
        "reactivate while b's write is stuck:\n{}{}",
        r.stdout,
        r.stderr
    );
    b.resume();
    reactivate_once_answered(&sb, &b_path);
    assert_eq!(
        plex_read(&sb, "b.img", "data", 0, data.len()),
        data,
        "b holds what the copy wrote after its resync"
    );
    let (code, log) = s.stop();
    assert_eq!(code, 0, "serve's exit status:\n{log}");
}

/// Serves a mirror with `serve_extra`, writes to it with fio (`iodepth`
/// deep, at most `iops` a second), hangs disk b under it: fio sees no
/// error and no request beyond the limit, b is out of service, the volume
/// goes on without redundancy, and serve stops clean.
fn hung_under_fio_is_failed(serve_extra: &[&str], iodepth: u32, iops: u32) {
    if !rig_available(&["fio"]) {
        return;
    }
    let sb = Sandbox::new();
    let (b, _) = faulty_b(&sb);
    let s = serve_with(&sb, serve_extra);
    let _resume = b.resume_on_drop();
    let mut fio = fio_start(&s.uri("data"), 16, iodepth, iops, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    still_running(&mut fio);
    b.pause();
    fio_clean(fio, request_limit());
    let st = status_t(&sb);
    assert!(
        out_of_service(&disk_state(&st, "b.img")),
        "the hung disk is out of service: {st:#}"
    );
    assert_eq!(vol_state(&st, "data"), "failed-redundancy", "{st:#}");
    b.resume();
    let (code, log) = s.stop();
    assert_eq!(code, 0, "serve's exit status:\n{log}");
}

#[test]
fn an_online_fail_returns_within_the_deadline_while_another_disk_hangs() {
    if !rig_available(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    plain(&sb, &["a.img", "c.img"]);
    let b = faulty_disk(&sb, "b.img", 64);
    init_all(&sb, &["a.img", "b.img", "c.img"]);
    mirror(&sb, "m1", 8, &["a.img", "b.img"]);
    mirror(&sb, "m2", 8, &["a.img", "c.img"]);
    let s = serve(&sb);
    let _resume = b.resume_on_drop();
    qemu_io_t(&s.uri("m1"), &["write -P 0x11 0 1M"]);
    qemu_io_t(&s.uri("m2"), &["write -P 0x22 0 1M"]);

    // b hangs; the first request to reach it is the config write of `fail`.
    b.pause();
    let c = sb.p("disks/c.img");
    let r = mvt(&sb, &["fail", &c]);
    assert_eq!(
        r.code, 0,
        "online fail of c with b hung (took {:?}):\n{}{}",
        r.took, r.stdout, r.stderr
    );
    // Reads and writes keep answering on both mirrors.
    qemu_io_t(&s.uri("m1"), &["read -P 0x11 0 1M", "write -P 0x33 1M 1M"]);
    qemu_io_t(&s.uri("m2"), &["read -P 0x22 0 1M", "write -P 0x44 1M 1M"]);
    qemu_io_t(&s.uri("m1"), &["read -P 0x33 1M 1M"]);
    qemu_io_t(&s.uri("m2"), &["read -P 0x44 1M 1M"]);
    let st = status_t(&sb);
    assert_eq!(disk_state(&st, "c.img"), "failed", "{st:#}");
    assert!(out_of_service(&disk_state(&st, "b.img")), "{st:#}");
    assert_eq!(vol_state(&st, "m1"), "failed-redundancy", "{st:#}");
    assert_eq!(vol_state(&st, "m2"), "failed-redundancy", "{st:#}");
}

/// `remove-disk` of a disk that hangs: its labels are wiped after it has
/// left the group, on the request's thread, so the group answers everyone
/// else meanwhile (`status` at once, not after the disk's deadline), and
/// the command ends within the deadline saying the labels stay.
#[test]
fn remove_disk_of_a_hung_disk_leaves_the_group_answering() {
    if !rig_available(&[]) {
        return;
    }
    let sb = Sandbox::new();
    plain(&sb, &["a.img", "c.img"]);
    let b = faulty_disk(&sb, "b.img", 64);
    init_all(&sb, &["a.img", "b.img", "c.img"]);
    mirror(&sb, "m", 8, &["a.img", "c.img"]);
    let _s = serve(&sb);
    let _resume = b.resume_on_drop();
    b.pause();
    let removing = {
        let sb_disks = sb.disks_dir();
        let run = sb.path("run");
        let path = sb.p("disks/b.img");
        std::thread::spawn(move || {
            let out = Command::new(bin())
                .env("MIRRORVOL_DISKS", sb_disks)
                .env("MIRRORVOL_RUN_DIR", run)
                .args(["remove-disk", &path])
                .output()
                .expect("run mirrorvol");
            (Instant::now(), out)
        })
    };
    // The wipe waits on b for the deadline (2 s); status answers now.
    std::thread::sleep(Duration::from_millis(400));
    let asked = Instant::now();
    let st = status_t(&sb);
    let answered = Instant::now();
    let gone = st["disks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| !d["path"].as_str().unwrap().ends_with("b.img"));
    let (ended, out) = removing.join().unwrap();
    assert!(gone, "b left the group before its wipe: {st:#}");
    assert!(
        answered < ended,
        "status ({:?}) waited for the wipe of the hung disk",
        answered - asked
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("could not be wiped"), "{stderr}");
    assert_eq!(vol_state(&status_t(&sb), "m"), "healthy");
}

/// A simple volume whose only copy sits on a disk that hangs under `serve`:
/// a write to a region it never wrote (its write-intent bit must be made
/// durable on that disk first) waits for the disk, as its data would, since
/// there is no other copy to take it. Meanwhile `status` shows the volume
/// `not-answering` with the disk, and a volume on another disk answers;
/// once the disk returns the write completes, and lands.
#[test]
fn a_cold_write_to_a_volume_whose_last_copy_hangs_waits_for_it_while_others_answer() {
    if !rig_available(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    plain(&sb, &["a.img"]);
    let b = faulty_disk(&sb, "b.img", 64);
    init_all(&sb, &["a.img", "b.img"]);
    let (a_path, b_path) = (sb.p("disks/a.img"), sb.p("disks/b.img"));
    sb.mv(&["create", "solo", "--size", "16M", "--disk", &b_path])
        .ok();
    sb.mv(&["create", "other", "--size", "16M", "--disk", &a_path])
        .ok();
    mirror(&sb, "pair", 8, &["a.img", "b.img"]);
    let s = serve(&sb);
    let _resume = b.resume_on_drop();
    qemu_io_t(&s.uri("solo"), &["write -P 0x21 0 64k"]);

    b.pause();
    // 8 MiB in: a region no write touched since serve started.
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw", &s.uri("solo"), "-c", "write -P 0x5e 8M 1M"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Reap<'a>(&'a mut Child);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let writer = Reap(&mut writer);
    // Past the deadline twice over: the write still waits, not failed.
    std::thread::sleep(Duration::from_secs(2 * IO_TIMEOUT_SECS + 1));
    assert!(
        matches!(writer.0.try_wait(), Ok(None)),
        "the cold write to the hung last copy ended before its disk returned"
    );
    let st = status_t(&sb);
    assert_eq!(vol_state(&st, "solo"), "not-answering", "{st:#}");
    assert!(
        volume(&st, "solo")["waiting_on"]
            .to_string()
            .contains("b.img"),
        "{st:#}"
    );
    assert_eq!(vol_state(&st, "other"), "healthy", "{st:#}");
    qemu_io_t(
        &s.uri("other"),
        &["write -P 0x3a 8M 1M", "read -P 0x3a 8M 1M"],
    );
    // A mirror with a plex on the hung disk goes on without it: that plex
    // fails, the disk stays in service for the last copy it holds.
    qemu_io_t(&s.uri("pair"), &["write -P 0x4b 0 1M", "read -P 0x4b 0 1M"]);
    let st = status_t(&sb);
    assert_eq!(vol_state(&st, "pair"), "failed-redundancy", "{st:#}");
    assert_eq!(vol_state(&st, "solo"), "not-answering", "{st:#}");
    assert!(
        matches!(writer.0.try_wait(), Ok(None)),
        "the cold write to the hung last copy ended when the mirror's plex failed"
    );

    // The disk returns: the write completes without an error, and landed.
    b.resume();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = writer.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < limit(),
            "the write did not complete once the disk returned"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(writer.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(
        status.success() && !out.contains("failed"),
        "the write after the disk returned: {status:?}\n{out}"
    );
    drop(writer);
    qemu_io_t(
        &s.uri("solo"),
        &["read -P 0x5e 8M 1M", "read -P 0x21 0 64k"],
    );
    // The disk stayed in service, its hang counted against it: the
    // volume is at risk, not failed.
    let st = status_t(&sb);
    assert_eq!(disk_state(&st, "b.img"), "online-errors", "{st:#}");
    assert_eq!(
        vol_state(&st, "solo"),
        "failed-redundancy-at-risk",
        "{st:#}"
    );
    let (code, log) = s.stop();
    assert_eq!(code, 0, "serve's exit status:\n{log}");
}

#[test]
fn a_disk_that_fills_up_is_failed_and_clients_see_no_error() {
    if !rig_available(&["fio"]) {
        return;
    }
    let sb = Sandbox::new();
    plain(&sb, &["a.img", "c.img"]);
    // b: a 128 MiB sparse image on a 6 MiB tmpfs.
    let mut tmpfs = SmallTmpfs::mount(6);
    tmpfs.image_at("b.img", 128, &sb.path("disks").join("b.img"));
    init_all(&sb, &["a.img", "b.img", "c.img"]);
    mirror(&sb, "data", 24, &["a.img", "b.img"]);
    let s = serve(&sb);
    let fio = fio_start(&s.uri("data"), 16, 8, 2000, &[]);
    fio_clean(fio, request_limit());
    let st = status_t(&sb);
    assert_eq!(disk_state(&st, "b.img"), "failed", "{st:#}");
    assert_eq!(disk_state(&st, "a.img"), "online", "{st:#}");
    assert_eq!(vol_state(&st, "data"), "failed-redundancy", "{st:#}");
    let (code, log) = s.stop();
    assert_eq!(code, 0, "serve's exit status:\n{log}");
    drop(tmpfs);
}

#[test]
fn a_write_when_every_plex_is_full_gets_enospc_not_eio() {
    if !rig_available(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    // a and b: 128 MiB sparse images on one 8 MiB tmpfs.
    let mut tmpfs = SmallTmpfs::mount(8);
    tmpfs.image_at("a.img", 128, &sb.path("disks").join("a.img"));
    tmpfs.image_at("b.img", 128, &sb.path("disks").join("b.img"));
    init_all(&sb, &["a.img", "b.img"]);
    mirror(&sb, "data", 32, &["a.img", "b.img"]);
    let s = serve(&sb);
    let (_, out, err, _) = qemu_io_run(&s.uri("data"), &["write -P 0x5a 0 16M"]);
    assert!(
        out.contains("No space left on device") || err.contains("No space left on device"),
        "the client's write fails with ENOSPC:\n{out}\n{err}\n{}",
        s.stderr()
    );
    assert!(
        !out.contains("Input/output error") && !err.contains("Input/output error"),
        "ENOSPC, not EIO:\n{out}\n{err}"
    );
    let (code, log) = s.stop();
    assert_eq!(code, 0, "serve stopped with SIGTERM exits 0:\n{log}");
    drop(tmpfs);
}

#[test]
fn a_disk_file_truncated_while_served_is_failed_and_not_grown_back() {
    if !rig_available(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    plain(&sb, &["a.img", "b.img", "c.img"]);
    init_all(&sb, &["a.img", "b.img", "c.img"]);
    mirror(&sb, "data", 16, &["a.img", "b.img"]);
    let s = serve(&sb);
    let uri = s.uri("data");
    // 8 MiB of known data, then b.img shrinks to 1 MiB under the server.
    let data = pattern(8 * MIB as usize, 11);
    fs::write(sb.path("data.bin"), &data).unwrap();
    common::serve::ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        &sb.p("data.bin"),
        &uri,
    ]));
    let b = sb.path("disks").join("b.img");
    fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(MIB)
        .unwrap();

    // Reads through NBD give what was written (twice: reads spread over
    // both plexes).
    for _ in 0..2 {
        let got = read_export(&sb, &uri);
        assert_holds(&got, &data, "reads through NBD after b.img was truncated");
    }
    qemu_io_t(&uri, &["write -P 0x6b 8M 4M", "read -P 0x6b 8M 4M"]);
    assert_eq!(
        fs::metadata(&b).unwrap().len(),
        MIB,
        "the truncated file was not grown back by the reads and writes"
    );
    let st = wait_status(&sb, 15, "b.img failed after its truncation", |st| {
        disk_state(st, "b.img") == "failed"
    });
    assert_eq!(vol_state(&st, "data"), "failed-redundancy", "{st:#}");
    assert_eq!(
        fs::metadata(&b).unwrap().len(),
        MIB,
        "the truncated file was not grown back"
    );
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    assert_eq!(fs::metadata(&b).unwrap().len(), MIB, "not grown at stop");
}

#[test]
fn a_disk_file_deleted_while_served_is_not_reported_healthy() {
    if !rig_available(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    plain(&sb, &["a.img", "b.img", "c.img"]);
    init_all(&sb, &["a.img", "b.img", "c.img"]);
    mirror(&sb, "data", 16, &["a.img", "b.img"]);
    let s = serve(&sb);
    let uri = s.uri("data");
    qemu_io_t(&uri, &["write -P 0x21 0 1M"]);
    fs::remove_file(sb.path("disks").join("b.img")).unwrap();
    qemu_io_t(&uri, &["write -P 0x22 1M 1M", "read -P 0x21 0 1M"]);
    let st = wait_status(&sb, 10, "the deleted b.img out of service", |st| {
        disk_state(st, "b.img") != "online"
    });
    assert!(
        out_of_service(&disk_state(&st, "b.img")),
        "the deleted disk is missing or failed: {st:#}"
    );
    assert_ne!(vol_state(&st, "data"), "healthy", "{st:#}");
    qemu_io_t(&uri, &["read -P 0x22 1M 1M"]);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
}

#[test]
fn a_failed_disk_reactivated_and_resynced_is_online_and_healthy_again() {
    if !rig_available(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    let (b, _) = faulty_b(&sb);
    let s = serve(&sb);
    let _resume = b.resume_on_drop();
    let uri = s.uri("data");
    // Read errors first (counted), then every request fails: b is failed.
    b.fail_reads();
    for i in 0..8 {
        qemu_io_t(&uri, &[&format!("read {}M 512k", i)]);
    }
    b.fail_all();
    qemu_io_t(&uri, &["write -P 0x5e 0 2M", "flush"]);
    let st = wait_status(&sb, 15, "b.img failed", |st| {
        disk_state(st, "b.img") == "failed"
    });
    assert_eq!(vol_state(&st, "data"), "failed-redundancy", "{st:#}");

    b.heal();
    mvt_ok(&sb, &["reactivate", &b.display()]);
    let st = wait_status(&sb, 30, "both plexes in sync after the resync", |st| {
        plexes(st, "data")
            == vec![
                ("a.img".to_string(), "in-sync".to_string()),
                ("b.img".to_string(), "in-sync".to_string()),
            ]
    });
    assert_eq!(
        disk_state(&st, "b.img"),
        "online",
        "the resynced disk is online (not online-errors): {st:#}"
    );
    assert_eq!(disk(&st, "b.img")["errors"], 0, "error count reset: {st:#}");
    assert_eq!(vol_state(&st, "data"), "healthy", "{st:#}");
    qemu_io_t(&uri, &["read -P 0x5e 0 2M"]);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    // Offline too: the resynced disk and the volume stay as they were.
    let st = status_t(&sb);
    assert_eq!(disk_state(&st, "b.img"), "online", "{st:#}");
    assert_eq!(vol_state(&st, "data"), "healthy", "{st:#}");
}
