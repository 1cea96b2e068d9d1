//! The disk backends behind `--io-engine`: io_uring and worker threads
//! each serve a real client and say which one runs each disk, and a
//! process the kernel refuses io_uring falls back to threads and says so
//! once.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::serve::{Served, mirror_group};
use common::{Sandbox, disk, have_tool, is_root, plex_read, skip_or_fail};

#[test]
fn each_engine_serves_fio_verify_and_status_names_it() {
    if !have_tool("fio") {
        return skip_or_fail("fio is not installed");
    }
    for engine in ["uring", "threads"] {
        let sb = Sandbox::new();
        mirror_group(&sb, 64, 32);
        let s = Served::start_with(&sb, &["--io-engine", engine], &["--cache", "none"], &[]);
        let out = Command::new("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={}", s.uri("data")),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--size=32M",
                "--verify=crc32c",
                // No verify state file left in the working directory.
                "--verify_state_save=0",
                "--do_verify=1",
                "--randrepeat=0",
            ])
            .output()
            .expect("run fio");
        assert!(
            out.status.success(),
            "fio verify on {engine}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let st = sb.status();
        for file in ["a.img", "b.img"] {
            assert_eq!(disk(&st, file)["io_engine"], engine, "{st:#}");
        }
        drop(s);
        // Every write reached both plexes.
        let len = 32 << 20;
        assert_eq!(
            plex_read(&sb, "a.img", "data", 0, len),
            plex_read(&sb, "b.img", "data", 0, len),
            "the plexes differ after fio on {engine}"
        );
    }
}

/// Puts `kernel.io_uring_disabled` back as it was.
struct Sysctl(String);

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/io_uring_disabled", &self.0);
    }
}

#[test]
fn io_uring_refused_by_the_kernel_falls_back_to_threads_and_says_so_once() {
    let knob = "/proc/sys/kernel/io_uring_disabled";
    if !is_root() || !have_tool("setpriv") {
        return skip_or_fail("needs root and setpriv");
    }
    let Ok(before) = std::fs::read_to_string(knob) else {
        return skip_or_fail("this kernel has no kernel.io_uring_disabled");
    };
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 32);
    // An unprivileged user may use the sandbox and its disks.
    for p in [
        sb.p(""),
        sb.p("disks"),
        sb.p("disks/a.img"),
        sb.p("disks/b.img"),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    // 1: io_uring only for processes with CAP_SYS_ADMIN (this suite's
    // other tests run as root and keep it).
    let _restore = Sysctl(before);
    std::fs::write(knob, "1").expect("set kernel.io_uring_disabled");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(common::bin())
        .args(["status", "--json"])
        .env("MIRRORVOL_DISKS", sb.disks_dir())
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
        .env("MIRRORVOL_IO_ENGINE", "uring")
        .env("MIRRORVOL_LOG", "warn")
        .output()
        .expect("run mirrorvol as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "status as nobody: {stderr}");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    for file in ["a.img", "b.img"] {
        assert_eq!(disk(&st, file)["io_engine"], "threads", "{st:#}");
    }
    assert_eq!(
        stderr.matches("io_uring is refused here").count(),
        1,
        "said once, not per disk:\n{stderr}"
    );
}

/// CPU time (user + system, clock ticks) a process has used.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime is the
    // 14th field of the line, stime the 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_serve_on_each_engine_uses_no_measurable_cpu() {
    for engine in ["uring", "threads"] {
        let sb = Sandbox::new();
        mirror_group(&sb, 64, 32);
        let s = Served::start_with(&sb, &["--io-engine", engine], &[], &[]);
        // Past start-up (assembly, the first claim renewal).
        std::thread::sleep(std::time::Duration::from_secs(2));
        let before = cpu_ticks(s.pid());
        std::thread::sleep(std::time::Duration::from_secs(5));
        let used = cpu_ticks(s.pid()) - before;
        // A thread spinning would use about 500 ticks in 5 s; the
        // housekeeper's checks and the claim's heartbeat use a few.
        assert!(
            used <= 25,
            "an idle serve on {engine} used {used} clock ticks of CPU in 5 s"
        );
    }
}
