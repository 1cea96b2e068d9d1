//! Trust nothing (issue 11): a copy of a disk taken earlier is never served
//! as current, and one group has one writer, across processes and hosts.
//!
//! Scenarios with real parts: image files copied back over a disk (a
//! rolled-back image, a restored snapshot), `serve` stopped and started
//! around the swap, and two "hosts" sharing disks: every disk is one file
//! exported by nbdkit, and each host reaches it through its own nbdkit
//! (`nbd` plugin behind the `pause` filter, to cut that host's link) and its
//! own nbdfuse mount, with its own host id and run directory. File locks
//! cannot see across them: only the claim on the disks does.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::faulty::{end_child, pause_control, rig_available, unmount};
use common::serve::{self, Served, qemu_io};
use common::{MIB, Sandbox, disk, volume};

/// The plex states of a volume, by disk file name.
fn plex_states(s: &serde_json::Value, name: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = volume(s, name)["plexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let path = p["disk"].as_str().unwrap();
            let file = Path::new(path).file_name().unwrap().to_string_lossy();
            (file.into_owned(), p["state"].as_str().unwrap().to_string())
        })
        .collect();
    out.sort();
    out
}

fn copy_file(from: &Path, to: &Path) {
    // `cp --sparse=always`: a snapshot of a sparse image stays sparse.
    serve::ok(Command::new("cp").arg("--sparse=always").arg(from).arg(to));
}

fn group(sb: &Sandbox, files: &[&str], vol_mib: u64) {
    let paths: Vec<String> = files.iter().map(|f| sb.image(f, 64)).collect();
    let mut init = vec!["init"];
    init.extend(paths.iter().map(|s| s.as_str()));
    init.extend(["--style", "raw", "--group", "g"]);
    sb.mv(&init).ok();
    let copies = files.len().to_string();
    sb.mv(&[
        "create",
        "data",
        "--size",
        &format!("{vol_mib}M"),
        "--mirror",
        "--copies",
        &copies,
    ])
    .ok();
}

#[test]
fn a_rolled_back_copy_is_stale_and_resynced_in_full() {
    let sb = Sandbox::new();
    group(&sb, &["a.img", "b.img"], 16);
    let (v1, _) = sb.data_file("v1.bin", 16 << 20, 1);
    let (v2, want) = sb.data_file("v2.bin", 16 << 20, 2);
    sb.mv(&["copy", &v1, "vol:data"]).ok();
    copy_file(&sb.path("disks/b.img"), &sb.path("b.old"));
    sb.mv(&["copy", &v2, "vol:data"]).ok();
    // b is rolled back to the image taken between the two copies: its
    // config and bitmap say all is well.
    copy_file(&sb.path("b.old"), &sb.path("disks/b.img"));

    let r = sb.mv(&["status", "--json"]).ok();
    let s: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        plex_states(&s, "data"),
        [
            ("a.img".into(), "in-sync".into()),
            ("b.img".into(), "stale".into())
        ],
        "{s:#}"
    );
    assert_eq!(volume(&s, "data")["state"], "failed-redundancy");
    assert!(
        r.stderr.contains("b.img") && r.stderr.contains("older than generation"),
        "{}",
        r.stderr
    );
    // Reads come from a alone: every block is v2.
    assert!(sb.read_volume("data") == want, "the volume reads v2");

    let r = sb.mv(&["repair", "data"]).ok();
    assert!(r.stdout.contains("full resync"), "{}", r.stdout);
    assert!(r.stdout.contains("rolled back"), "{}", r.stdout);
    assert_eq!(volume(&sb.status(), "data")["state"], "healthy");
    // b's plex alone holds v2 now.
    sb.mv(&["fail", &sb.p("disks/a.img")]).ok();
    assert!(sb.read_volume("data") == want, "b's plex holds v2");
    sb.mv(&["reactivate", &sb.p("disks/a.img")]).ok();
    assert_eq!(volume(&sb.status(), "data")["state"], "healthy");
}

#[test]
fn a_restored_snapshot_of_one_disk_of_a_three_way_mirror_is_stale() {
    let sb = Sandbox::new();
    group(&sb, &["a.img", "b.img", "c.img"], 8);
    let (v1, _) = sb.data_file("v1.bin", 8 << 20, 3);
    let (v2, want) = sb.data_file("v2.bin", 4 << 20, 4);
    sb.mv(&["copy", &v1, "vol:data"]).ok();
    let mut expect = fs::read(&v1).unwrap();
    expect[..4 << 20].copy_from_slice(&want);
    copy_file(&sb.path("disks/c.img"), &sb.path("c.snap"));
    sb.mv(&["copy", &v2, "vol:data"]).ok();
    copy_file(&sb.path("c.snap"), &sb.path("disks/c.img"));

    let s = sb.status();
    assert_eq!(
        plex_states(&s, "data"),
        [
            ("a.img".into(), "in-sync".into()),
            ("b.img".into(), "in-sync".into()),
            ("c.img".into(), "stale".into())
        ],
        "{s:#}"
    );
    assert!(sb.read_volume("data") == expect);
    let r = sb.mv(&["repair", "data"]).ok();
    assert!(r.stdout.contains("onto"), "{}", r.stdout);
    // c alone holds the volume as written.
    sb.mv(&["fail", &sb.p("disks/a.img")]).ok();
    sb.mv(&["fail", &sb.p("disks/b.img")]).ok();
    assert!(sb.read_volume("data") == expect, "c's plex holds v2");
}

/// Serves the group, runs one qemu-io command on `data`, stops cleanly.
fn serve_and_write(sb: &Sandbox, cmd: &str) {
    let s = Served::start(sb, &[], &[]);
    qemu_io(&s.uri("data"), &[cmd]);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
}

#[test]
fn a_rolled_back_copy_swapped_under_a_stopped_serve_is_never_read() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    group(&sb, &["a.img", "b.img"], 8);
    serve_and_write(&sb, "write -P 0x11 0 8M");
    copy_file(&sb.path("disks/b.img"), &sb.path("b.old"));
    serve_and_write(&sb, "write -P 0x22 0 8M");
    copy_file(&sb.path("b.old"), &sb.path("disks/b.img"));

    // Served again: b's plex is stale from the start and resynced in the
    // background; no read returns b's old bytes.
    let s = Served::start(&sb, &[], &[]);
    let out = qemu_io(&s.uri("data"), &["read -P 0x22 0 8M"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let st = serve::wait_status(&sb, &s, 60, "the stale plex resynced", |st| {
        volume(st, "data")["state"] == "healthy"
    });
    assert_eq!(volume(&st, "data")["state"], "healthy");
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("older than generation"), "{log}");
    sb.mv(&["fail", &sb.p("disks/a.img")]).ok();
    let s = Served::start(&sb, &[], &[]);
    let out = qemu_io(&s.uri("data"), &["read -P 0x22 0 8M"]);
    assert!(
        !out.contains("Pattern verification failed"),
        "b holds v2: {out}"
    );
    s.stop();
}

#[test]
fn a_snapshot_taken_while_serving_is_caught_once_idle_and_written_again() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    group(&sb, &["a.img", "b.img"], 8);
    let s = Served::start(&sb, &[], &[]);
    qemu_io(&s.uri("data"), &["write -P 0x11 0 8M"]);
    // A snapshot of b while serving (its page cache is what cp reads).
    copy_file(&sb.path("disks/b.img"), &sb.path("b.snap"));
    // Idle for longer than the idle period, then written: a new
    // generation the snapshot lacks.
    std::thread::sleep(Duration::from_secs(7));
    qemu_io(&s.uri("data"), &["write -P 0x33 0 1M"]);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    copy_file(&sb.path("b.snap"), &sb.path("disks/b.img"));
    let st = sb.status();
    assert_eq!(
        plex_states(&st, "data")[1],
        ("b.img".into(), "stale".into()),
        "{st:#}"
    );
}

#[test]
fn a_minority_of_the_disks_claims_only_when_forced() {
    let sb = Sandbox::new();
    group(&sb, &["a.img", "b.img"], 8);
    fs::create_dir_all(sb.path("away")).unwrap();
    fs::rename(sb.path("disks/b.img"), sb.path("away/b.img")).unwrap();
    let before = sb.fingerprint();
    let r = sb
        .mv(&["create", "x", "--size", "1M"])
        .refused("--force-claim");
    assert!(r.stderr.contains("1 of its 2 disks"), "{}", r.stderr);
    assert_eq!(sb.fingerprint(), before, "a refused claim writes nothing");
    // Reading needs no claim.
    sb.read_volume("data");
    assert_eq!(sb.fingerprint(), before);
    sb.mv(&["--force-claim", "create", "x", "--size", "1M"])
        .ok();
    // b is recorded missing now: a is the whole group in service.
    sb.mv(&["create", "y", "--size", "1M"]).ok();
    let s = sb.status();
    assert_eq!(disk(&s, "b.img")["state"], "missing", "{s:#}");
}

/// Disks shared by two hosts (see the module's top).
struct Shared {
    ctl: PathBuf,
    names: Vec<String>,
    children: Vec<Child>,
    mounts: Vec<PathBuf>,
}

impl Shared {
    fn start(sb: &Sandbox, names: &[&str], mib: u64) -> Shared {
        let ctl = sb.path("shared");
        fs::create_dir_all(ctl.join("store")).unwrap();
        let mut me = Shared {
            ctl: ctl.clone(),
            names: names.iter().map(|n| n.to_string()).collect(),
            children: Vec::new(),
            mounts: Vec::new(),
        };
        for n in names {
            let store = ctl.join("store").join(n);
            fs::File::create(&store)
                .unwrap()
                .set_len(mib * MIB)
                .unwrap();
            me.spawn(
                "nbdkit",
                &[
                    "--foreground",
                    "--exit-with-parent",
                    "--unix",
                    &me.c(&format!("{n}.sock")),
                    "--pidfile",
                    &me.c(&format!("{n}.pid")),
                    "file",
                    &store.display().to_string(),
                ],
                &format!("{n}.pid"),
            );
        }
        for host in [1, 2] {
            let dir = sb.path(&format!("host{host}"));
            fs::create_dir_all(&dir).unwrap();
            for n in names {
                let link = format!("h{host}-{n}");
                me.spawn(
                    "nbdkit",
                    &[
                        "--foreground",
                        "--exit-with-parent",
                        "--unix",
                        &me.c(&format!("{link}.sock")),
                        "--pidfile",
                        &me.c(&format!("{link}.pid")),
                        "--filter=pause",
                        "nbd",
                        &format!("socket={}", me.c(&format!("{n}.sock"))),
                        &format!("pause-control={}", me.c(&format!("{link}.pause"))),
                    ],
                    &format!("{link}.pid"),
                );
                let file = dir.join(n);
                fs::File::create(&file).unwrap();
                me.mounts.push(file.clone());
                me.spawn(
                    "nbdfuse",
                    &[
                        "-P",
                        &me.c(&format!("{link}.fuse.pid")),
                        &file.display().to_string(),
                        "--unix",
                        &me.c(&format!("{link}.sock")),
                    ],
                    &format!("{link}.fuse.pid"),
                );
            }
        }
        me
    }

    fn c(&self, name: &str) -> String {
        self.ctl.join(name).display().to_string()
    }

    fn spawn(&mut self, tool: &str, args: &[&str], pidfile: &str) {
        let child = Command::new(tool)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {tool}: {e}"));
        self.children.push(child);
        let start = Instant::now();
        while !self.ctl.join(pidfile).exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{tool} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Cuts (`b'p'`) or restores (`b'r'`) one host's link to every disk.
    fn link(&self, host: u32, cmd: u8) {
        for n in &self.names {
            pause_control(Path::new(&self.c(&format!("h{host}-{n}.pause"))), cmd)
                .expect("pause control");
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        for host in [1, 2] {
            for n in &self.names {
                let _ = pause_control(Path::new(&self.c(&format!("h{host}-{n}.pause"))), b'r');
            }
        }
        for m in &self.mounts {
            unmount(m);
        }
        // The mounts first (nbdfuse exits once unmounted), then the servers.
        for c in self.children.iter_mut().rev() {
            end_child(c, 2);
        }
    }
}

/// The environment of one host: its disks, run directory and host id.
fn host(sb: &Sandbox, h: u32) -> Vec<(String, String)> {
    let run = sb.path(&format!("run{h}"));
    fs::create_dir_all(&run).unwrap();
    vec![
        ("MIRRORVOL_DISKS".into(), sb.p(&format!("host{h}"))),
        ("MIRRORVOL_RUN_DIR".into(), run.display().to_string()),
        (
            "MIRRORVOL_HOST_ID_FILE".into(),
            sb.p(&format!("host-id-{h}")),
        ),
    ]
}

/// `mirrorvol ARGS` as host `h`: (exit code, stdout, stderr, time taken).
fn on(sb: &Sandbox, h: u32, args: &[&str]) -> (i32, String, String, Duration) {
    let start = Instant::now();
    let (code, out, err) = serve::run(Command::new(common::bin()).envs(host(sb, h)).args(args));
    (code, out, err, start.elapsed())
}

fn serve_on(sb: &Sandbox, h: u32) -> Served {
    let env = host(sb, h);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Served::start_with(sb, &["--io-timeout", "2s"], &[], &env)
}

fn shared_group(sb: &Sandbox) -> Option<Shared> {
    if !rig_available(&["qemu-io"]) {
        return None;
    }
    let shared = Shared::start(sb, &["a.img", "b.img"], 64);
    let (a, b) = (sb.p("host1/a.img"), sb.p("host1/b.img"));
    let (code, _, err, _) = on(sb, 1, &["init", &a, &b, "--style", "raw", "--group", "g"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err, _) = on(sb, 1, &["create", "data", "--size", "8M", "--mirror"]);
    assert_eq!(code, 0, "{err}");
    Some(shared)
}

#[test]
fn a_second_host_is_refused_while_the_holder_lives_and_takes_over_when_it_dies() {
    let sb = Sandbox::new();
    let Some(_shared) = shared_group(&sb) else {
        return;
    };
    let s = serve_on(&sb, 1);
    // Host 2 sees the claim renewed: refused within a few seconds, by name.
    let (code, _, err, took) = on(&sb, 2, &["create", "x", "--size", "1M"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("in use by mirrorvol serve") && err.contains("being renewed"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
    let (code, _, err, _) = on(
        &sb,
        2,
        &["serve", "--listen", &format!("unix:{}", sb.p("h2.sock"))],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("being renewed"), "{err}");

    // The holder dies without releasing: host 2 watches the claim for the
    // holder's fence time, sees no renewal and takes the group over.
    s.signal(libc::SIGKILL);
    let (st, _) = s.ended(Duration::from_secs(20));
    assert!(!st.success());
    let (code, _, err, took) = on(&sb, 2, &["create", "x", "--size", "1M"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("watching its claim"), "{err}");
    assert!(
        took >= Duration::from_secs(7),
        "taken over after {took:?}, before the holder's fence time"
    );
    // Released at its end: host 1 claims at once.
    let (code, _, err, took) = on(&sb, 1, &["delete", "x"]);
    assert_eq!(code, 0, "{err}");
    assert!(took < Duration::from_secs(3), "{took:?}: {err}");
}

#[test]
fn a_holder_cut_from_its_disks_fences_itself_before_another_host_takes_over() {
    let sb = Sandbox::new();
    let Some(shared) = shared_group(&sb) else {
        return;
    };
    let s = serve_on(&sb, 1);
    qemu_io(&s.uri("data"), &["write -P 0x11 0 8M"]);
    // Host 1's link to both disks is cut; host 2 claims at once.
    shared.link(1, b'p');
    let (data, want) = sb.data_file("h2.bin", 8 << 20, 9);
    let (code, _, err, _) = on(&sb, 2, &["copy", &data, "vol:data"]);
    assert_eq!(code, 0, "{err}");
    // By the time host 2 wrote, host 1 had stopped all its I/O.
    let log = s.stderr();
    assert!(
        log.contains("could not be renewed on a majority"),
        "host 1 did not fence itself:\n{log}"
    );
    shared.link(1, b'r');
    let (st, log) = s.ended(Duration::from_secs(30));
    assert!(!st.success(), "{log}");
    assert!(log.contains("fenced itself"), "{log}");
    // Host 2's data stands.
    let out = sb.path("out.bin");
    let (code, _, err, _) = on(&sb, 2, &["copy", "vol:data", &out.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(fs::read(&out).unwrap() == want, "host 2's data");
}
