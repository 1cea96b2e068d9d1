//! `test-mirrors`: each plex alone, exported read-only over NBD, is checked
//! by a real client (nbdcopy, e2fsck, nbdinfo, qemu-io) or compared with
//! the others; a corrupted copy is named; no disk byte ever changes.

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};

use common::serve::{Served, tools};
use common::{MIB, Sandbox, pattern, plex_start};
use serde_json::Value;

/// Three raw 64 MiB disks a, b, c in one group.
fn three_disks(sb: &Sandbox) {
    for d in ["a.img", "b.img", "c.img"] {
        sb.image(d, 64);
    }
    let disks: Vec<String> = ["a.img", "b.img", "c.img"]
        .iter()
        .map(|d| sb.p(&format!("disks/{d}")))
        .collect();
    let mut args = vec!["init"];
    args.extend(disks.iter().map(String::as_str));
    args.extend(["--style", "raw", "--group", "g"]);
    sb.mv(&args).ok();
}

/// A mirror NAME of SIZE with a plex on each of `files`.
fn mirror_on(sb: &Sandbox, name: &str, size: &str, files: &[&str]) {
    let disks: Vec<String> = files.iter().map(|f| sb.p(&format!("disks/{f}"))).collect();
    let mut args = vec!["create", name, "--size", size, "--mirror"];
    let copies = files.len().to_string();
    args.extend(["--copies", &copies]);
    for d in &disks {
        args.extend(["--disk", d.as_str()]);
    }
    sb.mv(&args).ok();
}

/// Where byte `offset` of volume `name` lies in the plex on `file`:
/// the disk's data area (from `examine --json`) plus the plex's extent.
fn plex_byte(sb: &Sandbox, file: &str, name: &str, offset: u64) -> u64 {
    plex_start(sb, file, name) + offset
}

/// Overwrites `len` bytes of the plex of `name` on `file` at volume offset
/// `offset`, behind mirrorvol's back (a disk that rotted).
fn corrupt(sb: &Sandbox, file: &str, name: &str, offset: u64, len: usize) {
    let at = plex_byte(sb, file, name, offset);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(sb.path("disks").join(file))
        .unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&pattern(len, 0xbad)).unwrap();
}

fn json(r: &common::Run) -> Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

/// The result and reason of the plex on `file` in a `--json` report.
fn result(report: &Value, file: &str) -> (String, String) {
    let p = report["plexes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["disk"].as_str().unwrap().ends_with(file))
        .unwrap_or_else(|| panic!("plex on {file} in {report:#}"));
    (
        p["result"].as_str().unwrap().to_string(),
        p["reason"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn healthy_mirror_passes_on_both_plexes_and_no_disk_changes() {
    let sb = Sandbox::new();
    three_disks(&sb);
    mirror_on(&sb, "data", "20M", &["a.img", "b.img"]);
    let (src, data) = sb.data_file("in.bin", 5 * MIB as usize + 4096, 11);
    sb.mv(&["copy", &src, "vol:data"]).ok();
    let before = sb.fingerprint();

    let r = sb.mv(&["test-mirrors", "data"]).ok();
    for d in ["a.img", "b.img"] {
        assert!(
            r.stdout
                .contains(&format!("plex on {}: pass", sb.p(&format!("disks/{d}")))),
            "{}",
            r.stdout
        );
    }
    assert!(
        r.stdout.contains("2 passed, 0 failed, 0 skipped"),
        "{}",
        r.stdout
    );

    let j = json(&sb.mv(&["test-mirrors", "data", "--json"]).ok());
    assert_eq!(j["volume"], "data");
    assert_eq!(j["plexes"].as_array().unwrap().len(), 2);
    for p in j["plexes"].as_array().unwrap() {
        assert_eq!(p["result"], "pass");
        assert_eq!(p["state"], "in-sync");
        assert!(p["reason"].is_null());
    }
    assert_eq!(j["mismatches"], serde_json::json!([]));

    // Each export serves exactly the volume: copied out by nbdcopy, one
    // file per plex, named by the environment the command gets.
    if tools(&["nbdcopy"]) {
        let out = sb.path("out");
        fs::create_dir_all(&out).unwrap();
        let cmd = format!(
            "test \"$MIRRORVOL_VOLUME\" = data && nbdcopy {{uri}} \"{}/$(basename \"$MIRRORVOL_DISK\")\"",
            out.display()
        );
        let r = sb.mv(&["test-mirrors", "data", "--exec", &cmd]).ok();
        assert!(r.stderr.contains("[plex on "), "{}", r.stderr);
        for d in ["a.img", "b.img"] {
            let got = fs::read(out.join(d)).unwrap();
            assert_eq!(got.len() as u64, 20 * MIB, "{d}");
            assert_eq!(&got[..data.len()], &data[..], "{d}");
            assert!(got[data.len()..].iter().all(|&b| b == 0), "{d}");
        }
    }
    assert_eq!(sb.fingerprint(), before, "test-mirrors changed a disk");
}

#[test]
fn fsck_passes_on_each_plex_and_a_corrupted_copy_fails_naming_its_disk() {
    if !tools(&["nbdcopy", "mkfs.ext4", "e2fsck"]) {
        return;
    }
    let sb = Sandbox::new();
    three_disks(&sb);
    mirror_on(&sb, "data", "20M", &["a.img", "b.img"]);
    let fs_img = sb.path("fs.img");
    fs::File::create(&fs_img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let st = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&fs_img)
        .status()
        .unwrap();
    assert!(st.success());
    sb.mv(&["copy", &fs_img.display().to_string(), "vol:data"])
        .ok();
    let out = sb.p("out.img");
    let check = format!("nbdcopy {{uri}} {out} && e2fsck -fn {out}");
    let before = sb.fingerprint();

    let r = sb.mv(&["test-mirrors", "data", "--exec", &check]).ok();
    assert!(r.stdout.contains("2 passed, 0 failed"), "{}", r.stdout);
    assert!(
        r.stderr.contains("e2fsck"),
        "fsck's output is shown: {}",
        r.stderr
    );
    assert_eq!(sb.fingerprint(), before);

    // The superblock and group descriptors of b's copy rot.
    corrupt(&sb, "b.img", "data", 1024, 7 * 1024);
    let before = sb.fingerprint();
    let r = sb.mv(&["test-mirrors", "data", "--exec", &check]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let (a, b) = (sb.p("disks/a.img"), sb.p("disks/b.img"));
    assert!(
        r.stdout.contains(&format!("plex on {a}: pass")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!(
            "plex on {b}: FAIL (the command exited with status"
        )),
        "{}",
        r.stdout
    );
    let errors: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", r.stderr);
    assert!(
        errors[0].contains(&b) && !errors[0].contains(&a),
        "{}",
        errors[0]
    );
    // fsck's complaint is framed as b's.
    assert!(
        r.stderr
            .lines()
            .any(|l| l.starts_with(&format!("[plex on {b}]")) && l.contains("super")),
        "{}",
        r.stderr
    );

    let j = json(&sb.mv(&["test-mirrors", "data", "--exec", &check, "--json"]));
    assert_eq!(result(&j, "a.img").0, "pass");
    assert_eq!(result(&j, "b.img").0, "fail");
    assert_eq!(j["command"], check);
    assert_eq!(sb.fingerprint(), before, "test-mirrors changed a disk");
}

#[test]
fn comparison_names_the_mismatch_offset_and_the_copy_its_checksums_call_bad() {
    let sb = Sandbox::new();
    three_disks(&sb);
    mirror_on(&sb, "two", "8M", &["a.img", "b.img"]);
    mirror_on(&sb, "three", "8M", &["a.img", "b.img", "c.img"]);
    let (src, _) = sb.data_file("in.bin", 8 * MIB as usize, 3);
    sb.mv(&["copy", &src, "vol:two"]).ok();
    sb.mv(&["copy", &src, "vol:three"]).ok();
    let at = 5 * MIB + 4096;

    // Two copies: the range is named, and the block checksums say which
    // copy is right (no majority could).
    corrupt(&sb, "b.img", "two", at, 512);
    let (a, b) = (sb.p("disks/a.img"), sb.p("disks/b.img"));
    let before = sb.fingerprint();
    let r = sb.mv(&["test-mirrors", "two"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(&format!(
            "mismatch at offset {at}, 512 bytes: the copy on {b} does not match the block checksums; the copy on {a} does"
        )),
        "{}",
        r.stdout
    );
    let j = json(&sb.mv(&["test-mirrors", "two", "--json"]));
    assert_eq!(j["mismatches"][0]["offset"], at);
    assert_eq!(j["mismatches"][0]["length"], 512);
    assert_eq!(j["mismatches"][0]["outvoted"], serde_json::json!([b]));
    assert_eq!(j["mismatches"][0]["verdict"], "checksum");
    assert_eq!(result(&j, "a.img").0, "pass");
    let (res, why) = result(&j, "b.img");
    assert_eq!(res, "fail");
    assert!(
        why.contains("does not match the block checksums") && why.contains(&format!("offset {at}")),
        "{why}"
    );
    assert_eq!(sb.fingerprint(), before);

    // Three copies: the corrupted one is named by its checksums too, and
    // the two others hold the majority besides.
    corrupt(&sb, "c.img", "three", at, 1000);
    let before3 = sb.fingerprint();
    let r = sb.mv(&["test-mirrors", "three"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let c = sb.p("disks/c.img");
    assert!(
        r.stdout.contains(&format!(
            "mismatch at offset {at}, 1024 bytes: the copy on {c} does not match the block checksums; the copy on {a} and {b} does"
        )),
        "{}",
        r.stdout
    );
    let j = json(&sb.mv(&["test-mirrors", "three", "--json"]));
    assert_eq!(result(&j, "a.img").0, "pass");
    assert_eq!(result(&j, "b.img").0, "pass");
    let (res, why) = result(&j, "c.img");
    assert_eq!(res, "fail");
    assert!(
        why.contains("does not match the block checksums") && why.contains(&format!("offset {at}")),
        "{why}"
    );
    assert_eq!(j["mismatches"][0]["outvoted"], serde_json::json!([c]));
    assert_eq!(j["mismatches"].as_array().unwrap().len(), 1);
    assert_eq!(sb.fingerprint(), before3);
}

#[test]
fn a_plex_export_is_read_only_and_writes_through_it_fail() {
    if !tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let sb = Sandbox::new();
    three_disks(&sb);
    mirror_on(&sb, "data", "8M", &["a.img", "b.img"]);
    let (src, _) = sb.data_file("in.bin", MIB as usize, 5);
    sb.mv(&["copy", &src, "vol:data"]).ok();
    let before = sb.fingerprint();

    let r = sb
        .mv(&[
            "test-mirrors",
            "data",
            "--exec",
            "nbdinfo --json {uri} | grep -q '\"is_read_only\": true'",
        ])
        .ok();
    assert!(r.stdout.contains("2 passed"), "{}", r.stdout);

    let r = sb.mv(&[
        "test-mirrors",
        "data",
        "--exec",
        "qemu-io -f raw -c \"write -P 0xab 0 4k\" {uri}",
    ]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("0 passed, 2 failed"), "{}", r.stdout);
    // qemu sees NBD_FLAG_READ_ONLY and cannot open the export for writing.
    assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);
    assert_eq!(sb.fingerprint(), before, "a write reached a disk");
}

#[test]
fn plexes_not_in_sync_are_skipped_with_the_reason() {
    let sb = Sandbox::new();
    three_disks(&sb);
    mirror_on(&sb, "data", "8M", &["a.img", "b.img", "c.img"]);
    sb.mv(&["fail", &sb.p("disks/c.img")]).ok();
    let before = sb.fingerprint();
    let r = sb.mv(&["test-mirrors", "data"]).ok();
    let c = sb.p("disks/c.img");
    assert!(
        r.stdout.contains(&format!("plex on {c}: skipped (failed")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("2 passed, 0 failed, 1 skipped"),
        "{}",
        r.stdout
    );
    let j = json(&sb.mv(&["test-mirrors", "data", "--json"]).ok());
    assert_eq!(result(&j, "c.img").0, "skipped");
    assert_eq!(sb.fingerprint(), before);
}

#[test]
fn refusals_name_the_volume_and_change_nothing() {
    let sb = Sandbox::new();
    three_disks(&sb);
    mirror_on(&sb, "data", "8M", &["a.img", "b.img"]);
    sb.mv(&[
        "create",
        "s",
        "--size",
        "4M",
        "--disk",
        &sb.p("disks/c.img"),
    ])
    .ok();
    let before = sb.fingerprint();
    sb.mv(&["test-mirrors", "nope"])
        .refused("volume nope does not exist");
    sb.mv(&["test-mirrors", "s"])
        .refused("volume s is simple: it has no mirrors to test");
    sb.mv(&["test-mirrors", "data", "--exec", "true"])
        .refused("names neither {uri} nor $MIRRORVOL_URI");
    assert_eq!(sb.fingerprint(), before);

    // While `serve` holds the group, the command is refused naming it.
    let served = Served::start(&sb, &[], &[]);
    sb.mv(&["test-mirrors", "data"])
        .refused("test-mirrors reads each plex of data alone and needs the volume quiet, but mirrorvol serve (pid");
    served.stop();
}
