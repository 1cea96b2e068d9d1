//! The command line on image files: every command of DESIGN.md §6 (but
//! `serve` and `scrub`), and every refusal, which must leave every disk byte
//! for byte as it was.

mod common;

use common::*;
use std::fs;
use std::process::Command;

/// Three disks on three controllers: a.img (gpt), b.img (mbr), c.img (raw).
fn three_disks(sb: &Sandbox, mib: u64) {
    let a = sb.image("a.img", mib);
    let b = sb.image("b.img", mib);
    let c = sb.image("c.img", mib);
    sb.mv_plain(&[
        "init",
        &a,
        "--style",
        "gpt",
        "--controller",
        "c0",
        "--group",
        "g",
    ])
    .ok();
    sb.mv(&["init", &b, "--style", "mbr", "--controller", "c1"])
        .ok();
    sb.mv(&["init", &c, "--style", "raw", "--controller", "c2"])
        .ok();
}

/// A simple volume NAME of SIZE on the disk image FILE.
fn simple_on(sb: &Sandbox, name: &str, size: &str, file: &str) {
    let disk = sb.p(&format!("disks/{file}"));
    sb.mv(&["create", name, "--size", size, "--disk", &disk])
        .ok();
}

/// A mirror NAME of SIZE with its plexes on a.img and b.img.
fn mirror_ab(sb: &Sandbox, name: &str, size: &str) {
    let (a, b) = (sb.p("disks/a.img"), sb.p("disks/b.img"));
    sb.mv(&[
        "create", name, "--size", size, "--mirror", "--disk", &a, "--disk", &b,
    ])
    .ok();
}

#[test]
fn init_makes_a_group_and_adds_disks_to_it() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    let s = sb.status();
    assert_eq!(s["group"]["name"], "g");
    assert_eq!(s["disks"].as_array().unwrap().len(), 3);
    for (file, style, ctrl) in [
        ("a.img", "gpt", "c0"),
        ("b.img", "mbr", "c1"),
        ("c.img", "raw", "c2"),
    ] {
        let d = disk(&s, file);
        assert_eq!(d["state"], "online");
        assert_eq!(d["style"], style);
        assert_eq!(d["controller"], ctrl);
        assert_eq!(d["size"], 64 * MIB);
        assert!(d["free"].as_u64().unwrap() >= 40 * MIB, "{d}");
        assert_eq!(d["free"].as_u64().unwrap() % MIB, 0);
    }
    // Every disk holds the same config.
    assert!(s["group"]["seqno"].as_u64().unwrap() >= 3);
}

#[test]
fn status_json_follows_the_schema() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&["create", "m", "--size", "8M", "--mirror"]).ok();
    sb.mv(&["create", "s", "--size", "4M"]).ok();
    let s = sb.status();
    for k in ["name", "uuid", "seqno"] {
        assert!(!s["group"][k].is_null(), "group.{k}");
    }
    for d in s["disks"].as_array().unwrap() {
        for k in [
            "path",
            "uuid",
            "state",
            "controller",
            "style",
            "size",
            "free",
        ] {
            assert!(!d[k].is_null(), "disk.{k} in {d}");
        }
    }
    let m = volume(&s, "m");
    for k in [
        "name", "uuid", "size", "layout", "state", "duplexed", "plexes",
    ] {
        assert!(!m[k].is_null(), "volume.{k}");
    }
    assert_eq!(m["layout"], "mirror");
    assert_eq!(m["state"], "healthy");
    assert_eq!(m["duplexed"], true);
    assert_eq!(m["size"], 8 * MIB);
    for p in m["plexes"].as_array().unwrap() {
        assert_eq!(p["state"], "in-sync");
        assert_eq!(p["resync_percent"], 100.0);
        assert!(p["disk"].as_str().unwrap().ends_with(".img"));
    }
    let s1 = volume(&s, "s");
    assert_eq!(s1["layout"], "simple");
    assert_eq!(s1["duplexed"], false);
    assert_eq!(s1["plexes"].as_array().unwrap().len(), 1);
}

#[test]
fn status_text_uses_windows_words() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&["create", "m", "--size", "8M", "--mirror"]).ok();
    let out = sb.mv(&["status"]).ok().stdout;
    assert!(out.contains("Healthy"), "{out}");
    assert!(out.contains("Online"), "{out}");
    assert!(out.contains("mirror"), "{out}");
    // One plex a row, not a comma-joined list.
    let plex_rows = out.lines().filter(|l| l.ends_with("(in-sync)")).count();
    assert_eq!(plex_rows, 2, "{out}");
    assert!(!out.contains("(in-sync), "), "{out}");
}

#[test]
fn mirror_data_survives_losing_a_disk() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    mirror_ab(&sb, "m", "16M");
    let (src, data) = sb.data_file("in.bin", 10 * MIB as usize + 512, 1);
    sb.mv(&["copy", &src, "vol:m"]).ok();
    fs::create_dir(sb.path("away")).unwrap();
    fs::rename(sb.path("disks/a.img"), sb.path("away/a.img")).unwrap();
    let s = sb.status();
    let m = volume(&s, "m");
    assert_eq!(m["state"], "failed-redundancy");
    assert_eq!(disk(&s, "a.img")["state"], "missing");
    let got = sb.read_volume("m");
    assert_eq!(got.len() as u64, 16 * MIB);
    assert_eq!(&got[..data.len()], &data[..]);
    assert!(got[data.len()..].iter().all(|&b| b == 0));
}

#[test]
fn new_mirror_starts_in_sync_with_zeroed_plexes() {
    let sb = Sandbox::new();
    let a = sb.image("a.img", 64);
    let b = sb.image("b.img", 64);
    // Garbage where the data areas will be: create must zero the plexes.
    for p in [&a, &b] {
        use std::os::unix::fs::FileExt;
        fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .write_all_at(&pattern(40 * MIB as usize, 9), 20 * MIB)
            .unwrap();
    }
    sb.mv_plain(&["init", &a, &b, "--style", "raw", "--force"])
        .ok();
    sb.mv(&["create", "m", "--size", "20M", "--mirror"]).ok();
    assert_eq!(volume(&sb.status(), "m")["state"], "healthy");
    let got = sb.read_volume("m");
    assert!(got.iter().all(|&x| x == 0), "a new volume reads as zeroes");
}

#[test]
fn create_three_copies_puts_each_on_its_own_disk() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&["create", "m", "--size", "10M", "--mirror", "--copies", "3"])
        .ok();
    let s = sb.status();
    let plexes: Vec<String> = volume(&s, "m")["plexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["disk"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(plexes.len(), 3);
    let mut unique = plexes.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 3);
}

#[test]
fn create_warns_when_not_duplexed_or_disks_differ() {
    let sb = Sandbox::new();
    let a = sb.image("a.img", 64);
    let b = sb.image("b.img", 96);
    sb.mv_plain(&["init", &a, &b, "--controller", "same"]).ok();
    let r = sb.mv(&["create", "m", "--size", "8M", "--mirror"]).ok();
    assert!(r.stderr.contains("not duplexed"), "{}", r.stderr);
    assert!(r.stderr.contains("differ in size"), "{}", r.stderr);
    assert_eq!(volume(&sb.status(), "m")["duplexed"], false);
}

#[test]
fn mixed_mbr_and_gpt_plexes_are_the_same_size() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    mirror_ab(&sb, "m", "3000K");
    let (src, data) = sb.data_file("in.bin", 3000 * 1024, 2);
    sb.mv(&["copy", &src, "vol:m"]).ok();
    // Each plex alone must hold the volume: break, then read both halves.
    sb.mv(&[
        "break",
        "m",
        "--disk",
        &sb.p("disks/b.img"),
        "--new-name",
        "half",
    ])
    .ok();
    assert_eq!(sb.read_volume("m"), data);
    assert_eq!(sb.read_volume("half"), data);
}

#[test]
fn add_mirror_copies_the_data_onto_the_new_plex() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    simple_on(&sb, "v", "12M", "a.img");
    let (src, data) = sb.data_file("in.bin", 12 * MIB as usize, 3);
    sb.mv(&["copy", &src, "vol:v"]).ok();
    sb.mv(&["add-mirror", "v", "--disk", &sb.p("disks/c.img")])
        .ok();
    let s = sb.status();
    let v = volume(&s, "v");
    assert_eq!(v["layout"], "mirror");
    assert_eq!(v["state"], "healthy");
    // The new plex alone holds the data: remove the old one and read.
    sb.mv(&["remove-mirror", "v", "--disk", &sb.p("disks/a.img")])
        .ok();
    let s = sb.status();
    let v = volume(&s, "v");
    assert_eq!(v["layout"], "simple");
    assert!(v["plexes"][0]["disk"].as_str().unwrap().ends_with("c.img"));
    assert_eq!(sb.read_volume("v"), data);
}

#[test]
fn remove_mirror_frees_the_space() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    let before = disk(&sb.status(), "b.img")["free"].as_u64().unwrap();
    mirror_ab(&sb, "m", "8M");
    assert_eq!(
        disk(&sb.status(), "b.img")["free"].as_u64().unwrap(),
        before - 8 * MIB
    );
    sb.mv(&["remove-mirror", "m", "--disk", &sb.p("disks/b.img")])
        .ok();
    assert_eq!(
        disk(&sb.status(), "b.img")["free"].as_u64().unwrap(),
        before
    );
}

#[test]
fn break_keeps_name_on_remaining_plex() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    mirror_ab(&sb, "m", "8M");
    let uuid = volume(&sb.status(), "m")["uuid"].clone();
    sb.mv(&["break", "m", "--disk", &sb.p("disks/b.img")]).ok();
    let s = sb.status();
    let m = volume(&s, "m");
    assert_eq!(m["uuid"], uuid);
    assert_eq!(m["layout"], "simple");
    assert!(m["plexes"][0]["disk"].as_str().unwrap().ends_with("a.img"));
    let broken = volume(&s, "m-broken");
    assert_ne!(broken["uuid"], uuid);
    assert!(
        broken["plexes"][0]["disk"]
            .as_str()
            .unwrap()
            .ends_with("b.img")
    );
}

#[test]
fn break_with_nokeep_frees_the_plex() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    let before = disk(&sb.status(), "b.img")["free"].as_u64().unwrap();
    mirror_ab(&sb, "m", "8M");
    sb.mv(&["break", "m", "--disk", &sb.p("disks/b.img"), "--nokeep"])
        .ok();
    let s = sb.status();
    assert_eq!(s["volumes"].as_array().unwrap().len(), 1);
    assert_eq!(disk(&s, "b.img")["free"].as_u64().unwrap(), before);
}

#[test]
fn break_refuses_to_keep_a_plex_that_is_not_in_sync() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    mirror_ab(&sb, "m", "8M");
    let b = sb.p("disks/b.img");
    sb.mv(&["fail", &b]).ok();
    refused_unchanged(
        &sb,
        &["break", "m", "--disk", &b],
        "is failed, so it does not hold the volume's data and cannot stand alone as a volume",
    );
    // Freeing it is fine.
    sb.mv(&["break", "m", "--disk", &b, "--nokeep"]).ok();
    assert_eq!(volume(&sb.status(), "m")["layout"], "simple");
}

#[test]
fn repair_replaces_a_failed_plex_on_another_disk() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    mirror_ab(&sb, "m", "8M");
    let (src, data) = sb.data_file("in.bin", 8 * MIB as usize, 4);
    sb.mv(&["copy", &src, "vol:m"]).ok();
    sb.mv(&["fail", &sb.p("disks/b.img")]).ok();
    let s = sb.status();
    assert_eq!(disk(&s, "b.img")["state"], "failed");
    assert_eq!(volume(&s, "m")["state"], "failed-redundancy");
    sb.mv(&["repair", "m"]).ok();
    let s = sb.status();
    let m = volume(&s, "m");
    assert_eq!(m["state"], "healthy");
    let disks: Vec<&str> = strings(&m["plexes"], "disk");
    assert!(disks.iter().any(|d| d.ends_with("c.img")), "{disks:?}");
    assert!(!disks.iter().any(|d| d.ends_with("b.img")), "{disks:?}");
    // The repaired plex alone holds the data.
    sb.mv(&["break", "m", "--disk", &sb.p("disks/a.img"), "--nokeep"])
        .ok();
    assert_eq!(sb.read_volume("m"), data);
}

#[test]
fn reactivate_brings_a_failed_disk_back_and_resyncs() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    mirror_ab(&sb, "m", "8M");
    sb.mv(&["fail", &sb.p("disks/b.img")]).ok();
    let (src, data) = sb.data_file("in.bin", 8 * MIB as usize, 5);
    sb.mv(&["copy", &src, "vol:m"]).ok();
    sb.mv(&["reactivate", &sb.p("disks/b.img")]).ok();
    let s = sb.status();
    assert_eq!(disk(&s, "b.img")["state"], "online");
    assert_eq!(volume(&s, "m")["state"], "healthy");
    sb.mv(&["break", "m", "--disk", &sb.p("disks/a.img"), "--nokeep"])
        .ok();
    assert_eq!(
        sb.read_volume("m"),
        data,
        "the reactivated plex holds the new data"
    );
}

#[test]
fn a_disk_that_missed_writes_comes_back_offline_until_reactivated() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    mirror_ab(&sb, "m", "8M");
    fs::create_dir(sb.path("away")).unwrap();
    fs::rename(sb.path("disks/b.img"), sb.path("away/b.img")).unwrap();
    let (src, data) = sb.data_file("in.bin", 8 * MIB as usize, 6);
    sb.mv(&["copy", &src, "vol:m"]).ok();
    fs::rename(sb.path("away/b.img"), sb.path("disks/b.img")).unwrap();
    let s = sb.status();
    assert_eq!(disk(&s, "b.img")["state"], "offline");
    assert_eq!(volume(&s, "m")["state"], "failed-redundancy");
    sb.mv(&["reactivate", &sb.p("disks/b.img")]).ok();
    let s = sb.status();
    assert_eq!(volume(&s, "m")["state"], "healthy");
    sb.mv(&["break", "m", "--disk", &sb.p("disks/a.img"), "--nokeep"])
        .ok();
    assert_eq!(sb.read_volume("m"), data);
}

#[test]
fn extend_grows_a_simple_volume_into_following_space() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    simple_on(&sb, "s", "4M", "c.img");
    let (src, data) = sb.data_file("in.bin", 4 * MIB as usize, 7);
    sb.mv(&["copy", &src, "vol:s"]).ok();
    sb.mv(&["extend", "s", "--size", "10M"]).ok();
    let s = sb.status();
    assert_eq!(volume(&s, "s")["size"], 10 * MIB);
    let got = sb.read_volume("s");
    assert_eq!(&got[..data.len()], &data[..]);
    assert!(got[data.len()..].iter().all(|&b| b == 0));
}

#[test]
fn delete_frees_the_space() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    let before = sb.status();
    sb.mv(&["create", "m", "--size", "8M", "--mirror"]).ok();
    sb.mv(&["delete", "m"]).ok();
    let after = sb.status();
    assert!(after["volumes"].as_array().unwrap().is_empty());
    for f in ["a.img", "b.img", "c.img"] {
        assert_eq!(disk(&after, f)["free"], disk(&before, f)["free"]);
    }
}

#[test]
fn examine_shows_label_and_config_of_one_disk() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&["create", "m", "--size", "8M", "--mirror"]).ok();
    let r = sb
        .mv_plain(&["examine", &sb.p("disks/b.img"), "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["label"]["style"], "mbr");
    assert_eq!(v["config"]["name"], "g");
    assert_eq!(v["config"]["volumes"][0]["name"], "m");
    let text = sb.mv_plain(&["examine", &sb.p("disks/a.img")]).ok().stdout;
    assert!(text.contains("gpt"), "{text}");
}

#[test]
fn output_to_a_reader_that_went_away_ends_quietly_without_a_panic() {
    // `mirrorvol examine disk.img | head -1`, made certain: the reading end
    // of the pipe is closed before the command writes anything.
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&["create", "m", "--size", "8M", "--mirror"]).ok();
    for args in [
        vec!["examine".to_string(), sb.p("disks/a.img")],
        vec!["status".to_string()],
        vec!["status".to_string(), "--json".to_string()],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(bin())
            .env("MIRRORVOL_DISKS", sb.disks_dir())
            .env("MIRRORVOL_RUN_DIR", sb.path("run"))
            .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
            .args(&args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?} says nothing: {stderr}");
    }
}

#[test]
fn copying_a_mostly_empty_volume_out_makes_a_sparse_file() {
    use std::os::unix::fs::MetadataExt;
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&["create", "v", "--size", "32M", "--mirror"]).ok();
    let (src, data) = sb.data_file("in.bin", MIB as usize, 9);
    sb.mv(&["copy", &src, "vol:v"]).ok();
    // Over an older file full of ones: its bytes past the data must read
    // as zeroes, not survive.
    let out = sb.path("out.img");
    fs::write(&out, vec![1u8; 32 * MIB as usize]).unwrap();
    sb.mv(&["copy", "vol:v", &sb.p("out.img")]).ok();
    let got = fs::read(&out).unwrap();
    assert_eq!(got.len(), 32 * MIB as usize);
    assert_eq!(&got[..MIB as usize], &data[..]);
    assert!(
        got[MIB as usize..].iter().all(|b| *b == 0),
        "the rest is zeroes"
    );
    let allocated = fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated < 8 * MIB,
        "31 MiB of zeroes are holes: {allocated} bytes allocated"
    );
}

#[test]
fn completions_and_the_manual_page_print_without_a_group() {
    let sb = Sandbox::new();
    // MIRRORVOL_DISKS names a directory with no disks: nothing is opened.
    let bash = sb.mv(&["completions", "bash"]).ok().stdout;
    assert!(
        bash.contains("add-mirror") && bash.contains("--io-engine"),
        "{bash}"
    );
    fs::write(sb.path("mirrorvol.bash"), &bash).unwrap();
    let checked = std::process::Command::new("bash")
        .args(["-n", &sb.p("mirrorvol.bash")])
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "bash parses the script: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    for shell in ["zsh", "fish"] {
        let script = sb.mv(&["completions", shell]).ok().stdout;
        assert!(script.contains("resolve-split-brain"), "{shell}: {script}");
    }
    sb.mv(&["completions", "tcsh"]).refused("tcsh");
    let page = sb.mv(&["manpage"]).ok().stdout;
    assert!(page.contains(".TH mirrorvol 8"), "{page}");
    assert!(
        page.contains(".SH \"MIRRORVOL ADD\\-MIRROR\""),
        "a section per command"
    );
    assert!(page.contains("add\\-mirror"), "lists the commands: {page}");
}

#[test]
fn copy_round_trips_through_a_volume_on_a_terminal_free_run() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&["create", "v", "--size", "5M", "--mirror"]).ok();
    let (src, data) = sb.data_file("in.bin", 5 * MIB as usize, 8);
    sb.mv(&["copy", &src, "vol:v"]).ok();
    sb.mv(&["create", "w", "--size", "5M"]).ok();
    sb.mv(&["copy", "vol:v", "vol:w"]).ok();
    assert_eq!(sb.read_volume("w"), data);
}

// ---- refusals: exit 2, one sentence naming the object, nothing changed ----

fn setup_refusals() -> Sandbox {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    mirror_ab(&sb, "m", "8M");
    simple_on(&sb, "s", "4M", "c.img");
    sb
}

#[test]
fn refuses_too_little_free_space() {
    let sb = setup_refusals();
    refused_unchanged(&sb, &["create", "big", "--size", "1G"], "big");
    refused_unchanged(
        &sb,
        &[
            "create", "big", "--size", "60M", "--mirror", "--copies", "3",
        ],
        "big",
    );
}

#[test]
fn refuses_the_same_disk_twice() {
    let sb = setup_refusals();
    let c = sb.p("disks/c.img");
    refused_unchanged(
        &sb,
        &[
            "create", "x", "--size", "1M", "--mirror", "--disk", &c, "--disk", &c,
        ],
        "c.img",
    );
    refused_unchanged(
        &sb,
        &["add-mirror", "m", "--disk", &sb.p("disks/a.img")],
        "a.img",
    );
}

#[test]
fn add_mirror_when_every_disk_with_room_holds_a_copy_says_so() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&["create", "m", "--size", "8M", "--mirror", "--copies", "3"])
        .ok();
    let before = sb.fingerprint();
    let r = sb
        .mv(&["add-mirror", "m"])
        .refused("already hold a copy of it");
    for disk in ["a.img", "b.img", "c.img"] {
        assert!(r.stderr.contains(disk), "names {disk}: {}", r.stderr);
    }
    assert!(
        !r.stderr.contains("has only 0 such disks"),
        "not the old message: {}",
        r.stderr
    );
    assert_eq!(sb.fingerprint(), before, "the refusal changed a disk");
}

#[test]
fn serve_with_a_port_out_of_range_is_refused_naming_the_port() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&["create", "m", "--size", "8M", "--mirror"]).ok();
    refused_unchanged(
        &sb,
        &["serve", "--listen", "127.0.0.1:99999"],
        "\"127.0.0.1:99999\" has a port out of range",
    );
    refused_unchanged(&sb, &["serve", "--listen", "99999"], "port out of range");
    refused_unchanged(
        &sb,
        &["serve", "--listen", "localhost"],
        "neither unix:PATH nor HOST:PORT",
    );
}

#[test]
fn a_negative_size_is_refused_as_negative() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&["create", "m", "--size", "8M"]).ok();
    refused_unchanged(
        &sb,
        &["create", "x", "--size", "-5M", "--mirror"],
        "size \"-5M\" is negative",
    );
    refused_unchanged(&sb, &["extend", "m", "--size", "-1"], "is negative");
}

#[test]
fn a_named_disk_that_does_not_exist_is_named_in_a_warning() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    let disks = format!("{},{}", sb.disks_dir(), sb.p("disks/typo.img"));
    let r = sb.mv_plain(&["status", "--disks", &disks]).ok();
    assert!(
        r.stderr
            .contains("typo.img named in --disks does not exist"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.contains("a.img"), "{}", r.stdout);
}

#[test]
fn a_disk_locked_by_another_process_is_refused_naming_its_pid_and_command() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&["create", "m", "--size", "8M", "--mirror"]).ok();
    // Another process holds the disk's lock, as a long offline command does.
    // --no-fork: flock becomes `sleep` holding the lock, one process.
    let mut holder = std::process::Command::new("flock")
        .args(["--no-fork", &sb.p("disks/b.img"), "sleep", "30"])
        .spawn()
        .expect("util-linux flock");
    let pid = holder.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let r = loop {
        let r = sb.mv(&["scrub", "m"]);
        if r.code == 2 || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // status only looks: it reads the disks without their lock.
    let seen = sb.mv(&["status"]).ok();
    assert!(seen.stdout.contains("VOLUME"), "{}", seen.stdout);
    let _ = holder.kill();
    let _ = holder.wait();
    let want = format!(
        "disk {} is in use by another process (pid {pid}: sleep 30)",
        sb.p("disks/b.img")
    );
    assert!(r.stderr.contains(&want), "want {want:?} in: {}", r.stderr);
    assert_eq!(r.code, 2, "{}", r.stderr);
    sb.mv(&["status"]).ok();
}

#[test]
fn status_test_and_x_exit_3_when_degraded_and_4_when_failed() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&["create", "m", "--size", "8M", "--mirror"]).ok();
    sb.mv(&[
        "create",
        "s",
        "--size",
        "4M",
        "--disk",
        &sb.p("disks/c.img"),
    ])
    .ok();
    let r = sb.mv(&["status", "--test"]).ok();
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let r = sb.mv(&["status", "-x"]).ok();
    assert_eq!(r.stdout, "all volumes healthy\n");
    let b = sb.p("disks/b.img");
    let m_on_b = strings(&volume(&sb.status(), "m")["plexes"], "disk").contains(&b.as_str());
    assert!(m_on_b, "m has a plex on b.img");
    sb.mv(&["fail", &b]).ok();
    let r = sb.mv(&["status", "--test"]);
    assert_eq!(r.code, 3, "degraded: {}", r.stderr);
    assert!(
        r.stdout.contains("VOLUME"),
        "the report is printed: {}",
        r.stdout
    );
    assert!(
        r.stderr.starts_with("degraded: ")
            && r.stderr
                .contains(&format!("volume m is failed-redundancy ({b}: failed)"))
            && r.stderr.contains(&format!("disk {b} is failed")),
        "{}",
        r.stderr
    );
    // -x: only what is wrong, each with what deals with it.
    let r = sb.mv(&["status", "-x"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(!r.stdout.contains("VOLUME"), "{}", r.stdout);
    assert!(
        r.stdout.contains("    mirrorvol repair m\n"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!(
            "    mirrorvol reactivate {b}, or mirrorvol replace {b} NEW"
        )),
        "{}",
        r.stdout
    );
    // A volume that serves nothing: its only disk failed (forced).
    let c = sb.p("disks/c.img");
    sb.mv(&["fail", &c, "--force"]).ok();
    let r = sb.mv(&["status", "-x", "--json"]);
    assert_eq!(r.code, 4, "failed: {}", r.stderr);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["state"], "failed", "{doc:#}");
    assert!(
        doc["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["failed"] == true
                && p["what"]
                    .as_str()
                    .unwrap()
                    .starts_with("volume s is failed")),
        "{doc:#}"
    );
    // Without --test or -x, a degraded group is still status 0.
    sb.mv(&["status"]).ok();
}

#[test]
fn refuses_a_disk_of_another_group() {
    let sb = setup_refusals();
    let other = Sandbox::new();
    let x = other.image("x.img", 64);
    other.mv_plain(&["init", &x, "--group", "other"]).ok();
    refused_unchanged(&sb, &["create", "x", "--size", "1M", "--disk", &x], "x.img");
    // Both groups named together: refused.
    let before = sb.fingerprint();
    Run::refused_from(
        std::process::Command::new(bin())
            .args(["--disks", &format!("{},{}", sb.disks_dir(), x), "status"])
            .output()
            .unwrap(),
        "groups",
    );
    assert_eq!(sb.fingerprint(), before);
}

#[test]
fn refuses_a_path_that_is_not_a_mirrorvol_disk() {
    let sb = setup_refusals();
    let blank = sb.path("blank.img");
    fs::File::create(&blank).unwrap().set_len(64 * MIB).unwrap();
    let before = sb.fingerprint();
    Run::refused_from(
        std::process::Command::new(bin())
            .args(["--disks", &blank.display().to_string(), "status"])
            .output()
            .unwrap(),
        "blank.img",
    );
    assert_eq!(sb.fingerprint(), before);
    sb.mv_plain(&["examine", &blank.display().to_string()])
        .refused("blank.img");
}

#[test]
fn refuses_init_over_a_partition_table_or_filesystem() {
    let sb = Sandbox::new();
    let a = sb.image("a.img", 64);
    // An MBR with one partition, written by the real sfdisk when present.
    if have_tool("sfdisk") {
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("echo 'start=2048, type=83' | sfdisk -q {a}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let before = sb.fingerprint();
        sb.mv_plain(&["init", &a]).refused("a.img");
        assert_eq!(sb.fingerprint(), before);
    } else {
        skip_or_fail("sfdisk is not installed");
    }
    let b = sb.image("b.img", 64);
    if have_tool("mkfs.ext4") {
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", &b])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let before = sb.fingerprint();
        sb.mv_plain(&["init", &b]).refused("ext");
        assert_eq!(sb.fingerprint(), before);
        sb.mv_plain(&["init", &b, "--force"]).ok();
    } else {
        skip_or_fail("mkfs.ext4 is not installed");
    }
}

#[test]
fn refuses_init_of_a_disk_already_in_the_group_or_another() {
    let sb = setup_refusals();
    refused_unchanged(&sb, &["init", &sb.p("disks/a.img")], "a.img");
    let other = Sandbox::new();
    let x = other.image("x.img", 64);
    other.mv_plain(&["init", &x]).ok();
    let before = other.fingerprint();
    other.mv_plain(&["init", &x]).refused("x.img");
    assert_eq!(other.fingerprint(), before);
}

#[test]
fn refuses_a_volume_name_already_in_use() {
    let sb = setup_refusals();
    refused_unchanged(&sb, &["create", "m", "--size", "1M"], "m");
    refused_unchanged(
        &sb,
        &[
            "break",
            "m",
            "--disk",
            &sb.p("disks/b.img"),
            "--new-name",
            "s",
        ],
        "s",
    );
}

#[test]
fn refuses_sizes_that_are_zero_or_not_whole_sectors() {
    let sb = setup_refusals();
    refused_unchanged(&sb, &["create", "z", "--size", "0"], "z");
    refused_unchanged(&sb, &["create", "z", "--size", "1000"], "sectors");
    refused_unchanged(&sb, &["extend", "s", "--size", "5000001"], "sectors");
    refused_unchanged(&sb, &["create", "z", "--size", "12Q"], "size");
}

#[test]
fn refuses_to_extend_a_mirror_and_says_what_to_do() {
    let sb = setup_refusals();
    refused_unchanged(&sb, &["extend", "m", "--size", "16M"], "cannot be extended");
    let r = sb.mv(&["extend", "m", "--size", "16M"]);
    assert!(r.stderr.contains("break the mirror"), "{}", r.stderr);
}

#[test]
fn refuses_to_extend_without_following_free_space_or_to_shrink() {
    let sb = setup_refusals();
    simple_on(&sb, "after", "1M", "c.img");
    refused_unchanged(&sb, &["extend", "s", "--size", "8M"], "c.img");
    refused_unchanged(&sb, &["extend", "s", "--size", "2M"], "larger");
}

#[test]
fn refuses_unknown_volumes_and_disks() {
    let sb = setup_refusals();
    refused_unchanged(&sb, &["delete", "nope"], "nope");
    refused_unchanged(
        &sb,
        &["break", "m", "--disk", "/nonexistent.img"],
        "nonexistent.img",
    );
    refused_unchanged(
        &sb,
        &["remove-mirror", "m", "--disk", &sb.p("disks/c.img")],
        "c.img",
    );
    refused_unchanged(
        &sb,
        &["break", "s", "--disk", &sb.p("disks/c.img")],
        "not mirrored",
    );
    refused_unchanged(&sb, &["create", "bad name", "--size", "1M"], "bad name");
}

#[test]
fn refuses_to_take_away_the_last_good_copy() {
    let sb = setup_refusals();
    refused_unchanged(
        &sb,
        &["remove-mirror", "s", "--disk", &sb.p("disks/c.img")],
        "delete",
    );
    sb.mv(&["fail", &sb.p("disks/b.img")]).ok();
    refused_unchanged(&sb, &["fail", &sb.p("disks/a.img")], "--force");
    refused_unchanged(
        &sb,
        &["remove-mirror", "m", "--disk", &sb.p("disks/a.img")],
        "a.img",
    );
    refused_unchanged(&sb, &["fail", &sb.p("disks/b.img")], "already failed");
}

#[test]
fn refuses_copies_that_do_not_fit_or_make_no_sense() {
    let sb = setup_refusals();
    let (big, _) = sb.data_file("big.bin", 9 * MIB as usize, 1);
    refused_unchanged(&sb, &["copy", &big, "vol:m"], "m");
    refused_unchanged(&sb, &["copy", &big, &sb.p("other.bin")], "vol:");
    refused_unchanged(&sb, &["copy", "vol:m", &sb.p("disks/c.img")], "c.img");
    refused_unchanged(&sb, &["copy", "vol:m", "vol:m"], "itself");
    refused_unchanged(&sb, &["copy", &sb.p("nothere.bin"), "vol:m"], "nothere.bin");
}

#[test]
fn refuses_commands_without_disks() {
    let sb = Sandbox::new();
    sb.mv_plain(&["status"]).refused("--disks");
}

#[test]
fn refuses_repair_of_a_healthy_volume() {
    let sb = setup_refusals();
    refused_unchanged(&sb, &["repair", "m"], "nothing to repair");
    refused_unchanged(&sb, &["reactivate", &sb.p("disks/a.img")], "already online");
}

#[test]
fn refuses_init_of_a_tiny_disk_and_mbr_over_2tib() {
    let sb = Sandbox::new();
    let tiny = sb.image("tiny.img", 8);
    let before = sb.fingerprint();
    sb.mv_plain(&["init", &tiny]).refused("too small");
    assert_eq!(sb.fingerprint(), before);
    let huge = sb.image("huge.img", 3 * 1024 * 1024);
    let before = sb.fingerprint_sizes();
    sb.mv_plain(&["init", &huge, "--style", "mbr"])
        .refused("2 TiB");
    assert_eq!(sb.fingerprint_sizes(), before);
    sb.mv_plain(&["init", "/nonexistent/disk.img"])
        .refused("disk.img");
}

/// Every command in `mirrorvol --help` has a row in the README's command
/// table and every row names a command that exists; every `--flag` a row
/// shows is one that command's help lists.
#[test]
fn the_readme_command_table_and_the_help_agree() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("\n## Commands\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a Commands section");
    let rows: Vec<(String, Vec<String>)> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .map(|l| {
            let usage = l.split('`').next().unwrap();
            let name = usage.split_whitespace().next().unwrap().to_string();
            let flags = usage
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .filter(|w| w.starts_with("--") && w.len() > 2)
                .map(str::to_string)
                .collect();
            (name, flags)
        })
        .collect();
    let help =
        String::from_utf8(Command::new(bin()).arg("--help").output().unwrap().stdout).unwrap();
    let commands: Vec<String> = help
        .split("Commands:\n")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect();
    assert!(commands.len() > 15, "{help}");
    for c in &commands {
        assert!(
            rows.iter().any(|(n, _)| n == c),
            "the README's command table lacks {c}"
        );
    }
    for (name, flags) in &rows {
        assert!(
            commands.contains(name),
            "the README's table names {name}, which is no command"
        );
        let sub = Command::new(bin())
            .args([name.as_str(), "--help"])
            .output()
            .unwrap();
        let text = String::from_utf8(sub.stdout).unwrap();
        for f in flags {
            assert!(
                text.contains(&format!("{f} "))
                    || text.contains(&format!("{f}\n"))
                    || text.contains(&format!("{f}=")),
                "the README shows {name} {f}, which its help does not list:\n{text}"
            );
        }
    }
}

#[test]
fn remove_disk_takes_out_empty_and_failed_disks_and_never_takes_them_back() {
    let sb = Sandbox::new();
    let paths: Vec<String> = ["a.img", "b.img", "c.img", "d.img"]
        .iter()
        .map(|n| sb.image(n, 64))
        .collect();
    let (a, b, c, d) = (&paths[0], &paths[1], &paths[2], &paths[3]);
    sb.mv_plain(&["init", a, b, c, d, "--style", "raw", "--group", "g"])
        .ok();
    sb.mv(&[
        "create", "data", "--size", "16M", "--mirror", "--disk", a, "--disk", b,
    ])
    .ok();
    sb.mv(&["create", "solo", "--size", "8M", "--disk", c]).ok();

    // In service with a copy: refused, nothing changed.
    refused_unchanged(
        &sb,
        &["remove-disk", a],
        "is in service and holds copies of data",
    );
    refused_unchanged(
        &sb,
        &["remove-disk", &sb.p("nowhere.img")],
        "is not a disk of group g",
    );

    // Empty: it leaves, its labels wiped.
    let out = sb.mv(&["remove-disk", d]).ok().stdout;
    assert!(
        out.contains(&format!("removed disk {d} from group g")),
        "{out}"
    );
    sb.mv(&["examine", d]).refused("not a mirrorvol disk");
    assert_eq!(sb.status()["disks"].as_array().unwrap().len(), 3);

    // Missing with the only copy of a volume: refused.
    let aside = sb.path("aside");
    fs::create_dir_all(&aside).unwrap();
    fs::rename(c, aside.join("c.img")).unwrap();
    sb.mv(&["remove-disk", c])
        .refused("holds the only copy of solo");
    fs::rename(aside.join("c.img"), c).unwrap();

    // Missing, its copy of data twinned on a.img: it leaves, data goes on
    // as a simple volume, and when the disk comes back with its labels
    // and config intact it is not taken in again.
    fs::rename(b, aside.join("b.img")).unwrap();
    let out = sb.mv(&["remove-disk", b]).ok().stdout;
    assert!(out.contains("its copies of data are gone"), "{out}");
    fs::rename(aside.join("b.img"), b).unwrap();
    let r = sb.mv(&["status", "--json"]).ok();
    assert!(
        r.stderr.contains("was removed from its group"),
        "{}",
        r.stderr
    );
    let st: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let disks: Vec<&str> = strings(&st["disks"], "path");
    assert!(!disks.iter().any(|p| p.ends_with("/b.img")), "{disks:?}");
    let data = volume(&st, "data");
    assert_eq!(data["layout"], "simple");
    assert_eq!(data["state"], "healthy");
    sb.mv(&["add-mirror", "data", "--disk", b])
        .refused("is not a disk of group g");
}

#[test]
fn replace_rebuilds_a_disks_copies_on_another_and_the_old_one_leaves() {
    let sb = Sandbox::new();
    let paths: Vec<String> = ["a.img", "b.img", "c.img"]
        .iter()
        .map(|n| sb.image(n, 64))
        .collect();
    let (a, b, c) = (&paths[0], &paths[1], &paths[2]);
    sb.mv_plain(&["init", a, b, c, "--style", "raw", "--group", "g"])
        .ok();
    sb.mv(&[
        "create", "data", "--size", "16M", "--mirror", "--disk", a, "--disk", b,
    ])
    .ok();
    sb.mv(&["create", "solo", "--size", "8M", "--disk", a]).ok();
    let (src, want) = sb.data_file("in.bin", 16 << 20, 7);
    sb.mv(&["copy", &src, "vol:data"]).ok();
    let (src2, want2) = sb.data_file("in2.bin", 8 << 20, 8);
    sb.mv(&["copy", &src2, "vol:solo"]).ok();

    refused_unchanged(&sb, &["replace", a, a], "are the same disk");
    refused_unchanged(
        &sb,
        &["replace", a, b],
        "holds a copy of volume data already",
    );
    refused_unchanged(
        &sb,
        &["replace", a, &sb.p("new.img")],
        "is not a disk of group g",
    );
    refused_unchanged(&sb, &["replace", a, "--cancel"], "is not being replaced");

    let out = sb.mv(&["replace", a, c]).ok().stdout;
    assert!(
        out.contains(&format!("replaced disk {a} by {c}: it left the group")),
        "{out}"
    );
    let st = sb.status();
    let disks: Vec<&str> = strings(&st["disks"], "path");
    assert_eq!(disks, [b.as_str(), c.as_str()]);
    let data = volume(&st, "data");
    assert_eq!(data["state"], "healthy");
    let on: Vec<&str> = strings(&data["plexes"], "disk");
    assert_eq!(on, [b.as_str(), c.as_str()]);
    assert_eq!(volume(&st, "solo")["plexes"][0]["disk"], c.as_str());
    assert_eq!(sb.read_volume("data"), want);
    assert_eq!(sb.read_volume("solo"), want2);
    sb.mv(&["examine", a]).refused("not a mirrorvol disk");
    // A disk with no copy leaves at once.
    let d = sb.image("d.img", 64);
    sb.mv(&["init", &d, "--style", "raw"]).ok();
    let out = sb.mv(&["replace", &d, b]).ok().stdout;
    assert!(out.contains("it left the group"), "{out}");
    assert_eq!(sb.status()["disks"].as_array().unwrap().len(), 2);
}

/// contrib/mirrorvol@.service passes `systemd-analyze verify` (no warning
/// either), and a group file written as contrib/mirrorvol.conf.example
/// shows starts serve on the disks it lists, as the unit would.
#[test]
fn the_systemd_unit_verifies_and_its_group_file_serves() {
    if !have_tool("systemd-analyze") {
        return skip_or_fail("systemd-analyze is not installed");
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let unit = fs::read_to_string(format!("{root}/contrib/mirrorvol@.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/mirrorvol serve $SERVE_OPTIONS"));
    let sb = Sandbox::new();
    // Verified as installed, the binary where the unit says it is.
    let at = sb.path("mirrorvol@g.service");
    fs::write(&at, unit.replace("/usr/local/bin/mirrorvol", bin())).unwrap();
    let v = Command::new("systemd-analyze")
        .args(["verify", at.to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&v.stderr);
    assert!(v.status.success() && said.trim().is_empty(), "{said}");

    // The group file: KEY=VALUE lines, as systemd's EnvironmentFile reads.
    let example = fs::read_to_string(format!("{root}/contrib/mirrorvol.conf.example")).unwrap();
    let keys: Vec<&str> = example
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .map(|l| l.split('=').next().unwrap())
        .collect();
    assert_eq!(keys, ["MIRRORVOL_DISKS", "SERVE_OPTIONS"]);
    let a = sb.image("a.img", 64);
    let b = sb.image("b.img", 64);
    sb.mv_plain(&["init", &a, &b, "--style", "raw"]).ok();
    sb.mv_plain(&[
        "--disks",
        &format!("{a},{b}"),
        "create",
        "data",
        "--size",
        "8M",
        "--mirror",
    ])
    .ok();
    let conf = format!(
        "MIRRORVOL_DISKS={a},{b}\nSERVE_OPTIONS=--listen unix:{} --http 127.0.0.1:0\n",
        sb.p("nbd.sock")
    );
    let env: Vec<(String, String)> = conf
        .lines()
        .map(|l| l.split_once('=').unwrap())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let options = &env.iter().find(|(k, _)| k == "SERVE_OPTIONS").unwrap().1;
    let serve = Command::new(bin())
        .env_remove("MIRRORVOL_DISKS")
        .envs(env.iter().filter(|(k, _)| k != "SERVE_OPTIONS").cloned())
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
        .arg("serve")
        .args(options.split(' '))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Served once status comes from the daemon (its NBD socket may be
    // there a moment before its control socket answers).
    let start = std::time::Instant::now();
    loop {
        let clients = sb.path("nbd.sock").exists().then(|| {
            volume(
                &sb.mv_plain(&["--disks", &a, "status", "--json"])
                    .ok()
                    .stdout
                    .parse::<serde_json::Value>()
                    .unwrap(),
                "data",
            )["clients"]
                .clone()
        });
        if let Some(c) = clients.filter(|c| !c.is_null()) {
            assert_eq!(c, 0);
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "serve did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SIGTERM, as systemctl stop sends.
    // SAFETY: kill(2) on the pid of the child this test started.
    unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
    let out = serve.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("stopped; every volume is flushed"), "{log}");
}

#[test]
fn history_records_each_command_that_changed_the_config_with_who_and_where() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&["create", "data", "--size", "8M", "--mirror"]).ok();
    // A refusal changes nothing, and is not recorded.
    sb.mv(&["extend", "data", "--size", "16M"])
        .refused("mirror");
    sb.mv(&["create", "v2", "--size", "4M"]).ok();
    let h: serde_json::Value =
        serde_json::from_str(&sb.mv(&["history", "--json"]).ok().stdout).unwrap();
    let commands: Vec<&str> = strings(&h, "command");
    assert_eq!(commands.len(), 5, "{h:#}");
    assert!(commands[0].starts_with("mirrorvol init "), "{commands:?}");
    assert_eq!(commands[3], "mirrorvol create data --size 8M --mirror");
    assert_eq!(commands[4], "mirrorvol create v2 --size 4M");
    let seqnos: Vec<u64> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seqno"].as_u64().unwrap())
        .collect();
    assert!(seqnos.windows(2).all(|w| w[0] < w[1]), "{seqnos:?}");
    let last = &h[4];
    assert_eq!(last["user"], "root");
    assert!(!last["host"].as_str().unwrap().is_empty());
    assert!(last["time"].as_u64().unwrap() > 1_700_000_000);
    let text = sb.mv(&["history"]).ok().stdout;
    assert!(text.contains("root@"), "{text}");
    assert!(
        text.trim_end().ends_with("mirrorvol create v2 --size 4M"),
        "{text}"
    );
}

#[test]
fn commands_that_change_things_say_what_they_did_in_json() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    let r = sb
        .mv(&["create", "data", "--size", "8M", "--mirror", "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("one JSON object");
    assert_eq!(v["ok"], true);
    assert_eq!(v["command"], "create");
    assert!(
        v["messages"][0]
            .as_str()
            .unwrap()
            .starts_with("created mirrored volume data"),
        "{v:#}"
    );
    // The status after the change, in status --json's keys.
    let data = volume(&v["status"], "data");
    assert_eq!(data["layout"], "mirror");
    assert_eq!(data["state"], "healthy");
    // A refusal: ok false, its exit status and sentence; nothing changed.
    let before = sb.fingerprint();
    let r = sb.mv(&["create", "data", "--size", "8M", "--json"]);
    assert_eq!(r.code, 2);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("one JSON object");
    assert_eq!(v["ok"], false);
    assert_eq!(v["code"], 2);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("volume data already exists"),
        "{v:#}"
    );
    assert!(r.stderr.contains("error: volume data already exists"));
    assert_eq!(sb.fingerprint(), before);
}

#[test]
fn a_foreground_resync_keeps_to_the_rate_asked() {
    let sb = Sandbox::new();
    three_disks(&sb, 64);
    sb.mv(&[
        "create",
        "data",
        "--size",
        "32M",
        "--disk",
        &sb.p("disks/a.img"),
    ])
    .ok();
    let (src, want) = sb.data_file("in.bin", 32 << 20, 3);
    sb.mv(&["copy", &src, "vol:data"]).ok();
    sb.mv(&["add-mirror", "data", "--rate", "-1M"])
        .refused("negative");
    let start = std::time::Instant::now();
    let mut adding = std::process::Command::new(bin())
        .env("MIRRORVOL_DISKS", sb.disks_dir())
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
        .args(["add-mirror", "data", "--disk", &sb.p("disks/b.img")])
        .args(["--rate", "4M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // status from another shell, while add-mirror holds the disks (about
    // 8 s): who holds them and how far it is, from the holder's claim
    // renewals; watched until add-mirror ends.
    let (mut seen, mut text) = (None, None);
    let ended = loop {
        if let Some(code) = adding.try_wait().unwrap() {
            break code;
        }
        let s = sb.status();
        let p = &s["group"]["holder_progress"];
        let moving =
            p["done"].as_u64().is_some_and(|d| d > 0) && p["rate"].as_u64().is_some_and(|r| r > 0);
        if moving && seen.is_none() {
            seen = Some(s);
            text = Some(sb.mv(&["status"]).ok().stdout);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let took = start.elapsed();
    assert!(ended.success(), "add-mirror: {ended}");
    let seen = seen.expect("status showed add-mirror's progress while it ran");
    let (held, p) = (&seen["group"]["held_by"], &seen["group"]["holder_progress"]);
    assert!(
        held.as_str()
            .unwrap()
            .starts_with("mirrorvol add-mirror (pid "),
        "{seen:#}"
    );
    assert_eq!(
        p["what"],
        format!("resync data onto {}", sb.p("disks/b.img"))
    );
    assert_eq!(p["total"], 32 << 20);
    let pct = p["percent"].as_f64().unwrap();
    assert!(pct > 0.0 && pct < 100.0, "{p}");
    // Paced at 4 MiB/s: the rate shown is about that.
    let rate = p["rate"].as_u64().unwrap();
    assert!((1 << 20..12 << 20).contains(&rate), "{p}");
    assert!(p["eta_seconds"].as_u64().is_some_and(|e| e < 60), "{p}");
    let text = text.unwrap();
    assert!(
        text.contains("Held by mirrorvol add-mirror") && text.contains("  resync data onto "),
        "{text}"
    );
    // 32 MiB at 4 MiB/s: 8 s (the first chunk goes at once).
    assert!(took >= std::time::Duration::from_secs(6), "{took:?}");
    let after = sb.status();
    assert_eq!(volume(&after, "data")["state"], "healthy");
    assert!(after["group"].get("held_by").is_none(), "{after:#}");
    assert_eq!(sb.read_volume("data"), want);
}

/// The rate paces what a resync reads and copies, not the zeroes it gives
/// where nothing was written: a 64 MiB volume holding 4 MiB gets its mirror
/// at 1 MiB/s in about 4 s (paced on all of it, a minute), and the copy
/// alone holds the volume.
#[test]
fn a_resync_at_a_rate_is_paced_by_what_was_written() {
    let sb = Sandbox::new();
    three_disks(&sb, 128);
    sb.mv(&[
        "create",
        "data",
        "--size",
        "64M",
        "--disk",
        &sb.p("disks/a.img"),
    ])
    .ok();
    let (src, want) = sb.data_file("in.bin", 4 << 20, 5);
    sb.mv(&["copy", &src, "vol:data"]).ok();
    let start = std::time::Instant::now();
    let out = sb
        .mv(&[
            "add-mirror",
            "data",
            "--disk",
            &sb.p("disks/b.img"),
            "--rate",
            "1M",
        ])
        .ok()
        .stdout;
    let took = start.elapsed();
    assert!(
        took > std::time::Duration::from_secs(3) && took < std::time::Duration::from_secs(20),
        "add-mirror took {took:?}: {out}"
    );
    assert!(
        out.contains("4 MiB of it read and copied, 60 MiB never written"),
        "{out}"
    );
    sb.mv(&["fail", &sb.p("disks/a.img")]).ok();
    let got = sb.read_volume("data");
    assert!(got[..4 << 20] == want[..], "the data, from the new copy");
    assert!(got[4 << 20..].iter().all(|&b| b == 0), "zeroes after it");
}
