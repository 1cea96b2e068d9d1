//! Every operation of DESIGN.md §6 against a running `serve`, sent through
//! its control socket while NBD clients do I/O: the volumes keep serving,
//! fio's verification finds every block it wrote, and the group ends in the
//! states the operations asked for. A disk that dies under the writes is a
//! real faulty disk (`common::faulty`).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::faulty::{RealFaultyDisk, faulty_disk, rig_available};
use common::serve::{Served, fio_passed, fio_verify, mv, mv_ok, run, status, tools};
use common::{Sandbox, bin, disk, volume};

#[track_caller]
fn mv_refused(sb: &Sandbox, args: &[&str], needle: &str) -> String {
    let (code, out, err) = mv(sb, args);
    assert_eq!(
        code, 2,
        "mirrorvol {args:?} should be refused:\n{out}\n{err}"
    );
    assert!(err.contains(needle), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    err
}

/// Three raw image files (a, b, c) of 128 MiB in group `g`, with the
/// mirror `data` (32 MiB) on a and b.
fn three_disks(sb: &Sandbox) {
    for d in ["a.img", "b.img", "c.img"] {
        sb.image(d, 128);
    }
    let (a, b, c) = (
        sb.p("disks/a.img"),
        sb.p("disks/b.img"),
        sb.p("disks/c.img"),
    );
    mv_ok(sb, &["init", &a, &b, &c, "--style", "raw", "--group", "g"]);
    mv_ok(
        sb,
        &[
            "create", "data", "--size", "32M", "--mirror", "--disk", &a, "--disk", &b,
        ],
    );
}

/// `serve` with resyncs that keep a brisk pace while clients write.
fn serve(sb: &Sandbox) -> Served {
    Served::start_args(
        sb,
        &["--resync-min-rate", "200M", "--cache", "writeback"],
        &[],
    )
}

/// Waits until every plex of `name` is in sync.
#[track_caller]
fn wait_healthy(sb: &Sandbox, s: &Served, name: &str) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let st = status(sb);
        if volume(&st, name)["state"] == "healthy" {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{name} not healthy after 60 s: {st:#}\n{}",
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The disks of a volume's plexes (file names) with their states.
fn plexes(st: &serde_json::Value, name: &str) -> Vec<(String, String)> {
    volume(st, name)["plexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let d = p["disk"].as_str().unwrap();
            (
                d.rsplit('/').next().unwrap().to_string(),
                p["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn add_break_remove_fail_repair_reactivate_while_fio_verifies() {
    if !tools(&["fio", "nbdinfo", "qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    three_disks(&sb);
    let (b, c) = (sb.p("disks/b.img"), sb.p("disks/c.img"));
    let events = sb.path("events.jsonl");
    std::fs::write(
        sb.path("hook.sh"),
        format!(
            "line=$(cat)\nprintf '%s\\n' \"$line\" >> '{}'\n",
            events.display()
        ),
    )
    .unwrap();
    let hook = format!("sh '{}'", sb.p("hook.sh"));
    let s = Served::start_args(
        &sb,
        &[
            "--resync-min-rate",
            "200M",
            "--cache",
            "writeback",
            "--on-event",
            &hook,
        ],
        &[],
    );
    let mut fio = fio_verify(&s.uri("data"), 32, 8, 700);
    std::thread::sleep(Duration::from_millis(500));

    // add-mirror: a third plex, filled in the background.
    let out = mv_ok(&sb, &["add-mirror", "data", "--disk", &c]);
    assert!(out.contains("resyncs in the background"), "{out}");
    let st = wait_healthy(&sb, &s, "data");
    assert_eq!(
        plexes(&st, "data"),
        pairs(&[
            ("a.img", "in-sync"),
            ("b.img", "in-sync"),
            ("c.img", "in-sync")
        ])
    );

    // break: the plex on c becomes volume `snap`, exported at once.
    let out = mv_ok(&sb, &["break", "data", "--disk", &c, "--new-name", "snap"]);
    assert_eq!(
        out.trim(),
        format!("broke volume data: the plex on {c} is now volume snap")
    );
    let size = common::serve::ok(Command::new("nbdinfo").args(["--size", &s.uri("snap")]));
    assert_eq!(size.trim(), (32u64 << 20).to_string());
    let st = status(&sb);
    assert_eq!(volume(&st, "snap")["layout"], "simple");
    assert_eq!(plexes(&st, "snap"), pairs(&[("c.img", "in-sync")]));

    // remove-mirror: data is simple on a for a while, then mirrored again.
    mv_ok(&sb, &["remove-mirror", "data", "--disk", &b]);
    assert_eq!(plexes(&status(&sb), "data"), pairs(&[("a.img", "in-sync")]));
    mv_ok(&sb, &["add-mirror", "data", "--disk", &b]);
    wait_healthy(&sb, &s, "data");
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio ended before the operations did; the test proves nothing"
    );

    // fail + repair: the failed plex on b is replaced by a new one on c.
    mv_ok(&sb, &["fail", &b]);
    let st = status(&sb);
    assert_eq!(volume(&st, "data")["state"], "failed-redundancy");
    let out = mv_ok(&sb, &["repair", "data"]);
    assert!(out.contains(&format!("a new plex on {c}")), "{out}");
    let st = wait_healthy(&sb, &s, "data");
    assert_eq!(
        plexes(&st, "data"),
        pairs(&[("a.img", "in-sync"), ("c.img", "in-sync")])
    );

    // reactivate: b is back, holding no plex now.
    mv_ok(&sb, &["reactivate", &b]);
    let st = status(&sb);
    assert_eq!(disk(&st, "b.img")["state"], "online");

    fio_passed(fio);
    let st = status(&sb);
    assert_eq!(volume(&st, "data")["state"], "healthy", "{st:#}");
    assert_eq!(volume(&st, "snap")["state"], "healthy", "{st:#}");
    // The snapshot serves reads and writes of its own.
    common::serve::ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 0 64k",
        "-c",
        "read -P 0x5a 0 64k",
        &s.uri("snap"),
    ]));
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    // The hook saw each step, in order (progress events aside).
    let seen: Vec<String> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| {
            let e: serde_json::Value = serde_json::from_str(l).unwrap();
            let who = e["disk"].as_str().or(e["volume"].as_str()).unwrap_or("");
            format!(
                "{} {}",
                e["event"].as_str().unwrap(),
                who.rsplit('/').next().unwrap()
            )
        })
        .filter(|l| !l.starts_with("resync-progress"))
        .collect();
    assert_eq!(
        seen,
        [
            "resync-started c.img",
            "resync-finished c.img",
            "volume-healthy data",
            "resync-started b.img",
            "resync-finished b.img",
            "volume-healthy data",
            "disk-failed b.img",
            "volume-degraded data",
            "resync-started c.img",
            "resync-finished c.img",
            "volume-healthy data",
            "disk-returned b.img",
        ],
        "{log}"
    );
    // Offline, the plexes of data hold the same bytes.
    let out = mv_ok(&sb, &["scrub", "data", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["mismatches"], 0, "{r:#}\n{log}");
}

/// A client that keeps its NBD connection open until killed: nbdcopy
/// streaming the volume into a pipe nobody reads.
fn idle_client(uri: &str) -> Child {
    Command::new("sh")
        .args(["-c", &format!("nbdcopy '{uri}' - | sleep 60")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn nbdcopy")
}

use std::os::unix::process::CommandExt;

fn kill_group(child: &mut Child) {
    // SAFETY: kill takes integers; the group is the child's own.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
}

#[test]
fn create_extend_delete_and_copy_online() {
    if !tools(&["nbdinfo", "nbdcopy", "qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    three_disks(&sb);
    let s = serve(&sb);

    // create: exported at once, mirrored, zeroed.
    let out = mv_ok(&sb, &["create", "web", "--size", "8M", "--mirror"]);
    assert!(
        out.starts_with("created mirrored volume web (8 MiB) on"),
        "{out}"
    );
    common::serve::ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0 0 8M",
        "-c",
        "write -P 0x11 1M 1M",
        &s.uri("web"),
    ]));
    mv_refused(
        &sb,
        &["create", "web", "--size", "4M"],
        "volume web already exists",
    );

    // extend: a simple volume grows; a new connection sees the new size.
    mv_ok(&sb, &["create", "logs", "--size", "4M"]);
    mv_refused(
        &sb,
        &["extend", "web", "--size", "16M"],
        "a mirrored volume cannot be extended",
    );
    mv_ok(&sb, &["extend", "logs", "--size", "12M"]);
    let size = common::serve::ok(Command::new("nbdinfo").args(["--size", &s.uri("logs")]));
    assert_eq!(size.trim(), (12u64 << 20).to_string());

    // copy: out of a volume in use, into a file; back into an idle volume.
    let out_img = sb.p("web.img");
    mv_ok(&sb, &["copy", "vol:web", &out_img]);
    let bytes = std::fs::read(&out_img).unwrap();
    assert_eq!(bytes.len(), 8 << 20);
    assert!(bytes[1 << 20..2 << 20].iter().all(|b| *b == 0x11));
    assert!(bytes[..1 << 20].iter().all(|b| *b == 0));
    mv_ok(&sb, &["copy", &out_img, "vol:logs"]);
    common::serve::ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x11 1M 1M",
        &s.uri("logs"),
    ]));
    // A group disk is never a copy side.
    mv_refused(
        &sb,
        &["copy", "vol:web", &sb.p("disks/c.img")],
        "is a disk of group g",
    );

    // delete: refused while a client is connected, forced disconnects it.
    assert_eq!(volume(&status(&sb), "web")["clients"], 0);
    let mut client = idle_client(&s.uri("web"));
    let start = Instant::now();
    while volume(&status(&sb), "web")["clients"] != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nbdcopy never connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    mv_refused(
        &sb,
        &["delete", "web"],
        "volume web has 1 NBD client connected; disconnect it before deleting it, or use --force",
    );
    mv_refused(
        &sb,
        &["copy", &out_img, "vol:web"],
        "1 NBD client connected",
    );
    assert!(volume(&status(&sb), "web")["name"] == "web");
    let out = mv_ok(&sb, &["delete", "web", "--force"]);
    assert_eq!(out.trim(), "deleted volume web; disconnected 1 NBD client");
    kill_group(&mut client);
    let st = status(&sb);
    assert!(
        st["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["name"] != "web"),
        "{st:#}"
    );
    let (code, _, _) = run(Command::new("nbdinfo").args(["--size", &s.uri("web")]));
    assert_ne!(code, 0, "the deleted volume is no longer exported");
    mv_refused(&sb, &["delete", "web"], "web");

    // Split brain cannot arise while serve holds every disk.
    mv_refused(
        &sb,
        &["resolve-split-brain", "--keep", &sb.p("disks/a.img")],
        "is not in split brain",
    );
    // init joins new disks to the served group; they take plexes at once.
    let (d, e) = (sb.image("d.img", 64), sb.image("e.img", 64));
    let out = mv_ok(&sb, &["init", &d, &e, "--style", "raw"]);
    assert_eq!(
        out.trim(),
        format!("initialized {d}, {e} as raw disks of existing group g")
    );
    mv_refused(
        &sb,
        &["init", &d, "--style", "raw"],
        "is already a disk of group g",
    );
    mv_ok(
        &sb,
        &[
            "create", "fresh", "--size", "8M", "--mirror", "--disk", &d, "--disk", &e,
        ],
    );
    common::serve::ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x77 0 8M",
        "-c",
        "read -P 0x77 0 8M",
        &s.uri("fresh"),
    ]));
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    // Offline again, the config says what the daemon did.
    let st = status(&sb);
    assert_eq!(volume(&st, "logs")["size"], 12u64 << 20);
    assert_eq!(volume(&st, "data")["state"], "healthy");
    assert_eq!(volume(&st, "fresh")["state"], "healthy");
    let out = mv_ok(&sb, &["scrub", "fresh", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["mismatches"], 0, "{r:#}");
}

#[test]
fn a_disk_absent_at_start_comes_back_while_fio_verifies() {
    if !tools(&["fio"]) {
        return;
    }
    let sb = Sandbox::new();
    three_disks(&sb);
    // b is unplugged before serve starts: data serves from a alone.
    let (b, away) = (sb.path("disks/b.img"), sb.path("b.img"));
    std::fs::rename(&b, &away).unwrap();
    let s = serve(&sb);
    let st = status(&sb);
    assert_eq!(volume(&st, "data")["state"], "failed-redundancy", "{st:#}");
    let fio = fio_verify(&s.uri("data"), 24, 8, 1500);
    std::thread::sleep(Duration::from_millis(700));
    // Plugged back in; reactivate finds it, puts it in service, and
    // resyncs what it missed.
    std::fs::rename(&away, &b).unwrap();
    let b = b.display().to_string();
    let out = mv_ok(&sb, &["reactivate", &b]);
    assert_eq!(out.trim(), format!("reactivated disk {b}; resync started"));
    let st = wait_healthy(&sb, &s, "data");
    assert_eq!(disk(&st, "b.img")["state"], "online");
    fio_passed(fio);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    let out = mv_ok(&sb, &["scrub", "data", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["mismatches"], 0, "{r:#}\n{log}");
}

#[test]
fn a_last_copy_failed_before_serve_serves_again_once_reactivated() {
    if !tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    three_disks(&sb);
    let (a, b) = (sb.p("disks/a.img"), sb.p("disks/b.img"));
    let src = sb.path("fill.bin");
    std::fs::write(&src, vec![0x5cu8; 4 << 20]).unwrap();
    mv_ok(&sb, &["copy", &src.display().to_string(), "vol:data"]);
    // b fails, then a, the last copy, with --force: data is failed, and
    // serve starts with no plex of it in service.
    mv_ok(&sb, &["fail", &b]);
    mv_ok(&sb, &["fail", &a, "--force"]);
    let s = serve(&sb);
    let st = status(&sb);
    assert_eq!(volume(&st, "data")["state"], "failed", "{st:#}");
    // a comes back as it was: its in-sync plex serves again at once.
    mv_ok(&sb, &["reactivate", &a]);
    let out = common::serve::qemu_io(&s.uri("data"), &["read -P 0x5c 0 4M"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // b is resynced from it.
    mv_ok(&sb, &["reactivate", &b]);
    let st = wait_healthy(&sb, &s, "data");
    assert_eq!(disk(&st, "a.img")["state"], "online", "{st:#}");
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    let out = mv_ok(&sb, &["scrub", "data", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["mismatches"], 0, "{r:#}\n{log}");
}

#[test]
fn a_disk_that_moved_on_while_away_is_refused_as_split_brain() {
    let sb = Sandbox::new();
    three_disks(&sb);
    // b leaves; the group changes without it (serve records it missing).
    let (b, away) = (sb.path("disks/b.img"), sb.path("away/b.img"));
    std::fs::create_dir_all(sb.path("away")).unwrap();
    std::fs::rename(&b, &away).unwrap();
    mv_ok(&sb, &["create", "more", "--size", "4M"]);
    // Meanwhile b, alone, gets a config change of its own.
    run(Command::new(bin())
        .env("MIRRORVOL_DISKS", sb.path("away"))
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .args(["--force-claim", "create", "solo", "--size", "4M"]));
    let s = serve(&sb);
    std::fs::rename(&away, &b).unwrap();
    let before = sb.fingerprint();
    mv_refused(
        &sb,
        &["reactivate", &b.display().to_string()],
        "changed on its own while it was away",
    );
    assert_eq!(before, sb.fingerprint(), "a refusal changes no disk");
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
}

#[test]
fn scrub_and_repair_online_while_a_client_writes() {
    if !tools(&["fio"]) {
        return;
    }
    let sb = Sandbox::new();
    three_disks(&sb);
    // The volume is written whole first (a never-written region reads as
    // zeroes without reading a disk, and scrub does not read it either).
    let (src, _) = sb.data_file("fill.bin", 32 << 20, 5);
    sb.mv(&["copy", &src, "vol:data"]).ok();
    // Corrupt 64 KiB of the plex on b before serving: raw disks keep their
    // data area at 8 MiB, and data is the first volume on each.
    let b = sb.path("disks/b.img");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all_at(&[0xee; 65536], (8 << 20) + (20 << 20))
            .unwrap();
    }
    let s = serve(&sb);
    // fio writes only the first 16 MiB, away from the damage.
    let fio = fio_verify(&s.uri("data"), 16, 8, 1500);
    std::thread::sleep(Duration::from_millis(300));
    let out = mv_ok(&sb, &["scrub", "data", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["volume"], "data");
    assert_eq!(r["checked_bytes"], 32u64 << 20);
    assert_eq!(r["mismatches"], 1, "{r:#}");
    assert_eq!(r["repaired"], 0, "{r:#}");
    assert_eq!(r["ranges"][0]["offset"], 20u64 << 20, "{r:#}");
    assert_eq!(r["ranges"][0]["length"], 65536, "{r:#}");
    let out = mv_ok(&sb, &["scrub", "data", "--repair"]);
    assert!(out.contains("repaired"), "{out}");
    let out = mv_ok(&sb, &["scrub", "data", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["mismatches"], 0, "{r:#}");
    fio_passed(fio);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    let out = mv_ok(&sb, &["scrub", "data", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["mismatches"], 0, "{r:#}");
}

/// Two disks with the mirror `data` (32 MiB) and a hot spare `s.img`.
fn mirror_with_spare(sb: &Sandbox) {
    for d in ["a.img", "b.img", "s.img"] {
        sb.image(d, 128);
    }
    mirror_with_spare_on(sb);
}

/// [`mirror_with_spare`] with b.img a real faulty disk (healthy, 128 MiB
/// like the others); returned, to be declared before the test's `Served`.
fn mirror_with_faulty_b_and_spare(sb: &Sandbox) -> RealFaultyDisk {
    for d in ["a.img", "s.img"] {
        sb.image(d, 128);
    }
    let b = faulty_disk(sb, "b.img", 128);
    mirror_with_spare_on(sb);
    b
}

/// The group of [`mirror_with_spare`] on a.img, b.img and s.img already in
/// the disks directory.
fn mirror_with_spare_on(sb: &Sandbox) {
    let (a, b, sp) = (
        sb.p("disks/a.img"),
        sb.p("disks/b.img"),
        sb.p("disks/s.img"),
    );
    mv_ok(sb, &["init", &a, &b, "--style", "raw", "--group", "g"]);
    mv_ok(sb, &["init", &sp, "--style", "raw", "--spare"]);
    mv_ok(sb, &["create", "data", "--size", "32M", "--mirror"]);
    let st = status(sb);
    assert_eq!(disk(&st, "s.img")["spare"], true, "{st:#}");
}

#[test]
fn a_plex_that_fails_under_serve_is_rebuilt_onto_the_hot_spare() {
    if !rig_available(&["fio"]) {
        return;
    }
    let sb = Sandbox::new();
    // b.img is a real faulty disk, declared before the server so that it
    // goes after the server has stopped.
    let fault = mirror_with_faulty_b_and_spare(&sb);
    let b = fault.display();
    let s = serve(&sb);
    let fio = fio_verify(&s.uri("data"), 32, 8, 1500);
    std::thread::sleep(Duration::from_millis(500));
    // The disk dies under the writes (every I/O to b.img fails with EIO
    // from now on): the engine fails its plex, and the daemon rebuilds onto
    // the spare by itself.
    fault.fail_all();
    let start = Instant::now();
    let st = loop {
        let st = status(&sb);
        if plexes(&st, "data") == pairs(&[("a.img", "in-sync"), ("s.img", "in-sync")]) {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not rebuilt onto the spare after 60 s: {st:#}\n{}",
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(volume(&st, "data")["state"], "healthy", "{st:#}");
    assert_eq!(disk(&st, "s.img")["spare"], false, "{st:#}");
    assert_eq!(disk(&st, "b.img")["state"], "failed", "{st:#}");
    fio_passed(fio);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains(&format!(
            "hot spare {} replaces the plex of volume data on {b}",
            sb.p("disks/s.img")
        )),
        "{log}"
    );
    let out = mv_ok(&sb, &["scrub", "data", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["mismatches"], 0, "{r:#}");
}

#[test]
fn hot_spares_off_leaves_the_spare_to_repair() {
    let sb = Sandbox::new();
    mirror_with_spare(&sb);
    let b = sb.p("disks/b.img");
    let s = Served::start_args(
        &sb,
        &["--resync-min-rate", "200M", "--hot-spares", "off"],
        &[],
    );
    mv_ok(&sb, &["fail", &b]);
    std::thread::sleep(Duration::from_millis(1500));
    let st = status(&sb);
    assert_eq!(volume(&st, "data")["state"], "failed-redundancy", "{st:#}");
    assert_eq!(disk(&st, "s.img")["spare"], true, "{st:#}");
    // `repair` goes to the spare.
    let out = mv_ok(&sb, &["repair", "data"]);
    assert!(
        out.contains(&format!("a new plex on {}", sb.p("disks/s.img"))),
        "{out}"
    );
    let st = wait_healthy(&sb, &s, "data");
    assert_eq!(
        plexes(&st, "data"),
        pairs(&[("a.img", "in-sync"), ("s.img", "in-sync")])
    );
    assert_eq!(disk(&st, "s.img")["spare"], false, "{st:#}");
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
}

#[test]
fn a_resync_under_way_is_paused_for_a_break_and_stopped_by_a_remove() {
    if !tools(&["fio"]) {
        return;
    }
    let sb = Sandbox::new();
    three_disks(&sb);
    let (b, c) = (sb.p("disks/b.img"), sb.p("disks/c.img"));
    // Written whole: a resync reads only what was written.
    let (fill, _) = sb.data_file("fill.bin", 32 << 20, 3);
    mv_ok(&sb, &["copy", &fill, "vol:data"]);
    // Resyncs crawl at 2 MiB/s: a 32 MiB plex takes 16 s.
    let s = Served::start_args(
        &sb,
        &[
            "--resync-min-rate",
            "2M",
            "--resync-max-rate",
            "2M",
            "--cache",
            "writeback",
        ],
        &[],
    );
    let fio = fio_verify(&s.uri("data"), 16, 8, 1500);
    mv_ok(&sb, &["add-mirror", "data", "--disk", &c]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        plexes(&status(&sb), "data")[2],
        ("c.img".to_string(), "resyncing".to_string())
    );
    // Removing the plex being resynced stops its resync at once.
    let started = Instant::now();
    mv_ok(&sb, &["remove-mirror", "data", "--disk", &c]);
    assert!(started.elapsed() < Duration::from_secs(5));
    let st = status(&sb);
    assert_eq!(
        plexes(&st, "data"),
        pairs(&[("a.img", "in-sync"), ("b.img", "in-sync")])
    );
    assert_eq!(volume(&st, "data")["state"], "healthy", "{st:#}");
    // Breaking off another plex while a resync runs pauses it, and it
    // resumes from its checkpoint.
    mv_ok(&sb, &["add-mirror", "data", "--disk", &c]);
    std::thread::sleep(Duration::from_millis(500));
    mv_ok(&sb, &["break", "data", "--disk", &b, "--new-name", "snap"]);
    let st = status(&sb);
    assert_eq!(
        plexes(&st, "data"),
        pairs(&[("a.img", "in-sync"), ("c.img", "resyncing")]),
        "{st:#}"
    );
    let start = Instant::now();
    loop {
        let st = status(&sb);
        let p = volume(&st, "data")["plexes"][1]["resync_percent"].as_f64();
        if p.is_some_and(|p| p > 0.0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the resync did not resume: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    fio_passed(fio);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
}
