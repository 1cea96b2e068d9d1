//! A real faulty disk for end-to-end tests: an nbdkit server (a RAM disk
//! behind the `error`, `pause` and `delay` filters) exposed as a regular
//! file through `nbdfuse`, which a group uses as a raw disk image. Errors
//! are switched on and off per operation by trigger files, hangs by the
//! pause filter's control socket.
//!
//! Needs root, /dev/fuse, nbdkit (with nbdkit-plugin-dev and a C compiler
//! for the small RAM-disk plugin whose flushes can fail: the error filter
//! has no flush trigger) and nbdfuse; [`rig_available`] skips a test loudly
//! otherwise (fails under MIRRORVOL_E2E=require).
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{MIB, Sandbox, is_root};

/// A RAM disk for nbdkit's cc plugin whose flushes fail (EIO) while the file
/// named by `flush-error-file=` exists. Reads, writes, zeroes and trims are
/// failed by the error filter in front of it.
const FAULTMEM_C: &str = r#"
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

static int64_t size = -1;
static char *flush_file = NULL;
static char *mem = NULL;

static int fm_config(const char *key, const char *value) {
  if (strcmp(key, "size") == 0) {
    size = nbdkit_parse_size(value);
    return size < 0 ? -1 : 0;
  }
  if (strcmp(key, "flush-error-file") == 0) {
    flush_file = nbdkit_absolute_path(value);
    return flush_file ? 0 : -1;
  }
  nbdkit_error("unknown parameter %s", key);
  return -1;
}

static int fm_get_ready(void) {
  if (size < 0) { nbdkit_error("size= is required"); return -1; }
  mem = mmap(NULL, size, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) { nbdkit_error("mmap: %m"); return -1; }
  return 0;
}

static void *fm_open(int readonly) { return NBDKIT_HANDLE_NOT_NEEDED; }
static int64_t fm_get_size(void *h) { return size; }
static int fm_can_multi_conn(void *h) { return 1; }
static int fm_can_flush(void *h) { return 1; }
static int fm_can_fua(void *h) { return NBDKIT_FUA_NATIVE; }
static int fm_can_trim(void *h) { return 1; }
static int fm_can_zero(void *h) { return 1; }

static int fm_pread(void *h, void *buf, uint32_t n, uint64_t off, uint32_t f) {
  memcpy(buf, mem + off, n);
  return 0;
}
static int fm_pwrite(void *h, const void *buf, uint32_t n, uint64_t off, uint32_t f) {
  memcpy(mem + off, buf, n);
  return 0;
}
static int fm_zero(void *h, uint32_t n, uint64_t off, uint32_t f) {
  memset(mem + off, 0, n);
  return 0;
}
static int fm_trim(void *h, uint32_t n, uint64_t off, uint32_t f) {
  memset(mem + off, 0, n);
  return 0;
}
static int fm_flush(void *h, uint32_t f) {
  if (flush_file && access(flush_file, F_OK) == 0) {
    nbdkit_error("injecting EIO into flush");
    nbdkit_set_error(EIO);
    return -1;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "faultmem",
  .config = fm_config,
  .get_ready = fm_get_ready,
  .open = fm_open,
  .get_size = fm_get_size,
  .can_multi_conn = fm_can_multi_conn,
  .can_flush = fm_can_flush,
  .can_fua = fm_can_fua,
  .can_trim = fm_can_trim,
  .can_zero = fm_can_zero,
  .pread = fm_pread,
  .pwrite = fm_pwrite,
  .zero = fm_zero,
  .trim = fm_trim,
  .flush = fm_flush,
};
NBDKIT_REGISTER_PLUGIN(plugin)
"#;

/// True when the faulty-disk rig can run here; otherwise skips (or fails
/// under MIRRORVOL_E2E=require).
pub fn rig_available(more_tools: &[&str]) -> bool {
    if !is_root() || !Path::new("/dev/fuse").exists() {
        super::skip_or_fail("real faulty disks need root and /dev/fuse (nbdfuse)");
        return false;
    }
    if !Path::new("/usr/include/nbdkit-plugin.h").exists() {
        super::skip_or_fail("nbdkit-plugin.h is missing (install nbdkit-plugin-dev)");
        return false;
    }
    let mut names = vec!["nbdkit", "nbdfuse", "cc", "umount", "mount"];
    names.extend(more_tools);
    super::serve::tools(&names)
}

/// Which operations of a [`RealFaultyDisk`] fail: each trigger file, while
/// it exists, makes the error filter (or the plugin, for flushes) answer
/// that operation with EIO.
const TRIGGERS: [&str; 3] = ["fail-read", "fail-write", "fail-flush"];

/// One disk that can fail, hang or be slow on demand: nbdkit (RAM disk,
/// error + pause [+ delay] filters) on a Unix socket, and nbdfuse mounting
/// the export over a regular file at [`RealFaultyDisk::path`] ("naked"
/// mount), which the group uses as a raw disk image.
///
/// Dropping it resumes the disk, heals it, unmounts the file, ends the two
/// processes it started (by their pids) and removes its control directory,
/// even when the test panicked.
pub struct RealFaultyDisk {
    /// The FUSE file: the disk image mirrorvol opens.
    pub path: PathBuf,
    /// Sockets, trigger files, pid files, the plugin's source.
    ctl: tempfile::TempDir,
    nbdkit: Option<Child>,
    nbdfuse: Option<Child>,
}

impl RealFaultyDisk {
    /// A healthy disk of `mib` MiB at `path` (created as a regular file to
    /// mount over).
    pub fn start(path: &Path, mib: u64) -> RealFaultyDisk {
        RealFaultyDisk::start_with(path, mib, None)
    }

    /// Like [`RealFaultyDisk::start`], every read, write, zero and trim
    /// delayed by `delay` (the delay filter) when given.
    pub fn start_with(path: &Path, mib: u64, delay: Option<Duration>) -> RealFaultyDisk {
        let ctl = tempfile::Builder::new()
            .prefix("mirrorvol-fault-")
            .tempdir()
            .expect("control dir");
        let c = |name: &str| ctl.path().join(name).display().to_string();
        fs::write(ctl.path().join("faultmem.c"), FAULTMEM_C).unwrap();
        let mut args: Vec<String> = vec![
            "--foreground".into(),
            "--exit-with-parent".into(),
            "--unix".into(),
            c("nbd.sock"),
            "--pidfile".into(),
            c("nbdkit.pid"),
            "--filter=error".into(),
            "--filter=pause".into(),
        ];
        if delay.is_some() {
            args.push("--filter=delay".into());
        }
        args.extend([
            "cc".into(),
            c("faultmem.c"),
            format!("size={}", mib * MIB),
            format!("flush-error-file={}", c("fail-flush")),
            format!("pause-control={}", c("pause.sock")),
        ]);
        // Per operation: reads (and cache, extents) on fail-read; writes,
        // zeroes and trims on fail-write.
        for (op, trigger) in [
            ("pread", "fail-read"),
            ("cache", "fail-read"),
            ("extents", "fail-read"),
            ("pwrite", "fail-write"),
            ("zero", "fail-write"),
            ("trim", "fail-write"),
        ] {
            args.push(format!("error-{op}=EIO"));
            args.push(format!("error-{op}-rate=100%"));
            args.push(format!("error-{op}-file={}", c(trigger)));
        }
        if let Some(d) = delay {
            for op in ["read", "write", "zero", "trim"] {
                args.push(format!("delay-{op}={}ms", d.as_millis()));
            }
        }
        let nbdkit = Command::new("nbdkit")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                fs::File::create(ctl.path().join("nbdkit.log")).unwrap(),
            ))
            .spawn()
            .expect("spawn nbdkit");
        let mut rig = RealFaultyDisk {
            path: path.to_path_buf(),
            ctl,
            nbdkit: Some(nbdkit),
            nbdfuse: None,
        };
        rig.wait_for("nbdkit.pid", "nbdkit");

        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::File::create(path).unwrap();
        let nbdfuse = Command::new("nbdfuse")
            .arg("-P")
            .arg(rig.ctl.path().join("nbdfuse.pid"))
            .arg(path)
            .arg("--unix")
            .arg(rig.ctl.path().join("nbd.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                fs::File::create(rig.ctl.path().join("nbdfuse.log")).unwrap(),
            ))
            .spawn()
            .expect("spawn nbdfuse");
        rig.nbdfuse = Some(nbdfuse);
        rig.wait_for("nbdfuse.pid", "nbdfuse");
        assert_eq!(
            fs::metadata(path).unwrap().len(),
            mib * MIB,
            "the FUSE file has the disk's size"
        );
        rig
    }

    /// Waits for a pid file the tool writes once it is ready.
    fn wait_for(&mut self, pidfile: &str, what: &str) {
        let start = Instant::now();
        while !self.ctl.path().join(pidfile).exists() {
            let child = if what == "nbdkit" {
                self.nbdkit.as_mut()
            } else {
                self.nbdfuse.as_mut()
            };
            if let Some(st) = child.unwrap().try_wait().unwrap() {
                panic!(
                    "{what} exited with {st} before it was ready:\n{}",
                    self.log(what)
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{what} not ready after 60 s:\n{}",
                self.log(what)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What nbdkit or nbdfuse printed on stderr.
    pub fn log(&self, what: &str) -> String {
        fs::read_to_string(self.ctl.path().join(format!("{what}.log"))).unwrap_or_default()
    }

    pub fn display(&self) -> String {
        self.path.display().to_string()
    }

    fn trigger(&self, names: &[&str]) {
        for n in names {
            fs::write(self.ctl.path().join(n), b"").unwrap();
        }
    }

    /// Every request fails with EIO: reads, writes, zeroes, trims, flushes.
    pub fn fail_all(&self) {
        self.trigger(&TRIGGERS);
    }

    /// Writes, zeroes and trims fail with EIO; reads and flushes work.
    pub fn fail_writes(&self) {
        self.trigger(&["fail-write"]);
    }

    /// Reads fail with EIO; writes and flushes work.
    pub fn fail_reads(&self) {
        self.trigger(&["fail-read"]);
    }

    /// Flushes fail with EIO; reads and writes work.
    pub fn fail_flushes(&self) {
        self.trigger(&["fail-flush"]);
    }

    /// No request fails any more.
    pub fn heal(&self) {
        for n in TRIGGERS {
            let _ = fs::remove_file(self.ctl.path().join(n));
        }
    }

    /// Every request from now on hangs until [`RealFaultyDisk::resume`]
    /// (the pause filter; returns once requests in flight have completed).
    pub fn pause(&self) {
        let reply = pause_control(&self.ctl.path().join("pause.sock"), b'p')
            .unwrap_or_else(|e| panic!("pause: {e}"));
        assert_eq!(reply, b'P', "the pause filter answers P");
    }

    /// Hung requests go on.
    pub fn resume(&self) {
        let reply = pause_control(&self.ctl.path().join("pause.sock"), b'r')
            .unwrap_or_else(|e| panic!("resume: {e}"));
        assert_eq!(reply, b'R', "the pause filter answers R");
    }

    /// A guard that resumes the disk when dropped. Declare it after the
    /// [`Served`] of the test, so that a panic resumes the disk before the
    /// server is killed: a process blocked in a FUSE request that was
    /// already sent cannot exit until that request is answered.
    pub fn resume_on_drop(&self) -> ResumeOnDrop {
        ResumeOnDrop(self.ctl.path().join("pause.sock"))
    }

    /// The pids this rig started (nbdkit, nbdfuse).
    pub fn pids(&self) -> Vec<u32> {
        [&self.nbdkit, &self.nbdfuse]
            .iter()
            .filter_map(|c| c.as_ref().map(Child::id))
            .collect()
    }
}

/// Sends one command to the pause filter's control socket and reads its
/// one-byte answer.
pub fn pause_control(sock: &Path, cmd: u8) -> std::io::Result<u8> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(&[cmd])?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

pub struct ResumeOnDrop(PathBuf);

impl Drop for ResumeOnDrop {
    fn drop(&mut self) {
        let _ = pause_control(&self.0, b'r');
    }
}

/// True while `path` is a mount point (listed in /proc/self/mounts).
pub fn mounted(path: &Path) -> bool {
    let want = path.display().to_string();
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
}

/// Unmounts `path`; lazily when it is still busy.
pub fn unmount(path: &Path) {
    if !mounted(path) {
        return;
    }
    let ok = Command::new("umount")
        .arg(path)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("umount").arg("-l").arg(path).status();
    }
}

/// Waits up to `secs` for a child to exit; then SIGTERM, then SIGKILL, each
/// waited for in bounded time (never blocks for good).
pub fn end_child(child: &mut Child, secs: u64) {
    let wait = |child: &mut Child, d: Duration| {
        let start = Instant::now();
        while start.elapsed() < d {
            if !matches!(child.try_wait(), Ok(None)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    if wait(child, Duration::from_secs(secs)) {
        return;
    }
    // SAFETY: kill takes integers; the pid is our own unreaped child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    if wait(child, Duration::from_secs(5)) {
        return;
    }
    let _ = child.kill();
    if !wait(child, Duration::from_secs(10)) {
        eprintln!("pid {} did not exit after SIGKILL", child.id());
    }
}

impl Drop for RealFaultyDisk {
    fn drop(&mut self) {
        let _ = pause_control(&self.ctl.path().join("pause.sock"), b'r');
        self.heal();
        unmount(&self.path);
        // nbdfuse exits once its file is unmounted (and no longer open).
        if let Some(mut c) = self.nbdfuse.take() {
            end_child(&mut c, 5);
        }
        if let Some(mut c) = self.nbdkit.take() {
            end_child(&mut c, 0);
        }
        let _ = fs::remove_file(&self.path);
    }
}

/// A real faulty disk of `mib` MiB at `SANDBOX/disks/NAME`, healthy: the
/// group's disk image NAME. Declare it before the test's [`super::serve::Served`]
/// so that it is dropped after the server has stopped.
pub fn faulty_disk(sb: &Sandbox, name: &str, mib: u64) -> RealFaultyDisk {
    RealFaultyDisk::start(&sb.path("disks").join(name), mib)
}

/// The group of [`super::serve::mirror_group`] (disks of `disk_mib` MiB, the
/// mirror `data` of `vol_mib` MiB) with b.img a real faulty disk, healthy;
/// returned, to be declared before the test's `Served`.
pub fn mirror_group_faulty_b(sb: &Sandbox, disk_mib: u64, vol_mib: u64) -> RealFaultyDisk {
    sb.image("a.img", disk_mib);
    let b = faulty_disk(sb, "b.img", disk_mib);
    super::serve::mirror_group_on(sb, vol_mib);
    b
}
