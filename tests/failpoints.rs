//! Named fault points (issue 10): `serve` built with the `failpoints`
//! feature crashes (abort, as a power cut) where FAILPOINTS says, at the
//! moments in-process fault wrappers and real disks cannot pick: between a
//! config commit and the engines' change, in the middle of a bitmap write,
//! at a resync checkpoint. Each scenario restarts the group after the crash
//! and proves it comes back whole: nothing acknowledged lost, the plexes
//! equal, the config's word kept.
//!
//! `cargo nextest run --features failpoints --test failpoints` (in
//! `.ci/run`); without the feature this file is empty.
#![cfg(feature = "failpoints")]

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::serve::*;
use common::*;

fn crash_at(point: &str) -> [(&'static str, String); 1] {
    [("FAILPOINTS", format!("{point}=return"))]
}

fn start_crashing(sb: &Sandbox, args: &[&str], point: &str) -> Served {
    let env = crash_at(point);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Served::start_args(sb, args, &env)
}

#[track_caller]
fn crashed_at(s: Served, point: &str, limit: Duration) {
    let (status, log) = s.ended(limit);
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{log}");
    assert!(
        log.contains(&format!("fault point {point}: crashing")),
        "{log}"
    );
}

fn scrub_clean(sb: &Sandbox, volume: &str) {
    let out = mv_ok(sb, &["scrub", volume, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).expect("scrub --json");
    assert_eq!(report["mismatches"], 0, "{out}");
}

/// A disk fails (its file is truncated under `serve`), the config records
/// it, and the process dies before the engines hear of it. After a restart
/// the config's word holds (the disk failed, the volume degraded but
/// served) and every byte written before is read back.
#[test]
fn a_crash_between_a_config_commit_and_the_engines_change_keeps_the_configs_word() {
    if !tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 16);
    let s = start_crashing(&sb, &[], "live-commit-before-engine");
    qemu_io(&s.uri("data"), &["write -P 0x42 0 4M", "flush"]);
    let b = sb.path("disks/b.img");
    fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    crashed_at(s, "live-commit-before-engine", Duration::from_secs(15));
    // The file back at its size (its data past 1 MiB gone, as the config
    // says: failed).
    fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let s = Served::start(&sb, &[], &[]);
    let st = status(&sb);
    assert_eq!(disk(&st, "b.img")["state"], "failed", "{st:#}");
    assert_eq!(volume(&st, "data")["state"], "failed-redundancy", "{st:#}");
    qemu_io(&s.uri("data"), &["read -P 0x42 0 4M"]);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
}

/// The first write to a clean region sets its bit: the process dies with
/// the bit blocks written and neither the header nor the flush done. The
/// group comes back: assembled, resynced where the bits say, the plexes
/// equal, new writes served.
#[test]
fn a_crash_in_the_middle_of_a_bitmap_write_leaves_a_group_that_comes_back_equal() {
    if !tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 16);
    let s = start_crashing(&sb, &[], "bitmap-mid-write");
    // Not acknowledged: the server dies under it.
    let _ = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x17 0 64k", &s.uri("data")])
        .output()
        .unwrap();
    crashed_at(s, "bitmap-mid-write", Duration::from_secs(15));
    let s = Served::start(&sb, &[], &[]);
    qemu_io(
        &s.uri("data"),
        &["write -P 0x33 1M 1M", "read -P 0x33 1M 1M"],
    );
    let st = status(&sb);
    assert_eq!(volume(&st, "data")["state"], "healthy", "{st:#}");
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    scrub_clean(&sb, "data");
}

/// A new mirror is being built at 2 MiB/s; the process dies just after the
/// resync recorded a checkpoint. The next `serve` resumes the copy from the
/// checkpoint and finishes it: the mirror healthy, the plexes equal, the
/// data as written.
#[test]
fn a_crash_at_a_resync_checkpoint_resumes_and_ends_with_equal_plexes() {
    if !tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    sb.image("a.img", 64);
    sb.image("b.img", 64);
    let (a, b) = (sb.p("disks/a.img"), sb.p("disks/b.img"));
    mv_ok(&sb, &["init", &a, &b, "--style", "raw", "--group", "g"]);
    mv_ok(&sb, &["create", "data", "--size", "24M", "--disk", &a]);
    let (src, data) = sb.data_file("in.bin", 24 * MIB as usize, 11);
    mv_ok(&sb, &["copy", &src, "vol:data"]);
    let s = start_crashing(
        &sb,
        &["--resync-min-rate", "2M", "--resync-max-rate", "2M"],
        "resync-checkpoint",
    );
    mv_ok(&sb, &["add-mirror", "data", "--disk", &b]);
    crashed_at(s, "resync-checkpoint", Duration::from_secs(30));
    // The checkpoint is on the disks: the copy resumes from there.
    let st = status(&sb);
    let plex = volume(&st, "data")["plexes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["disk"].as_str().unwrap().ends_with("b.img"))
        .unwrap()
        .clone();
    assert_eq!(plex["state"], "resyncing", "{st:#}");
    let done = plex["resync_percent"].as_f64().unwrap();
    assert!(done > 0.0 && done < 100.0, "{st:#}");
    let s = Served::start(&sb, &[], &[]);
    let start = Instant::now();
    loop {
        let st = status(&sb);
        if volume(&st, "data")["state"] == "healthy" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the resync did not finish after the restart: {st:#}\n{}",
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    scrub_clean(&sb, "data");
    assert_eq!(sb.read_volume("data"), data);
}
