//! The control socket of `mirrorvol serve`: commands run from another
//! process against the live group, with clients connected and writing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::serve::{Served, fio_passed, fio_verify, mirror_group, mv, mv_ok, run, status, tools};
use common::{Sandbox, bin, disk, strings, volume};

/// `serve` with its control socket at `SANDBOX/ctl.sock` and its pid file
/// in `SANDBOX/run`.
fn serve(sb: &Sandbox) -> Served {
    let run_dir = sb.p("run");
    let ctl = sb.p("ctl.sock");
    Served::start_args(
        sb,
        &["--control", &ctl, "--cache", "writeback"],
        &[("MIRRORVOL_RUN_DIR", &run_dir)],
    )
}

fn group_uuid(sb: &Sandbox) -> String {
    sb.status()["group"]["uuid"].as_str().unwrap().to_string()
}

#[test]
fn status_runs_against_the_daemon_and_matches_the_schema() {
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    let uuid = group_uuid(&sb);
    let s = serve(&sb);
    let pid_file = sb.path(&format!("run/{uuid}.pid"));
    let text = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(text, format!("{}\n{}\n", s.pid(), sb.p("ctl.sock")));

    let st = status(&sb);
    assert_eq!(st["group"]["name"], "g");
    assert_eq!(st["group"]["uuid"], uuid.as_str());
    assert!(st["group"]["seqno"].is_u64());
    for d in st["disks"].as_array().unwrap() {
        for key in [
            "path",
            "uuid",
            "state",
            "controller",
            "style",
            "size",
            "free",
        ] {
            assert!(!d[key].is_null(), "disk key {key}: {d:#}");
        }
        assert_eq!(d["state"], "online");
    }
    let v = volume(&st, "data");
    for key in [
        "name", "uuid", "size", "layout", "state", "duplexed", "plexes",
    ] {
        assert!(!v[key].is_null(), "volume key {key}: {v:#}");
    }
    assert_eq!(v["state"], "healthy");
    assert_eq!(v["layout"], "mirror");
    for p in v["plexes"].as_array().unwrap() {
        assert!(
            p.get("disk").is_some()
                && p.get("state").is_some()
                && p.get("resync_percent").is_some(),
            "{p:#}"
        );
    }
    // The text view too, as offline.
    let text = mv_ok(&sb, &["status"]);
    assert!(
        text.contains("Group g") && text.contains("Healthy"),
        "{text}"
    );

    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
    assert!(
        !sb.path("ctl.sock").exists(),
        "the control socket is removed"
    );
    assert!(!pid_file.exists(), "the pid file is removed");
    // Offline again: the same command works on the disks themselves.
    assert_eq!(status(&sb)["group"]["name"], "g");
}

#[test]
fn fail_and_reactivate_online_while_a_client_writes() {
    if !tools(&["fio"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    let b = sb.p("disks/b.img");
    let s = serve(&sb);
    let fio = fio_verify(&s.uri("data"), 24, 16, 1500);
    std::thread::sleep(Duration::from_millis(800));
    let mut fio = fio;
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio ended before the disk failed; the test proves nothing"
    );
    let out = mv_ok(&sb, &["fail", &b]);
    assert_eq!(out.trim(), format!("marked disk {b} failed"));
    let st = status(&sb);
    assert_eq!(disk(&st, "b.img")["state"], "failed", "{st:#}");
    assert_eq!(volume(&st, "data")["state"], "failed-redundancy", "{st:#}");
    // The last in-sync copy is refused as offline.
    let a = sb.p("disks/a.img");
    let (code, _, err) = mv(&sb, &["fail", &a]);
    assert_eq!(code, 2, "{err}");

    fio_passed(fio);

    let out = mv_ok(&sb, &["reactivate", &b]);
    assert_eq!(out.trim(), format!("reactivated disk {b}; resync started"));
    let start = Instant::now();
    loop {
        let st = status(&sb);
        if volume(&st, "data")["state"] == "healthy" {
            assert_eq!(disk(&st, "b.img")["state"], "online");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not healthy after 60 s: {st:#}\n{}",
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("resynced"), "{log}");
    // Both plexes hold the same data.
    let out = mv_ok(&sb, &["scrub", "data", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["mismatches"], 0, "{r:#}");
}

#[test]
fn status_test_tells_a_script_when_the_live_group_needs_attention() {
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    let _s = serve(&sb);
    let (code, _, err) = mv(&sb, &["status", "--test"]);
    assert_eq!(code, 0, "a healthy group: {err}");
    let b = sb.p("disks/b.img");
    mv_ok(&sb, &["fail", &b]);
    let (code, out, err) = mv(&sb, &["status", "--test", "--json"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        out.contains("\"volumes\""),
        "the report is printed too: {out}"
    );
    assert!(
        err.contains("volume data is failed-redundancy")
            && err.contains(&format!("disk {b} is failed")),
        "{err}"
    );
}

#[test]
fn commands_not_served_online_are_refused_naming_the_daemon() {
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    let s = serve(&sb);
    let (code, _, err) = mv(&sb, &["test-mirrors", "data"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "test-mirrors reads each plex of data alone and needs the volume quiet, but mirrorvol serve (pid {}) serves it; stop it first, or compare the plexes while serving with `mirrorvol scrub data`",
            s.pid()
        )),
        "{err}"
    );
    let (code, _, err) = mv(
        &sb,
        &[
            "serve",
            "--listen",
            &format!("unix:{}", sb.p("second.sock")),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "is in use by mirrorvol serve (pid {}, control socket {})",
            s.pid(),
            sb.p("ctl.sock")
        )),
        "{err}"
    );
    // A process that opens a disk itself (here `init` without --disks)
    // meets the lock, and is told who holds it.
    let a = sb.p("disks/a.img");
    let (code, _, err) = run(Command::new(bin())
        .env_remove("MIRRORVOL_DISKS")
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .args(["init", &a, "--force"]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "mirrorvol serve (pid {}, control socket {})",
            s.pid(),
            sb.p("ctl.sock")
        )),
        "{err}"
    );
    // Nothing changed.
    assert!(volume(&status(&sb), "data")["state"] == "healthy");
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_stale_control_socket_falls_back_to_the_disks() {
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    let s = serve(&sb);
    s.signal(libc::SIGKILL);
    drop(s);
    assert!(
        Path::new(&sb.p("ctl.sock")).exists(),
        "SIGKILL leaves the socket"
    );
    // Nobody answers: the command runs on the disks, whose locks went
    // with the process.
    assert_eq!(volume(&status(&sb), "data")["state"], "healthy");
    // A new serve takes the stale socket over.
    let s = serve(&sb);
    assert_eq!(status(&sb)["group"]["name"], "g");
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
}

#[test]
fn reactivate_while_a_client_writes_leaves_the_plexes_equal() {
    if !tools(&["fio"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    let b = sb.p("disks/b.img");
    let s = serve(&sb);
    let mut fio = fio_verify(&s.uri("data"), 32, 16, 1500);
    std::thread::sleep(Duration::from_millis(700));
    mv_ok(&sb, &["fail", &b]);
    std::thread::sleep(Duration::from_millis(1000));
    mv_ok(&sb, &["reactivate", &b]);
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio ended before the disk came back; the test proves nothing"
    );
    fio_passed(fio);
    let start = Instant::now();
    while volume(&status(&sb), "data")["state"] != "healthy" {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not healthy after 60 s:\n{}",
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    let out = mv_ok(&sb, &["scrub", "data", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["mismatches"], 0, "{r:#}\n{log}");
}

/// The plex of `data` on `file`, from `status --json`.
fn plex_on(sb: &Sandbox, file: &str) -> serde_json::Value {
    let st = sb.status();
    volume(&st, "data")["plexes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["disk"].as_str().unwrap().ends_with(file))
        .unwrap_or_else(|| panic!("no plex on {file}: {st:#}"))
        .clone()
}

/// Waits until the plex of `data` on `file` passes `pred`.
fn wait_plex(sb: &Sandbox, file: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let start = Instant::now();
    loop {
        let p = plex_on(sb, file);
        if pred(&p) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{what}: {p:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_resync_is_paused_resumed_rated_and_cancelled_online() {
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 48);
    // Written whole: a resync reads (and is paced by) what was written.
    let (fill, _) = sb.data_file("fill.bin", 48 << 20, 3);
    sb.mv(&["copy", &fill, "vol:data"]).ok();
    let c = sb.image("c.img", 96);
    sb.mv(&["init", &c, "--style", "raw"]).ok();
    sb.mv(&["resync", "data", "--pause"])
        .refused("no mirrorvol serve holds the group of volume data");
    let s = Served::start_args(&sb, &["--resync-max-rate", "2M"], &[]);
    sb.mv(&["resync", "data", "--pause"])
        .refused("volume data has no copy to resync");
    sb.mv(&["resync", "data"])
        .refused("say what to do with the resync of volume data");
    sb.mv(&["resync", "nosuch", "--rate", "1M"])
        .refused("nosuch");
    sb.mv(&["add-mirror", "data", "--disk", &c]).ok();
    let pct = |p: &serde_json::Value| p["resync_percent"].as_f64().unwrap_or(0.0);
    wait_plex(&sb, "c.img", "the resync starts", |p| pct(p) > 0.0);

    // Paused: it stops at its checkpoint and stays there.
    let out = sb.mv(&["resync", "data", "--pause"]).ok().stdout;
    assert!(out.contains("paused the resync of volume data"), "{out}");
    sb.mv(&["resync", "data", "--pause"])
        .refused("paused already");
    wait_plex(&sb, "c.img", "paused in status", |p| {
        p["resync_held"] == "paused"
    });
    std::thread::sleep(Duration::from_millis(1500));
    let held = pct(&plex_on(&sb, "c.img"));
    std::thread::sleep(Duration::from_secs(2));
    let p = plex_on(&sb, "c.img");
    assert_eq!(pct(&p), held, "a paused resync does not move: {p:#}");
    assert_eq!(p["state"], "resyncing");
    assert!(held < 100.0);
    let text = sb.mv(&["status"]).ok().stdout;
    assert!(text.contains("resync paused)"), "{text}");

    // Resumed at a higher rate, from its checkpoint, to the end.
    let out = sb
        .mv(&["resync", "data", "--rate", "64M", "--resume"])
        .ok()
        .stdout;
    assert!(
        out.contains("run at 64 MiB/s") && out.contains("resumed the resync"),
        "{out}"
    );
    wait_plex(&sb, "c.img", "the resync ends", |p| p["state"] == "in-sync");
    assert_eq!(volume(&sb.status(), "data")["state"], "healthy");
    sb.mv(&["resync", "data", "--resume"])
        .refused("neither paused nor cancelled");

    // Cancelled: recorded, so a restart of serve does not resume it.
    sb.mv(&["resync", "data", "--rate", "1M"]).ok();
    sb.mv(&["remove-mirror", "data", "--disk", &c]).ok();
    sb.mv(&["add-mirror", "data", "--disk", &c]).ok();
    wait_plex(&sb, "c.img", "the second resync starts", |p| pct(p) > 0.0);
    let out = sb.mv(&["resync", "data", "--cancel"]).ok().stdout;
    assert!(out.contains("stay out of sync and are never read"), "{out}");
    wait_plex(&sb, "c.img", "cancelled in status", |p| {
        p["resync_held"] == "cancelled"
    });
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    let s = Served::start_args(&sb, &[], &[]);
    let before = plex_on(&sb, "c.img");
    assert_eq!(before["resync_held"], "cancelled", "{before:#}");
    std::thread::sleep(Duration::from_secs(2));
    let after = plex_on(&sb, "c.img");
    assert_eq!(
        pct(&after),
        pct(&before),
        "no resync after the restart: {after:#}"
    );
    assert_ne!(after["state"], "in-sync");
    // repair resyncs it: a cancel does not outlive the admin's asking.
    sb.mv(&["repair", "data"]).ok();
    wait_plex(&sb, "c.img", "repair resyncs the cancelled copy", |p| {
        p["state"] == "in-sync"
    });
    // remove-mirror frees a copy.
    sb.mv(&["remove-mirror", "data", "--disk", &c]).ok();
    let st = sb.status();
    assert_eq!(volume(&st, "data")["plexes"].as_array().unwrap().len(), 2);
    assert_eq!(volume(&st, "data")["state"], "healthy");
    drop(s);
}

#[test]
fn a_failed_disk_is_removed_online_and_the_volume_goes_on_without_it() {
    if !tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 16);
    let (a, b) = (sb.p("disks/a.img"), sb.p("disks/b.img"));
    let s = Served::start_args(&sb, &[], &[]);
    common::serve::qemu_io(&s.uri("data"), &["write -P 0x5a 0 4M", "flush"]);
    sb.mv(&["remove-disk", &a])
        .refused("is in service and holds copies of data");
    sb.mv(&["fail", &b]).ok();
    // Through the daemon, with --json: what it did and the status after.
    let out = sb.mv(&["remove-disk", &b, "--json"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let said = v["messages"][0].as_str().unwrap();
    assert!(
        said.contains("removed disk") && said.contains("its copies of data are gone"),
        "{v:#}"
    );
    assert_eq!(v["status"]["disks"].as_array().unwrap().len(), 1, "{v:#}");
    let st = sb.status();
    assert_eq!(st["disks"].as_array().unwrap().len(), 1, "{st:#}");
    assert_eq!(volume(&st, "data")["layout"], "simple");
    assert_eq!(volume(&st, "data")["state"], "healthy");
    // Clients go on: the data is read back from a.img.
    common::serve::qemu_io(&s.uri("data"), &["read -P 0x5a 0 4M"]);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    // Its labels were wiped: a new start does not see it as a member.
    sb.mv(&["examine", &b]).refused("not a mirrorvol disk");
    let s = Served::start_args(&sb, &[], &[]);
    assert_eq!(sb.status()["disks"].as_array().unwrap().len(), 1);
    drop(s);
}

#[test]
fn replace_runs_online_and_the_old_disk_leaves_once_its_copies_are_in_sync() {
    if !tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 16);
    let c = sb.image("c.img", 64);
    sb.mv(&["init", &c, "--style", "raw"]).ok();
    let a = sb.p("disks/a.img");
    let s = Served::start_args(&sb, &["--resync-max-rate", "4M"], &[]);
    common::serve::qemu_io(&s.uri("data"), &["write -P 0x3c 0 16M", "flush"]);

    // Started, then cancelled: a.img stays, the copy on c.img too.
    let out = sb.mv(&["replace", &a, &c]).ok().stdout;
    assert!(
        out.contains("leaves the group once they are in sync"),
        "{out}"
    );
    assert_eq!(disk(&sb.status(), "a.img")["replaced_by"], c.as_str());
    sb.mv(&["replace", &a, &c]).refused("is being replaced by");
    sb.mv(&["replace", &a, "--cancel"]).ok();
    assert!(disk(&sb.status(), "a.img").get("replaced_by").is_none());
    sb.mv(&["remove-mirror", "data", "--disk", &c]).ok();

    // Again, to its end, while a client reads.
    sb.mv(&["replace", &a, &c]).ok();
    // A disk being replaced takes no new copy.
    sb.mv(&["create", "x", "--size", "4M"]).ok();
    let x = volume(&sb.status(), "x")["plexes"][0]["disk"].clone();
    assert_ne!(x, a.as_str(), "a new volume on the disk being replaced");
    let text = sb.mv(&["status"]).ok().stdout;
    assert!(text.contains("being replaced by"), "{text}");
    let start = Instant::now();
    loop {
        let st = sb.status();
        let gone = !st["disks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["path"].as_str().unwrap().ends_with("/a.img"));
        if gone {
            let data = volume(&st, "data");
            assert_eq!(data["state"], "healthy", "{st:#}");
            assert_eq!(data["plexes"].as_array().unwrap().len(), 2);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "a.img never left: {st:#}"
        );
        common::serve::qemu_io(&s.uri("data"), &["read -P 0x3c 0 1M"]);
        std::thread::sleep(Duration::from_millis(200));
    }
    common::serve::qemu_io(&s.uri("data"), &["read -P 0x3c 0 16M"]);
    drop(s);
    sb.mv(&["examine", &a]).refused("not a mirrorvol disk");
}

#[test]
fn history_records_requests_through_the_daemon_with_their_caller() {
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 16);
    let s = Served::start_args(&sb, &[], &[]);
    let b = sb.p("disks/b.img");
    sb.mv(&["fail", &b]).ok();
    sb.mv(&["fail", &b]).refused("already failed");
    sb.mv(&["reactivate", &b]).ok();
    let h: serde_json::Value =
        serde_json::from_str(&sb.mv(&["history", "--json"]).ok().stdout).unwrap();
    let commands: Vec<&str> = strings(&h, "command");
    let n = commands.len();
    assert_eq!(
        commands
            .iter()
            .filter(|c| c.contains("mirrorvol fail"))
            .count(),
        1,
        "the refused fail is not recorded: {h:#}"
    );
    assert_eq!(
        &commands[n - 2..],
        [
            format!("mirrorvol fail {b} (control socket)"),
            format!("mirrorvol reactivate {b} (control socket)")
        ],
        "{h:#}"
    );
    assert_eq!(
        h[n - 1]["user"],
        "root",
        "the peer's user, from SO_PEERCRED"
    );
    drop(s);
    // Kept on the disks: read back offline.
    let text = sb.mv(&["history"]).ok().stdout;
    assert!(
        text.contains(&format!("mirrorvol reactivate {b} (control socket)")),
        "{text}"
    );
}

#[test]
fn a_copy_through_serve_shows_its_progress_in_status_and_on_a_terminal() {
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    let _s = serve(&sb);
    let (src, want) = sb.data_file("in.bin", 32 << 20, 5);
    // Run as an admin runs it, on a terminal (script(1) gives it one):
    // 32 MiB at 4 MiB/s (8 s), so that it is seen under way.
    let start = Instant::now();
    let copying = Command::new("script")
        .args([
            "-qefc",
            &format!("{} copy {src} vol:data --rate 4M", bin()),
            "/dev/null",
        ])
        .env("MIRRORVOL_DISKS", sb.disks_dir())
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script(1) from util-linux");
    // status from another shell shows the copy on the volume it writes.
    let seen = loop {
        let s = status(&sb);
        let c = &volume(&s, "data")["copy"];
        if c["done"].as_u64().is_some_and(|d| d > 0) {
            break c.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "no copy shown: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(seen["from"], src, "{seen}");
    assert_eq!(seen["to"], "volume data", "{seen}");
    assert_eq!(seen["total"], 32 << 20, "{seen}");
    let pct = seen["percent"].as_f64().unwrap();
    assert!(pct > 0.0 && pct < 100.0, "{seen}");
    let text = mv_ok(&sb, &["status"]);
    assert!(
        text.contains(&format!("(copy {src} to volume data ")),
        "{text}"
    );
    let out = copying.wait_with_output().unwrap();
    let took = start.elapsed();
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{transcript}");
    // The bar was drawn from the daemon's status, then the line it prints.
    assert!(
        transcript.contains(&format!("copy {src} to volume data [")),
        "no progress bar: {transcript:?}"
    );
    assert!(
        transcript.contains(&format!("copied 32 MiB from {src} to vol:data")),
        "{transcript:?}"
    );
    // The rate was kept: 32 MiB in chunks of 1 MiB, a quarter second each.
    assert!(took >= Duration::from_secs(7), "{took:?}");
    assert!(volume(&status(&sb), "data").get("copy").is_none());
    // And the bytes are the volume's: copied back out through serve.
    let back = sb.p("back.bin");
    mv_ok(&sb, &["copy", "vol:data", &back]);
    assert_eq!(&std::fs::read(&back).unwrap()[..32 << 20], &want[..]);
}

#[test]
fn a_copy_through_serve_stops_when_its_client_is_killed() {
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    let _s = serve(&sb);
    let (src, _) = sb.data_file("in.bin", 32 << 20, 6);
    let mut client = Command::new(bin())
        .env("MIRRORVOL_DISKS", sb.disks_dir())
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .args(["copy", &src, "vol:data", "--rate", "1M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while volume(&status(&sb), "data").get("copy").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the copy never showed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    client.kill().unwrap();
    client.wait().unwrap();
    // The daemon notices between chunks (a quarter second's worth) and
    // stops: a paced copy of 32 s does not go on for nobody.
    let killed = Instant::now();
    while let Some(c) = volume(&status(&sb), "data").get("copy").cloned() {
        assert!(
            killed.elapsed() < Duration::from_secs(3),
            "the copy went on after its client was killed: {c}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
