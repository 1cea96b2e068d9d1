//! Hot spares on image files: `init --spare`, placement that leaves spares
//! alone, `repair` that rebuilds onto a spare (behind another controller
//! when it can), and refusals that change no disk byte.

mod common;

use common::*;

/// Disks named `(file, controller)` in a group `g`, then spares likewise.
fn group_with_spares(sb: &Sandbox, mib: u64, disks: &[(&str, &str)], spares: &[(&str, &str)]) {
    for (i, (file, ctrl)) in disks.iter().enumerate() {
        let path = sb.image(file, mib);
        let mut args = vec!["init", path.as_str(), "--controller", ctrl];
        if i == 0 {
            args.extend(["--group", "g"]);
            sb.mv_plain(&args).ok();
        } else {
            sb.mv(&args).ok();
        }
    }
    for (file, ctrl) in spares {
        let path = sb.image(file, mib);
        let r = sb
            .mv(&["init", &path, "--spare", "--controller", ctrl])
            .ok();
        assert!(r.stdout.contains("hot spare"), "{}", r.stdout);
    }
}

fn plex_disks(status: &serde_json::Value, name: &str) -> Vec<String> {
    volume(status, name)["plexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let d = p["disk"].as_str().unwrap();
            d.rsplit('/').next().unwrap().to_string()
        })
        .collect()
}

/// The disks of volume `name`'s plexes (file names), sorted.
fn plex_disks_sorted(status: &serde_json::Value, name: &str) -> Vec<String> {
    let mut on = plex_disks(status, name);
    on.sort();
    on
}

/// Disks a.img, b.img and c.img of 64 MiB (controllers c0, c1, c2) in
/// group `g`, and the hot spare s.img (c3).
fn three_disks_and_a_spare(sb: &Sandbox) {
    group_with_spares(
        sb,
        64,
        &[("a.img", "c0"), ("b.img", "c1"), ("c.img", "c2")],
        &[("s.img", "c3")],
    );
}

/// Fails the disk `file`, then repairs `m` with `more` arguments.
fn fail_and_repair(sb: &Sandbox, file: &str, more: &[&str]) {
    sb.mv(&["fail", &sb.p(&format!("disks/{file}"))]).ok();
    sb.mv(&[&["repair", "m"], more].concat()).ok();
}

/// A mirror `m` of 8 MiB on a.img and b.img holding pseudo-random data.
fn mirror_with_data(sb: &Sandbox) -> Vec<u8> {
    let (a, b) = (sb.p("disks/a.img"), sb.p("disks/b.img"));
    sb.mv(&[
        "create", "m", "--size", "8M", "--mirror", "--disk", &a, "--disk", &b,
    ])
    .ok();
    let (src, data) = sb.data_file("in.bin", 8 * MIB as usize, 11);
    sb.mv(&["copy", &src, "vol:m"]).ok();
    data
}

#[test]
fn init_spare_joins_an_existing_group_and_status_shows_it() {
    let sb = Sandbox::new();
    group_with_spares(
        &sb,
        64,
        &[("a.img", "c0"), ("b.img", "c1")],
        &[("s.img", "c2")],
    );
    let s = sb.status();
    let spare = disk(&s, "s.img");
    assert_eq!(spare["spare"], true);
    assert_eq!(spare["state"], "online");
    assert_eq!(spare["controller"], "c2");
    assert_eq!(spare["free"], disk(&s, "a.img")["free"]);
    assert_eq!(disk(&s, "a.img")["spare"], false);
    let text = sb.mv(&["status"]).ok().stdout;
    let line = text.lines().find(|l| l.contains("s.img")).unwrap();
    assert!(line.contains("Online (hot spare)"), "{text}");
    let line = text.lines().find(|l| l.contains("a.img")).unwrap();
    assert!(!line.contains("spare"), "{text}");
    // examine prints the config, with the mark.
    let r = sb
        .mv_plain(&["examine", &sb.p("disks/a.img"), "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let disks = v["config"]["disks"].as_array().unwrap();
    let s_entry = disks
        .iter()
        .find(|d| d["path"].as_str().unwrap().ends_with("s.img"))
        .unwrap();
    assert_eq!(s_entry["spare"], true);
    let a_entry = disks
        .iter()
        .find(|d| d["path"].as_str().unwrap().ends_with("a.img"))
        .unwrap();
    assert!(a_entry.get("spare").is_none(), "{a_entry}");
}

#[test]
fn init_spare_refuses_a_group_of_spares_only() {
    let sb = Sandbox::new();
    let s = sb.image("s.img", 64);
    let before = sb.fingerprint();
    sb.mv_plain(&["init", &s, "--spare"])
        .refused("a hot spare must join an existing group");
    assert_eq!(sb.fingerprint(), before);
}

#[test]
fn create_and_add_mirror_never_use_a_spare() {
    let sb = Sandbox::new();
    three_disks_and_a_spare(&sb);
    sb.mv(&["create", "m", "--size", "8M", "--mirror", "--copies", "3"])
        .ok();
    sb.mv(&["create", "x", "--size", "4M"]).ok();
    let s = sb.status();
    assert_eq!(plex_disks_sorted(&s, "m"), ["a.img", "b.img", "c.img"]);
    assert_ne!(plex_disks(&s, "x"), ["s.img"]);
    // Fill every ordinary disk: only the spare has room left.
    for file in ["a.img", "b.img", "c.img"] {
        let free = disk(&sb.status(), file)["free"].as_u64().unwrap();
        let size = free.to_string();
        let name = format!("fill-{}", &file[..1]);
        let path = sb.p(&format!("disks/{file}"));
        sb.mv(&["create", &name, "--size", &size, "--disk", &path])
            .ok();
    }
    refused_unchanged(
        &sb,
        &["create", "y", "--size", "4M"],
        "s.img is a hot spare, kept for repairs: name it with --disk to use it anyway",
    );
    refused_unchanged(
        &sb,
        &["add-mirror", "x"],
        "s.img is a hot spare, kept for repairs",
    );
    assert_eq!(disk(&sb.status(), "s.img")["spare"], true);
    // Named, a spare takes a plex and stops being a spare.
    sb.mv(&["add-mirror", "x", "--disk", &sb.p("disks/s.img")])
        .ok();
    let s = sb.status();
    assert!(plex_disks(&s, "x").contains(&"s.img".to_string()));
    assert_eq!(volume(&s, "x")["state"], "healthy");
    assert_eq!(disk(&s, "s.img")["spare"], false);
}

#[test]
fn create_on_a_named_spare_uses_it() {
    let sb = Sandbox::new();
    group_with_spares(&sb, 64, &[("a.img", "c0")], &[("s.img", "c1")]);
    sb.mv(&[
        "create",
        "v",
        "--size",
        "4M",
        "--disk",
        &sb.p("disks/s.img"),
    ])
    .ok();
    let s = sb.status();
    assert_eq!(plex_disks(&s, "v"), ["s.img"]);
    assert_eq!(disk(&s, "s.img")["spare"], false);
}

#[test]
fn repair_rebuilds_a_failed_plex_onto_the_spare() {
    let sb = Sandbox::new();
    three_disks_and_a_spare(&sb);
    let data = mirror_with_data(&sb);
    sb.mv(&["fail", &sb.p("disks/b.img")]).ok();
    let c_free = disk(&sb.status(), "c.img")["free"].clone();
    let r = sb.mv(&["repair", "m"]).ok();
    assert!(r.stdout.contains("repaired volume m"), "{}", r.stdout);
    let s = sb.status();
    let m = volume(&s, "m");
    assert_eq!(m["state"], "healthy");
    assert_eq!(m["duplexed"], true);
    // The spare, not the free space on c.img.
    assert_eq!(plex_disks_sorted(&s, "m"), ["a.img", "s.img"]);
    assert_eq!(disk(&s, "c.img")["free"], c_free);
    assert_eq!(disk(&s, "s.img")["spare"], false);
    assert_eq!(disk(&s, "s.img")["state"], "online");
    assert_eq!(sb.read_volume("m"), data);
    // The rebuilt plex alone holds the data too.
    sb.mv(&["break", "m", "--disk", &sb.p("disks/a.img"), "--nokeep"])
        .ok();
    assert_eq!(plex_disks(&sb.status(), "m"), ["s.img"]);
    assert_eq!(sb.read_volume("m"), data);
}

#[test]
fn repair_prefers_a_spare_behind_another_controller() {
    let sb = Sandbox::new();
    // s0 joined first but shares a's controller; s1 is elsewhere.
    group_with_spares(
        &sb,
        64,
        &[("a.img", "c0"), ("b.img", "c1")],
        &[("s0.img", "c0"), ("s1.img", "c2")],
    );
    let data = mirror_with_data(&sb);
    fail_and_repair(&sb, "b.img", &[]);
    let s = sb.status();
    assert_eq!(plex_disks_sorted(&s, "m"), ["a.img", "s1.img"]);
    assert_eq!(volume(&s, "m")["duplexed"], true);
    assert_eq!(disk(&s, "s0.img")["spare"], true);
    assert_eq!(disk(&s, "s1.img")["spare"], false);
    assert_eq!(sb.read_volume("m"), data);
    // With only the spare on a's controller left, repair still takes it.
    fail_and_repair(&sb, "s1.img", &[]);
    let s = sb.status();
    assert_eq!(plex_disks_sorted(&s, "m"), ["a.img", "s0.img"]);
    assert_eq!(volume(&s, "m")["duplexed"], false);
    assert_eq!(sb.read_volume("m"), data);
}

#[test]
fn repair_with_a_named_disk_leaves_the_spare_alone() {
    let sb = Sandbox::new();
    three_disks_and_a_spare(&sb);
    let data = mirror_with_data(&sb);
    fail_and_repair(&sb, "b.img", &["--disk", &sb.p("disks/c.img")]);
    let s = sb.status();
    assert_eq!(plex_disks_sorted(&s, "m"), ["a.img", "c.img"]);
    assert_eq!(disk(&s, "s.img")["spare"], true);
    assert_eq!(sb.read_volume("m"), data);
}

#[test]
fn repair_without_a_fitting_spare_uses_free_space() {
    let sb = Sandbox::new();
    group_with_spares(
        &sb,
        64,
        &[("a.img", "c0"), ("b.img", "c1"), ("c.img", "c2")],
        &[],
    );
    // A spare too small for the mirror.
    let small = sb.image("s.img", 20);
    sb.mv(&["init", &small, "--spare", "--controller", "c3"])
        .ok();
    let (a, b) = (sb.p("disks/a.img"), sb.p("disks/b.img"));
    sb.mv(&[
        "create", "m", "--size", "16M", "--mirror", "--disk", &a, "--disk", &b,
    ])
    .ok();
    fail_and_repair(&sb, "b.img", &[]);
    let s = sb.status();
    assert_eq!(plex_disks_sorted(&s, "m"), ["a.img", "c.img"]);
    assert_eq!(disk(&s, "s.img")["spare"], true);
}
