//! Split brain through the binary: each disk of a mirror served alone and
//! written, then both assembled together. Status names both sides and what
//! each changed; writes and `serve` are refused; `resolve-split-brain
//! --keep` keeps one side and resyncs the other from it, copying only the
//! regions either side changed.

mod common;

use common::serve::{self, Served};
use common::*;
use std::fs;
use std::process::Command;

const VOL_MIB: u64 = 32;

/// Serves the group with only `alone` in the disks directory (the other
/// disk moved away) and writes `len` bytes of `byte` at `offset` with
/// qemu-io.
fn write_alone(sb: &Sandbox, alone: &str, other: &str, offset: u64, len: u64, byte: u8) {
    fs::create_dir_all(sb.path("away")).unwrap();
    fs::rename(
        sb.path(&format!("disks/{other}")),
        sb.path(&format!("away/{other}")),
    )
    .unwrap();
    // One disk of two is no majority: the admin forces the claim.
    let s = Served::start(sb, &[], &[("MIRRORVOL_FORCE_CLAIM", "1")]);
    serve::ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &s.uri("data"),
        "-c",
        &format!("write -P {byte} {offset} {len}"),
    ]));
    let (code, err) = s.stop();
    assert_eq!(code, 0, "serve of {alone} alone:\n{err}");
    fs::rename(
        sb.path(&format!("away/{other}")),
        sb.path(&format!("disks/{other}")),
    )
    .unwrap();
}

/// The split side (in `status --json`) that holds disk `file`.
fn side<'a>(s: &'a serde_json::Value, file: &str) -> &'a serde_json::Value {
    s["split_brain"]
        .as_array()
        .unwrap_or_else(|| panic!("no split_brain in status: {s:#}"))
        .iter()
        .find(|side| {
            side["disks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d.as_str().unwrap().ends_with(file))
        })
        .unwrap_or_else(|| panic!("no side holds {file}: {s:#}"))
}

fn copied_bytes(stdout: &str) -> u64 {
    stdout
        .split("copied ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no copied bytes in: {stdout}"))
}

/// A mirror `data` of base data whose disks were each written alone: a.img
/// 1 MiB of 0xa1 at 4 MiB, b.img 2 MiB of 0xb2 at 16 MiB. Returns the base
/// data.
fn split_group(sb: &Sandbox) -> (String, Vec<u8>) {
    // 64 KiB regions: the sides' sizes below are counted in them.
    serve::mirror_group_64k(sb, 80, VOL_MIB);
    let (base, want) = sb.data_file("base.bin", (VOL_MIB * MIB) as usize, 1);
    sb.mv(&["copy", &base, "vol:data"]).ok();

    // a alone writes 1 MiB at 4 MiB; b alone writes 2 MiB at 16 MiB.
    write_alone(sb, "a.img", "b.img", 4 * MIB, MIB, 0xa1);
    write_alone(sb, "b.img", "a.img", 16 * MIB, 2 * MIB, 0xb2);
    (base, want)
}

#[test]
fn split_brain_is_reported_refused_and_resolved_by_keeping_one_side() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    let (base, mut want) = split_group(&sb);

    let s = sb.status();
    assert_eq!(s["split_brain"].as_array().unwrap().len(), 2, "{s:#}");
    let region = 64 * 1024;
    for (file, bytes) in [("a.img", MIB), ("b.img", 2 * MIB)] {
        let v = &side(&s, file)["volumes"][0];
        assert_eq!(v["name"], "data");
        assert_eq!(v["bytes"], bytes, "side of {file}: {s:#}");
        assert_eq!(v["regions"], bytes / region, "side of {file}: {s:#}");
    }
    let vol = volume(&s, "data");
    assert_eq!(vol["state"], "failed");
    assert_eq!(vol["split_brain"], true);
    let text = sb.mv(&["status"]).ok().stdout;
    assert!(text.contains("SPLIT BRAIN"), "{text}");
    assert!(text.contains("16 regions changed (1 MiB)"), "{text}");
    assert!(text.contains("32 regions changed (2 MiB)"), "{text}");

    // Nothing that writes runs, and nothing on disk changes.
    let before = sb.fingerprint();
    let r = sb
        .mv(&["copy", &base, "vol:data"])
        .refused("resolve-split-brain");
    assert!(
        r.stderr.contains("a.img") && r.stderr.contains("b.img"),
        "{}",
        r.stderr
    );
    sb.mv(&["scrub", "data", "--repair"])
        .refused("resolve-split-brain");
    sb.mv(&["serve", "--listen", &format!("unix:{}", sb.p("x.sock"))])
        .refused("resolve-split-brain");
    sb.mv(&["resolve-split-brain", "--keep", &sb.p("elsewhere.img")])
        .refused("not a disk of either side");
    assert_eq!(sb.fingerprint(), before, "a refusal changed a disk");

    // Keep a's side: its 1 MiB stays, b's 2 MiB goes.
    let r = sb
        .mv(&["resolve-split-brain", "--keep", &sb.p("disks/a.img")])
        .ok();
    let copied = copied_bytes(&r.stdout);
    assert!(
        (3 * MIB..=3 * MIB + 2 * region).contains(&copied),
        "copied {copied} bytes for 3 MiB changed on the two sides:\n{}",
        r.stdout
    );
    let s = sb.status();
    assert!(s.get("split_brain").is_none(), "{s:#}");
    assert_eq!(volume(&s, "data")["state"], "healthy", "{s:#}");
    want[(4 * MIB) as usize..(5 * MIB) as usize].fill(0xa1);
    assert!(sb.read_volume("data") == want, "the volume is a's side");
    // b's plex alone holds the same.
    sb.mv(&["fail", &sb.p("disks/a.img")]).ok();
    assert!(sb.read_volume("data") == want, "b's plex holds a's side");
    sb.mv(&["reactivate", &sb.p("disks/a.img")]).ok();
    assert_eq!(volume(&sb.status(), "data")["state"], "healthy");

    sb.mv(&["resolve-split-brain", "--keep", &sb.p("disks/a.img")])
        .refused("no split brain");
}

#[test]
fn keeping_the_other_side_undoes_the_first_sides_writes() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    let (_, mut want) = split_group(&sb);
    let r = sb
        .mv(&["resolve-split-brain", "--keep", &sb.p("disks/b.img")])
        .ok();
    let copied = copied_bytes(&r.stdout);
    assert!(
        (3 * MIB..=3 * MIB + 128 * 1024).contains(&copied),
        "copied {copied} bytes:\n{}",
        r.stdout
    );
    want[(16 * MIB) as usize..(18 * MIB) as usize].fill(0xb2);
    assert!(sb.read_volume("data") == want, "the volume is b's side");
    sb.mv(&["fail", &sb.p("disks/b.img")]).ok();
    assert!(sb.read_volume("data") == want, "a's plex holds b's side");
}

#[test]
fn a_side_whose_bitmap_cannot_vouch_gets_a_full_resync() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    let (_, mut want) = split_group(&sb);
    // Damage the bitmap header of b.img (a raw disk: the member is the
    // whole file).
    let layout = mirrorvol::format::Layout::for_member(0, 80 * MIB).unwrap();
    let b = sb.path("disks/b.img");
    let mut head = read_range(&b, layout.bitmap_offset(), 64);
    head[20] ^= 0xff;
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all_at(&head, layout.bitmap_offset()).unwrap();
    }
    let s = sb.status();
    let v = &side(&s, "b.img")["volumes"][0];
    assert!(v["regions"].is_null(), "{s:#}");
    assert!(v["unknown"].as_str().unwrap().contains("damaged"), "{s:#}");
    assert_eq!(side(&s, "a.img")["volumes"][0]["bytes"], MIB);
    let r = sb
        .mv(&["resolve-split-brain", "--keep", &sb.p("disks/a.img")])
        .ok();
    assert_eq!(copied_bytes(&r.stdout), VOL_MIB * MIB, "{}", r.stdout);
    assert!(r.stdout.contains("full resync"), "{}", r.stdout);
    want[(4 * MIB) as usize..(5 * MIB) as usize].fill(0xa1);
    sb.mv(&["fail", &sb.p("disks/a.img")]).ok();
    assert!(sb.read_volume("data") == want, "b's plex holds a's side");
}
