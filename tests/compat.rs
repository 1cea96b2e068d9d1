//! Images written by released format versions must still open. Each version
//! keeps a small group under tests/data (gzip-compressed image files): a
//! mirror across a GPT and an MBR disk, and a simple volume on a raw disk,
//! each filled with a pattern that names its sectors.
//!
//! The v2 to v5 images come from `generate_format_images` below (ignored; run it
//! with `MIRRORVOL_COMPAT_OUT=tests/data cargo test --test compat --
//! --ignored generate` on a build whose FORMAT_VERSION is the new one).

mod common;

use common::*;
use std::fs;
use std::process::Command;

/// The format version this build writes, as `examine --json` shows it.
const CURRENT: u64 = mirrorvol::format::FORMAT_VERSION as u64;

/// The pattern the v1 images were filled with: each 512-byte sector repeats
/// "mirrorvol v1 NAME sector NNNNNNNN\n".
fn sector_pattern(name: &str, len: usize) -> Vec<u8> {
    sector_pattern_of(1, name, len)
}

/// The pattern of the images of format `version`.
fn sector_pattern_of(version: u32, name: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for i in 0..len / 512 {
        let line = format!("mirrorvol v{version} {name} sector {i:08}\n");
        let sector: Vec<u8> = line.bytes().cycle().take(512).collect();
        out.extend_from_slice(&sector);
    }
    out
}

fn unpack_v1(sb: &Sandbox) {
    unpack(sb, 1);
}

fn unpack(sb: &Sandbox, version: u32) {
    fs::create_dir_all(sb.path("disks")).unwrap();
    for style in ["gpt", "mbr", "raw"] {
        let src = format!(
            "{}/tests/data/v{version}-{style}.img.gz",
            env!("CARGO_MANIFEST_DIR")
        );
        let out = Command::new("gzip").args(["-dc", &src]).output().unwrap();
        assert!(out.status.success(), "gzip -dc {src}: {out:?}");
        fs::write(
            sb.path(&format!("disks/v{version}-{style}.img")),
            out.stdout,
        )
        .unwrap();
    }
}

fn label_version(sb: &Sandbox, file: &str) -> u64 {
    let r = sb
        .mv_plain(&["examine", &sb.p(&format!("disks/{file}")), "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v["label"]["version"].as_u64().unwrap()
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

#[test]
fn a_v1_disk_is_raised_to_the_current_version_when_first_written() {
    let sb = Sandbox::new();
    unpack_v1(&sb);
    // Reading leaves the labels at 1, and the new blocks absent.
    sb.read_volume("mirror");
    for style in ["gpt", "mbr", "raw"] {
        assert_eq!(label_version(&sb, &format!("v1-{style}.img")), 1);
    }
    let r = sb
        .mv_plain(&["examine", &sb.p("disks/v1-gpt.img"), "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["generation"], serde_json::Value::Null, "{v:#}");
    assert_eq!(v["claim"]["state"], "absent", "{v:#}");
    // The first change writes the claim: every disk of the group says the
    // current version from then on (an older build refuses them).
    sb.mv(&["delete", "simple"]).ok();
    for style in ["gpt", "mbr", "raw"] {
        assert_eq!(label_version(&sb, &format!("v1-{style}.img")), CURRENT);
    }
    let (data, bytes) = sb.data_file("w.bin", 1 << 20, 7);
    sb.mv(&["copy", &data, "vol:mirror"]).ok();
    let got = sb.read_volume("mirror");
    assert_eq!(&got[..1 << 20], &bytes[..]);
    assert_eq!(
        &got[1 << 20..],
        &sector_pattern("mirror", 2 << 20)[1 << 20..]
    );
    let s = sb.status();
    assert_eq!(volume(&s, "mirror")["state"], "healthy");
    // Both copies of the label agree; the claim was released and the
    // mirror's disks hold the same generation.
    let r = sb
        .mv_plain(&["examine", &sb.p("disks/v1-gpt.img"), "--json"])
        .ok();
    assert!(!r.stdout.contains("damaged"), "{}", r.stdout);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["claim"]["state"], "released", "{v:#}");
    let gpt = v["generation"]["counter"].as_u64().expect("a generation");
    assert!(gpt >= 1, "{v:#}");
    let r = sb
        .mv_plain(&["examine", &sb.p("disks/v1-mbr.img"), "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["generation"]["counter"].as_u64(), Some(gpt), "{v:#}");
}

#[test]
fn format_v2_images_still_open_with_their_data() {
    let sb = Sandbox::new();
    unpack(&sb, 2);
    let s = sb.status();
    assert_eq!(s["group"]["name"], "compat");
    for style in ["gpt", "mbr", "raw"] {
        let d = disk(&s, &format!("v2-{style}.img"));
        assert_eq!(d["state"], "online");
        assert_eq!(d["style"], style);
        assert_eq!(label_version(&sb, &format!("v2-{style}.img")), 2);
    }
    assert_eq!(volume(&s, "mirror")["state"], "healthy");
    assert_eq!(volume(&s, "simple")["state"], "healthy");
    assert_eq!(
        sb.read_volume("mirror"),
        sector_pattern_of(2, "mirror", 2 << 20)
    );
    assert_eq!(
        sb.read_volume("simple"),
        sector_pattern_of(2, "simple", 1 << 20)
    );
    // The mirror's plexes are equal (the bitmaps left nothing dirty).
    sb.mv(&["fail", &sb.p("disks/v2-gpt.img")]).ok();
    assert_eq!(
        sb.read_volume("mirror"),
        sector_pattern_of(2, "mirror", 2 << 20)
    );
}

#[test]
fn a_v2_group_takes_a_hot_spare_and_repairs_onto_it() {
    let sb = Sandbox::new();
    unpack(&sb, 2);
    // A group without spares keeps the config text older builds write.
    sb.mv(&["delete", "simple"]).ok();
    let r = sb
        .mv_plain(&["examine", &sb.p("disks/v2-gpt.img"), "--json"])
        .ok();
    assert!(!r.stdout.contains("spare"), "{}", r.stdout);
    let spare = sb.image("spare.img", 16);
    sb.mv(&["init", &spare, "--spare", "--controller", "c3"])
        .ok();
    let s = sb.status();
    assert_eq!(disk(&s, "spare.img")["spare"], true);
    assert_eq!(volume(&s, "mirror")["state"], "healthy");
    sb.mv(&["fail", &sb.p("disks/v2-mbr.img")]).ok();
    sb.mv(&["repair", "mirror"]).ok();
    let s = sb.status();
    assert_eq!(volume(&s, "mirror")["state"], "healthy");
    assert_eq!(disk(&s, "spare.img")["spare"], false);
    assert_eq!(
        sb.read_volume("mirror"),
        sector_pattern_of(2, "mirror", 2 << 20)
    );
    for style in ["gpt", "mbr", "raw"] {
        assert_eq!(label_version(&sb, &format!("v2-{style}.img")), CURRENT);
    }
}

#[test]
fn format_v3_images_open_with_their_generation_and_a_released_claim() {
    let sb = Sandbox::new();
    unpack(&sb, 3);
    let s = sb.status();
    assert_eq!(s["group"]["name"], "compat");
    assert!(s.get("split_brain").is_none(), "{s:#}");
    assert!(s["group"].get("held_by").is_none(), "{s:#}");
    for style in ["gpt", "mbr", "raw"] {
        let d = disk(&s, &format!("v3-{style}.img"));
        assert_eq!(d["state"], "online");
        assert_eq!(label_version(&sb, &format!("v3-{style}.img")), 3);
        let r = sb
            .mv_plain(&["examine", &sb.p(&format!("disks/v3-{style}.img")), "--json"])
            .ok();
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["claim"]["state"], "released", "{v:#}");
        assert!(v["generation"]["counter"].as_u64() >= Some(1), "{v:#}");
    }
    assert_eq!(volume(&s, "mirror")["state"], "healthy");
    // No written map before format 4: what is written is not known.
    assert!(volume(&s, "mirror").get("written").is_none(), "{s:#}");
    assert_eq!(
        sb.read_volume("mirror"),
        sector_pattern_of(3, "mirror", 2 << 20)
    );
    assert_eq!(
        sb.read_volume("simple"),
        sector_pattern_of(3, "simple", 1 << 20)
    );
    // The mirror's two plexes hold the same generation and data.
    sb.mv(&["fail", &sb.p("disks/v3-gpt.img")]).ok();
    assert_eq!(
        sb.read_volume("mirror"),
        sector_pattern_of(3, "mirror", 2 << 20)
    );
}

#[test]
fn format_v4_images_open_with_their_written_maps() {
    let sb = Sandbox::new();
    unpack(&sb, 4);
    let s = sb.status();
    for style in ["gpt", "mbr", "raw"] {
        assert_eq!(disk(&s, &format!("v4-{style}.img"))["state"], "online");
        assert_eq!(label_version(&sb, &format!("v4-{style}.img")), 4);
    }
    // The mirror was written whole (2 MiB): its map says so, on each disk.
    assert_eq!(volume(&s, "mirror")["state"], "healthy");
    assert_eq!(volume(&s, "mirror")["written"], 2u64 << 20, "{s:#}");
    for style in ["gpt", "mbr"] {
        let r = sb
            .mv_plain(&["examine", &sb.p(&format!("disks/v4-{style}.img")), "--json"])
            .ok();
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["written"]["bytes"], 2u64 << 20, "{v:#}");
        assert_eq!(v["written"]["region_size"], 64u64 << 10, "{v:#}");
    }
    assert_eq!(
        sb.read_volume("mirror"),
        sector_pattern_of(4, "mirror", 2 << 20)
    );
    assert_eq!(
        sb.read_volume("simple"),
        sector_pattern_of(4, "simple", 1 << 20)
    );
    // A new mirror of the simple volume copies what its map holds.
    let extra = sb.image("d.img", 16);
    sb.mv(&["init", &extra, "--controller", "c3"]).ok();
    sb.mv(&["add-mirror", "simple", "--disk", &extra]).ok();
    sb.mv(&["fail", &sb.p("disks/v4-raw.img")]).ok();
    assert_eq!(
        sb.read_volume("simple"),
        sector_pattern_of(4, "simple", 1 << 20)
    );
}

/// A format-4 group has no block checksums: `scrub --repair` hashes the
/// blocks where its copies agree (and raises the disks to the current
/// format); from then on a flipped copy is found by the read that meets it
/// and mended from the other.
#[test]
fn format_v4_images_get_checksums_from_scrub_repair() {
    let sb = Sandbox::new();
    unpack(&sb, 4);
    let want = sector_pattern_of(4, "mirror", 2 << 20);
    let s = sb.status();
    assert_eq!(disk(&s, "v4-gpt.img")["checksums"], false, "{s:#}");
    let text = sb.mv(&["status"]).ok().stdout;
    assert!(text.contains("none yet (format 4)"), "{text}");
    let out = sb.mv(&["scrub", "mirror", "--repair"]).ok().stdout;
    assert!(out.contains("identical"), "{out}");
    for style in ["gpt", "mbr"] {
        assert_eq!(label_version(&sb, &format!("v4-{style}.img")), CURRENT);
    }
    assert_eq!(disk(&sb.status(), "v4-gpt.img")["checksums"], true);
    corrupt(&sb, "v4-gpt.img", "mirror", 4096, 4096);
    corrupt(&sb, "v4-mbr.img", "mirror", 1 << 20, 100);
    assert!(sb.read_volume("mirror") == want);
    assert!(plex_read(&sb, "v4-gpt.img", "mirror", 4096, 4096) == want[4096..8192]);
    assert!(
        plex_read(&sb, "v4-mbr.img", "mirror", 1 << 20, 4096) == want[1 << 20..(1 << 20) + 4096]
    );
}

#[test]
fn format_v5_images_open_with_their_block_checksums() {
    let sb = Sandbox::new();
    unpack(&sb, 5);
    let s = sb.status();
    assert_eq!(volume(&s, "mirror")["state"], "healthy");
    for style in ["gpt", "mbr", "raw"] {
        assert_eq!(label_version(&sb, &format!("v5-{style}.img")), 5);
    }
    let want = sector_pattern_of(5, "mirror", 2 << 20);
    corrupt(&sb, "v5-gpt.img", "mirror", 8192, 512);
    assert!(sb.read_volume("mirror") == want);
    // Whether the reads met it or not, the bad copy is mended by now or
    // by a scrub that knows it is the bad one.
    let out = sb.mv(&["scrub", "mirror", "--repair"]).ok().stdout;
    assert!(
        out.contains("identical") || out.contains("not match the block checksums"),
        "{out}"
    );
    assert!(plex_read(&sb, "v5-gpt.img", "mirror", 8192, 512) == want[8192..8704]);
    assert_eq!(
        sb.read_volume("simple"),
        sector_pattern_of(5, "simple", 1 << 20)
    );
}

/// Writes the compat images of this build's format version into
/// `$MIRRORVOL_COMPAT_OUT`: three 16 MiB disks (gpt on controller c0, mbr
/// on c1, raw on c2) of group `compat`, a 2 MiB mirror on the first two and
/// a 1 MiB simple volume on the third, filled with the sector pattern.
#[test]
#[ignore = "writes tests/data images; run by hand when the format changes"]
fn generate_format_images() {
    let Ok(out) = std::env::var("MIRRORVOL_COMPAT_OUT") else {
        eprintln!("set MIRRORVOL_COMPAT_OUT to the directory for the images");
        return;
    };
    let version = mirrorvol::format::FORMAT_VERSION;
    let sb = Sandbox::new();
    let disks: Vec<String> = ["gpt", "mbr", "raw"]
        .iter()
        .map(|s| sb.image(&format!("v{version}-{s}.img"), 16))
        .collect();
    for (i, (style, path)) in ["gpt", "mbr", "raw"].iter().zip(&disks).enumerate() {
        let c = format!("c{i}");
        let mut args = vec!["init", path.as_str(), "--style", style, "--controller", &c];
        if i == 0 {
            args.extend(["--group", "compat"]);
        }
        sb.mv(&args).ok();
    }
    sb.mv(&[
        "create", "mirror", "--size", "2M", "--mirror", "--disk", &disks[0], "--disk", &disks[1],
    ])
    .ok();
    sb.mv(&["create", "simple", "--size", "1M", "--disk", &disks[2]])
        .ok();
    for (name, len) in [("mirror", 2usize << 20), ("simple", 1 << 20)] {
        let p = sb.path(&format!("{name}.bin"));
        fs::write(&p, sector_pattern_of(version, name, len)).unwrap();
        sb.mv(&["copy", &p.display().to_string(), &format!("vol:{name}")])
            .ok();
    }
    for style in ["gpt", "mbr", "raw"] {
        let img = sb.path(&format!("disks/v{version}-{style}.img"));
        let gz = Command::new("gzip")
            .args(["-9c"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(gz.status.success());
        fs::write(format!("{out}/v{version}-{style}.img.gz"), gz.stdout).unwrap();
    }
}
