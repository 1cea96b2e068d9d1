//! `serve --on-event CMD`: a hook script written by the test records every
//! event it is run for (the JSON line on its stdin and its MIRRORVOL_*
//! environment), while real clients do I/O over NBD and the disks are
//! failed and reactivated through the control socket, or fail for real
//! under a write (a real faulty disk, `common::faulty`).

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::faulty::{mirror_group_faulty_b, rig_available};
use common::serve::{self, Served, fio_passed, fio_verify, mirror_group, mv_ok, qemu_io, status};
use common::{MIB, Sandbox, corrupt, disk, volume};

/// Writes `SANDBOX/hook.sh`: it appends its stdin to `events.jsonl` and
/// `EVENT|GROUP|VOLUME|DISK|PERCENT|SIDE1` from its environment to
/// `env.log`, then runs `tail` (shell). Returns the `--on-event` command.
fn hook(sb: &Sandbox, tail: &str) -> String {
    let script = format!(
        r#"line=$(cat)
printf '%s\n' "$line" >> '{events}'
printf '%s|%s|%s|%s|%s|%s\n' "$MIRRORVOL_EVENT" "$MIRRORVOL_GROUP" "$MIRRORVOL_VOLUME" "$MIRRORVOL_DISK" "$MIRRORVOL_PERCENT" "$MIRRORVOL_SIDE1" >> '{env}'
{tail}
"#,
        events = sb.p("events.jsonl"),
        env = sb.p("env.log"),
    );
    fs::write(sb.path("hook.sh"), script).unwrap();
    format!("sh '{}'", sb.p("hook.sh"))
}

/// The events the hook received, parsed.
fn received(sb: &Sandbox) -> Vec<serde_json::Value> {
    fs::read_to_string(sb.path("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

fn kinds(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until the hook has received an event of `kind`.
#[track_caller]
fn wait_for_event(sb: &Sandbox, s: &Served, kind: &str) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        let events = received(sb);
        if events.iter().any(|e| e["event"] == kind) {
            return events;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no {kind} event after 60 s; received {:?}\n{}",
            kinds(&events),
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `serve` with a control socket in the sandbox and the hook.
fn serve_with_hook(sb: &Sandbox, on_event: &str, more: &[&str]) -> Served {
    let ctl = sb.p("ctl.sock");
    let mut args = vec![
        "--control",
        &ctl,
        "--cache",
        "writeback",
        "--on-event",
        on_event,
    ];
    args.extend(more);
    Served::start_args(sb, &args, &[])
}

#[test]
fn fail_and_reactivate_while_a_client_writes_run_the_hook_in_order() {
    if !serve::tools(&["fio"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    let b = sb.p("disks/b.img");
    let s = serve_with_hook(&sb, &hook(&sb, ""), &[]);
    let mut fio = fio_verify(&s.uri("data"), 24, 16, 1500);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio ended before the disk failed; the test proves nothing"
    );
    mv_ok(&sb, &["fail", &b]);
    wait_for_event(&sb, &s, "volume-degraded");
    fio_passed(fio);
    mv_ok(&sb, &["reactivate", &b]);
    let events = wait_for_event(&sb, &s, "volume-healthy");
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");

    let all = kinds(&events);
    let main: Vec<&str> = all
        .iter()
        .map(String::as_str)
        .filter(|k| *k != "resync-progress")
        .collect();
    assert_eq!(
        main,
        [
            "disk-failed",
            "volume-degraded",
            "disk-returned",
            "resync-started",
            "resync-finished",
            "volume-healthy"
        ],
        "{all:?}\n{log}"
    );
    // Progress comes between start and finish, at 10 % steps, ascending.
    let started = all.iter().position(|k| k == "resync-started").unwrap();
    let finished = all.iter().position(|k| k == "resync-finished").unwrap();
    let percents: Vec<u64> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["event"] == "resync-progress")
        .map(|(i, e)| {
            assert!(started < i && i < finished, "{all:?}");
            e["percent"].as_u64().unwrap()
        })
        .collect();
    assert!(
        percents.windows(2).all(|w| w[0] < w[1])
            && percents
                .iter()
                .all(|p| p % 10 == 0 && (10..=90).contains(p)),
        "{percents:?}"
    );

    let by_kind = |k: &str| events.iter().find(|e| e["event"] == k).unwrap();
    for e in &events {
        assert_eq!(e["group"], "g", "{e}");
        assert!(e["time"].as_f64().unwrap() > 1.6e9, "{e}");
    }
    let failed = by_kind("disk-failed");
    assert_eq!(failed["disk"], b.as_str(), "{failed}");
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["previous"], "online");
    let degraded = by_kind("volume-degraded");
    assert_eq!(degraded["volume"], "data");
    assert_eq!(degraded["state"], "failed-redundancy");
    assert_eq!(degraded["previous"], "healthy");
    assert_eq!(by_kind("disk-returned")["disk"], b.as_str());
    assert_eq!(by_kind("disk-returned")["state"], "online");
    for k in ["resync-started", "resync-finished"] {
        let e = by_kind(k);
        assert_eq!(e["volume"], "data", "{e}");
        assert_eq!(e["disk"], b.as_str(), "{e}");
        assert!(e["bytes"].is_u64(), "{e}");
    }
    assert_eq!(by_kind("volume-healthy")["state"], "healthy");

    // The environment carried the same fields, event by event.
    let env = fs::read_to_string(sb.path("env.log")).unwrap();
    let env: Vec<Vec<&str>> = env.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(env.len(), events.len(), "{env:?}");
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for (e, line) in events.iter().zip(&env) {
        assert_eq!(line[0], text(&e["event"]), "{e} / {line:?}");
        assert_eq!(line[1], text(&e["group"]), "{e} / {line:?}");
        assert_eq!(line[2], text(&e["volume"]), "{e} / {line:?}");
        assert_eq!(line[3], text(&e["disk"]), "{e} / {line:?}");
        assert_eq!(line[4], text(&e["percent"]), "{e} / {line:?}");
    }
}

/// Whether a process runs (a zombie, dead but not reaped by whoever
/// inherited it, does not).
fn alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": the state follows the last ')'.
    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
    !state.starts_with('Z') && !state.starts_with('X')
}

#[test]
fn a_slow_hook_and_a_failing_hook_stall_no_io_and_are_warned_about() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    let b = sb.p("disks/b.img");
    // disk-failed: the hook hangs (killed at the 10 s limit); every
    // other event: it fails.
    let on_event = hook(
        &sb,
        &format!(
            r#"echo $$ >> '{}'
case "$MIRRORVOL_EVENT" in disk-failed) sleep 60 ;; *) exit 1 ;; esac"#,
            sb.p("pids")
        ),
    );
    let s = serve_with_hook(&sb, &on_event, &["--on-event-timeout", "10"]);
    mv_ok(&sb, &["fail", &b]);
    wait_for_event(&sb, &s, "disk-failed");
    let hook_pid: i32 = {
        let start = Instant::now();
        loop {
            if let Some(p) = fs::read_to_string(sb.path("pids"))
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse().ok())
            {
                break p;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no hook pid");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // While the hook hangs: NBD writes complete, flushed, and the control
    // socket answers.
    qemu_io(
        &s.uri("data"),
        &["write -P 0x5a 0 8M", "flush", "read -P 0x5a 0 8M"],
    );
    let st = status(&sb);
    assert_eq!(volume(&st, "data")["state"], "failed-redundancy");
    assert!(
        alive(hook_pid),
        "the hook ended before the I/O did; the test proves nothing"
    );

    // Then the slow hook is killed and the next one fails: both warned.
    let start = Instant::now();
    let want = [
        "warning: the --on-event hook for disk-failed did not finish within 10 s; it was killed",
        "warning: the --on-event hook for volume-degraded exited with status 1",
    ];
    while !want.iter().all(|w| s.stderr().contains(w)) {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "no warnings:\n{}",
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive(hook_pid), "the slow hook was killed");
    assert_eq!(
        kinds(&received(&sb)),
        ["disk-failed", "volume-degraded"],
        "{}",
        s.stderr()
    );
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
}

#[test]
fn serve_of_a_split_group_runs_the_hook_with_both_sides_before_refusing() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 80, 32);
    // Each disk served alone and written: the group is split.
    for (alone, other, byte) in [("a.img", "b.img", 0xa1), ("b.img", "a.img", 0xb2)] {
        fs::create_dir_all(sb.path("away")).unwrap();
        let (home, away) = (
            sb.path(&format!("disks/{other}")),
            sb.path(&format!("away/{other}")),
        );
        fs::rename(&home, &away).unwrap();
        let s = Served::start(&sb, &[], &[("MIRRORVOL_FORCE_CLAIM", "1")]);
        qemu_io(&s.uri("data"), &[&format!("write -P {byte} 0 1M")]);
        let (code, err) = s.stop();
        assert_eq!(code, 0, "serve of {alone} alone:\n{err}");
        fs::rename(&away, &home).unwrap();
    }

    let on_event = hook(&sb, "");
    let r = sb
        .mv(&[
            "serve",
            "--listen",
            &format!("unix:{}", sb.p("x.sock")),
            "--on-event",
            &on_event,
        ])
        .refused("resolve-split-brain");
    let events = received(&sb);
    assert_eq!(kinds(&events), ["split-brain"], "{}", r.stderr);
    let e = &events[0];
    assert_eq!(e["group"], "g");
    let mut sides: Vec<String> = ["side1", "side2"]
        .iter()
        .map(|k| {
            let disks = e[k].as_array().unwrap_or_else(|| panic!("{k}: {e}"));
            assert_eq!(disks.len(), 1, "{e}");
            disks[0].as_str().unwrap().to_string()
        })
        .collect();
    sides.sort();
    assert_eq!(sides, [sb.p("disks/a.img"), sb.p("disks/b.img")], "{e}");
    // Every side, however many, is in `sides`.
    let mut all: Vec<&str> = e["sides"]
        .as_array()
        .unwrap_or_else(|| panic!("sides: {e}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    all.sort();
    assert_eq!(all, sides, "{e}");
    let reason = e["reason"].as_str().unwrap();
    assert!(
        reason.contains("is split") && reason.contains("resolve-split-brain"),
        "{reason}"
    );
    assert!(r.stderr.contains(reason), "{}", r.stderr);
    // Its environment names a side's disks too.
    let env = fs::read_to_string(sb.path("env.log")).unwrap();
    let fields: Vec<&str> = env.trim_end().split('|').collect();
    assert_eq!(fields[0], "split-brain");
    assert!(fields[5].ends_with(".img"), "{env}");
}

#[test]
fn a_background_scrub_runs_the_hook_for_each_mismatching_range() {
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 4);
    let (src, _) = sb.data_file("fill.bin", (4 * MIB) as usize, 7);
    sb.mv(&["copy", &src, "vol:data"]).ok();
    // Flip 4 KiB of b.img's plex at volume offset 3 MiB.
    corrupt(&sb, "b.img", "data", 3 * MIB, 4096);

    let ctl = sb.p("ctl.sock");
    let on_event = hook(&sb, "");
    let s = Served::start_args(
        &sb,
        &[
            "--control",
            &ctl,
            "--on-event",
            &on_event,
            "--scrub-interval",
            "1",
            "--scrub-rate",
            "64M",
        ],
        &[("MIRRORVOL_LOG", "warn")],
    );
    let events = wait_for_event(&sb, &s, "scrub-mismatch");
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    let e = events
        .iter()
        .find(|e| e["event"] == "scrub-mismatch")
        .unwrap();
    assert_eq!(e["group"], "g");
    assert_eq!(e["volume"], "data");
    assert_eq!(e["offset"], 3 * MIB, "{e}");
    assert_eq!(e["length"], 4096, "{e}");
    let mut disks: Vec<&str> = e["plexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    disks.sort();
    assert_eq!(disks, [sb.p("disks/a.img"), sb.p("disks/b.img")], "{e}");
    assert!(e["kept"].is_string() && e["outvoted"].is_array(), "{e}");
    // The event is in the log too (MIRRORVOL_LOG=warn: stderr).
    assert!(
        log.contains("WARN") && log.contains(r#"{"event":"scrub-mismatch""#),
        "{log}"
    );
    // Nothing else happened to the group.
    assert!(
        events.iter().all(|e| e["event"] == "scrub-mismatch"),
        "{:?}",
        kinds(&events)
    );
}

#[test]
fn a_disk_that_fails_under_a_write_runs_the_hook_from_the_engine() {
    if !rig_available(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    // b.img is a real faulty disk, declared before the server so that it
    // goes after the server has stopped.
    let fault = mirror_group_faulty_b(&sb, 96, 32);
    let b = fault.display();
    let ctl = sb.p("ctl.sock");
    let on_event = hook(&sb, "");
    let s = Served::start_args(&sb, &["--control", &ctl, "--on-event", &on_event], &[]);
    // Nothing has failed yet: the disk fails on the write below, not before.
    let st = status(&sb);
    assert_eq!(disk(&st, "b.img")["state"], "online", "{st:#}");
    assert!(received(&sb).is_empty(), "{:?}", kinds(&received(&sb)));
    // Every I/O to b.img fails with EIO from now on (in effect on return).
    fault.fail_all();
    qemu_io(&s.uri("data"), &["write -P 7 0 1M", "flush"]);
    wait_for_event(&sb, &s, "volume-degraded");
    // Stopped first, so every event queued has reached the hook.
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    let events = received(&sb);
    // The plex failed on the write; b.img then failed the config write of
    // that change, so the same commit took the disk out of service.
    assert_eq!(kinds(&events), ["disk-failed", "volume-degraded"], "{log}");
    assert_eq!(events[0]["disk"], b.as_str());
    assert_eq!(events[1]["volume"], "data");
    assert_eq!(events[1]["state"], "failed-redundancy");
}
