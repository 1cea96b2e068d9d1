//! `mirrorvol serve` in the background for a test: started on a Unix socket
//! in the sandbox, ready once it has printed its "serving" line, and
//! stopped (SIGTERM, then SIGKILL if it lingers) when the guard drops.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Sandbox, bin};

/// A group of two raw image files with one mirrored volume `data`.
pub fn mirror_group(sb: &Sandbox, disk_mib: u64, vol_mib: u64) {
    sb.image("a.img", disk_mib);
    sb.image("b.img", disk_mib);
    mirror_group_on(sb, vol_mib);
}

/// The group of [`mirror_group`] on the disks `a.img` and `b.img` already
/// in the disks directory (ordinary files or real faulty disks).
pub fn mirror_group_on(sb: &Sandbox, vol_mib: u64) {
    mirror_group_with(sb, vol_mib, &[]);
}

/// [`mirror_group`] with 64 KiB write-intent regions, for a test that
/// counts regions of writes smaller than the default's 1 MiB.
pub fn mirror_group_64k(sb: &Sandbox, disk_mib: u64, vol_mib: u64) {
    sb.image("a.img", disk_mib);
    sb.image("b.img", disk_mib);
    mirror_group_with(sb, vol_mib, &["--region-size", "64K"]);
}

/// [`mirror_group_on`] with more arguments for `init`.
pub fn mirror_group_with(sb: &Sandbox, vol_mib: u64, init: &[&str]) {
    let (a, b) = (sb.p("disks/a.img"), sb.p("disks/b.img"));
    let mut args = vec!["init", &a, &b, "--style", "raw", "--group", "g"];
    args.extend_from_slice(init);
    sb.mv(&args).ok();
    sb.mv(&[
        "create",
        "data",
        "--size",
        &format!("{vol_mib}M"),
        "--mirror",
    ])
    .ok();
}

pub struct Served {
    child: Option<Child>,
    pub sock: PathBuf,
    stderr: Arc<Mutex<String>>,
    /// The listener lines printed at start-up ("... on ADDR").
    pub addrs: Vec<String>,
}

impl Served {
    /// Serves the sandbox's group on `SANDBOX/nbd.sock` (and `extra`
    /// listeners), with `env` set.
    pub fn start(sb: &Sandbox, extra: &[&str], env: &[(&str, &str)]) -> Served {
        let args: Vec<&str> = extra.iter().flat_map(|l| ["--listen", l]).collect();
        Served::start_args(sb, &args, env)
    }

    /// Serves like [`Served::start`], with `args` added to `serve`'s
    /// command line (each `--listen` in them is waited for too).
    pub fn start_args(sb: &Sandbox, args: &[&str], env: &[(&str, &str)]) -> Served {
        Served::start_with(sb, &[], args, env)
    }

    /// Serves like [`Served::start_args`], with the global options `global`
    /// (such as `--io-timeout 2`) before the `serve` subcommand.
    pub fn start_with(
        sb: &Sandbox,
        global: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Served {
        let sock = sb.path("nbd.sock");
        let mut cmd = Command::new(bin());
        // The pid file and default control socket stay in the sandbox.
        cmd.env("MIRRORVOL_DISKS", sb.disks_dir())
            .env("MIRRORVOL_RUN_DIR", sb.path("run"))
            .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
            .args(global)
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mirrorvol serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut s = Served {
            child: Some(child),
            sock,
            stderr,
            addrs: Vec::new(),
        };
        let want = 1 + args.iter().filter(|a| **a == "--listen").count();
        let start = Instant::now();
        loop {
            let text = s.stderr();
            let lines: Vec<String> = text
                .lines()
                .filter(|l| l.starts_with("serving "))
                .map(|l| l.rsplit(" on ").next().unwrap().to_string())
                .collect();
            if lines.len() >= want {
                s.addrs = lines;
                break;
            }
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("serve exited with {st} before it was ready:\n{text}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "serve not ready after 30 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// The NBD URI of a volume.
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.sock.display())
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill takes integers; the pid is our own child's.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM, then waits; returns the exit code and stderr.
    pub fn stop(mut self) -> (i32, String) {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve did not stop within 60 s:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the stderr reader catch the last lines.
        std::thread::sleep(Duration::from_millis(50));
        (status.code().unwrap_or(-1), self.stderr())
    }

    /// Waits (at most `limit`) for the server to end by itself, as at a
    /// crash; returns how it ended and its stderr.
    #[track_caller]
    pub fn ended(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve did not end within {limit:?}:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(50));
        (status, self.stderr())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            // A thread of the server blocked in a request a hung disk never
            // answers (a FUSE file whose server is paused) keeps even a
            // killed process from exiting: give up after a while rather
            // than hang the test.
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if !matches!(c.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("serve (pid {}) did not exit 20 s after SIGKILL", c.id());
        }
    }
}

/// Runs a command; returns (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let o = cmd.output().expect("run a tool");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs a command that must succeed; returns stdout.
#[track_caller]
pub fn ok(cmd: &mut Command) -> String {
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "{cmd:?} failed:\nstdout:\n{out}\nstderr:\n{err}");
    out
}

/// True when every tool is installed; otherwise skips (or fails under
/// MIRRORVOL_E2E=require).
pub fn tools(names: &[&str]) -> bool {
    for n in names {
        if !super::have_tool(n) {
            super::skip_or_fail(&format!("{n} is not installed"));
            return false;
        }
    }
    true
}

/// `mirrorvol ARGS` with the sandbox's disks and run directory (as
/// [`Sandbox::mv`]); returns (exit code, stdout, stderr).
pub fn mv(sb: &Sandbox, args: &[&str]) -> (i32, String, String) {
    let r = sb.mv(args);
    (r.code, r.stdout, r.stderr)
}

/// `mirrorvol ARGS` that must succeed; returns stdout.
#[track_caller]
pub fn mv_ok(sb: &Sandbox, args: &[&str]) -> String {
    let (code, out, err) = mv(sb, args);
    assert_eq!(code, 0, "mirrorvol {args:?}:\n{out}\n{err}");
    out
}

/// `status --json`, parsed (from the daemon while one serves the group).
#[track_caller]
pub fn status(sb: &Sandbox) -> serde_json::Value {
    serde_json::from_str(&mv_ok(sb, &["status", "--json"])).expect("status --json is JSON")
}

/// Polls [`status`] (from the daemon `s`) until `pred` holds, for at most
/// `secs` seconds; returns that status.
#[track_caller]
pub fn wait_status(
    sb: &Sandbox,
    s: &Served,
    secs: u64,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    poll_status(
        secs,
        Duration::from_millis(50),
        what,
        || status(sb),
        pred,
        || s.stderr(),
    )
}

/// Takes a status report with `fetch` every `every` until `pred` holds, for
/// at most `secs` seconds (then fails, with the report and `log()`);
/// returns that report.
#[track_caller]
pub fn poll_status(
    secs: u64,
    every: Duration,
    what: &str,
    fetch: impl Fn() -> serde_json::Value,
    pred: impl Fn(&serde_json::Value) -> bool,
    log: impl Fn() -> String,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let st = fetch();
        if pred(&st) {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what}: not so after {secs} s: {st:#}\n{}",
            log()
        );
        std::thread::sleep(every);
    }
}

/// fio writing `mib` MiB of a volume over NBD at random, 4 KiB blocks,
/// `iodepth` deep and at most `iops` a second, with crc32c verification;
/// started in the background so that it is still running when the test
/// acts. Check its end with [`fio_passed`]. (The job's name must not end
/// in "verify": fio prints "NAME: (g=0)", and `fio_passed` looks for
/// "verify:" to find verification errors.)
pub fn fio_verify(uri: &str, mib: u32, iodepth: u32, iops: u32) -> Child {
    fio_verify_command(uri, mib, iodepth, iops)
        .spawn()
        .expect("spawn fio")
}

/// The command [`fio_verify`] runs, for callers that add options.
pub fn fio_verify_command(uri: &str, mib: u32, iodepth: u32, iops: u32) -> Command {
    let mut fio = Command::new("fio");
    fio.args([
        "--name=mirror",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        &format!("--iodepth={iodepth}"),
        &format!("--size={mib}M"),
        &format!("--rate_iops={iops}"),
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--do_verify=1",
        "--randrepeat=0",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    fio
}

/// Waits for a [`fio_verify`] job: it succeeded, with no I/O error and no
/// verification failure.
#[track_caller]
pub fn fio_passed(fio: Child) {
    let o = fio.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "fio failed:\n{out}\n{err}");
    assert!(
        out.contains("err= 0") && !out.contains("verify:"),
        "{out}\n{err}"
    );
}

/// `qemu-io -f raw URI -c CMD...`, which must succeed, every command of
/// it (qemu-io exits 0 after a failed command, saying so); returns stdout.
#[track_caller]
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let out = ok(Command::new("qemu-io")
        .args(["-f", "raw", uri])
        .args(cmds.iter().flat_map(|c| ["-c", c])));
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

/// `status --json` of the group whose disks are `disks`, parsed.
#[track_caller]
pub fn status_on(sb: &Sandbox, disks: &str) -> serde_json::Value {
    serde_json::from_str(&sb.mv_on(disks, &["status", "--json"]).ok().stdout)
        .expect("status --json is JSON")
}

/// Polls [`status_on`] every 200 ms until `pred` holds, for at most `secs`
/// seconds; returns that status.
#[track_caller]
pub fn wait_status_on(
    sb: &Sandbox,
    disks: &str,
    secs: u64,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    poll_status(
        secs,
        Duration::from_millis(200),
        what,
        || status_on(sb, disks),
        pred,
        String::new,
    )
}
