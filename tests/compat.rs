//! Images written by released format versions must still open. Each version
//! keeps a small group under tests/data (gzip-compressed image files): a
//! mirror across a GPT and an MBR disk, and a simple volume on a raw disk,
//! each filled with a pattern that names its sectors.

mod common;

use common::*;
use std::fs;
use std::process::Command;

/// The pattern the images were filled with: each 512-byte sector repeats
/// "mirrorvol v1 NAME sector NNNNNNNN\n".
fn sector_pattern(name: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for i in 0..len / 512 {
        let line = format!("mirrorvol v1 {name} sector {i:08}\n");
        let sector: Vec<u8> = line.bytes().cycle().take(512).collect();
        out.extend_from_slice(&sector);
    }
    out
}

fn unpack_v1(sb: &Sandbox) {
    fs::create_dir_all(sb.path("disks")).unwrap();
    for style in ["gpt", "mbr", "raw"] {
        let src = format!(
            "{}/tests/data/v1-{style}.img.gz",
            env!("CARGO_MANIFEST_DIR")
        );
        let out = Command::new("gzip").args(["-dc", &src]).output().unwrap();
        assert!(out.status.success(), "gzip -dc {src}: {out:?}");
        fs::write(sb.path(&format!("disks/v1-{style}.img")), out.stdout).unwrap();
    }
}

#[test]
fn format_v1_images_still_open_with_their_data() {
    let sb = Sandbox::new();
    unpack_v1(&sb);
    let s = sb.status();
    assert_eq!(s["group"]["name"], "compat");
    assert_eq!(s["disks"].as_array().unwrap().len(), 3);
    for style in ["gpt", "mbr", "raw"] {
        let d = disk(&s, &format!("v1-{style}.img"));
        assert_eq!(d["state"], "online");
        assert_eq!(d["style"], style);
    }
    let m = volume(&s, "mirror");
    assert_eq!(m["state"], "healthy");
    assert_eq!(m["layout"], "mirror");
    assert_eq!(volume(&s, "simple")["state"], "healthy");
    assert_eq!(sb.read_volume("mirror"), sector_pattern("mirror", 2 << 20));
    assert_eq!(sb.read_volume("simple"), sector_pattern("simple", 1 << 20));
    let r = sb
        .mv_plain(&["examine", &sb.p("disks/v1-gpt.img"), "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["label"]["version"], 1);
}

#[test]
fn format_v1_images_accept_changes() {
    let sb = Sandbox::new();
    unpack_v1(&sb);
    sb.mv(&["break", "mirror", "--disk", &sb.p("disks/v1-mbr.img")])
        .ok();
    assert_eq!(
        sb.read_volume("mirror-broken"),
        sector_pattern("mirror", 2 << 20)
    );
    sb.mv(&["delete", "simple"]).ok();
    sb.mv(&["add-mirror", "mirror", "--disk", &sb.p("disks/v1-raw.img")])
        .ok();
    assert_eq!(volume(&sb.status(), "mirror")["state"], "healthy");
}
