//! `scrub` on image files: mismatches injected straight into one plex's
//! image are found at their exact offsets, `--repair` keeps the copy the
//! documented rule picks, and a volume with nothing to compare is refused.

mod common;

use common::*;

/// Disks a.img, b.img and c.img on three controllers.
fn three_disks(sb: &Sandbox) {
    for (i, f) in ["a.img", "b.img", "c.img"].iter().enumerate() {
        let p = sb.image(f, 64);
        let ctrl = format!("c{i}");
        let mut args = vec!["init", p.as_str(), "--controller", &ctrl];
        if i == 0 {
            sb.mv_plain(&[args.as_slice(), &["--group", "g"]].concat())
                .ok();
        } else {
            args.truncate(4);
            sb.mv(&args).ok();
        }
    }
}

/// A mirror NAME of SIZE with plexes on `files` in that order, filled with
/// pseudo-random data; returns the data.
fn mirror(sb: &Sandbox, name: &str, size: u64, files: &[&str]) -> Vec<u8> {
    let size_arg = size.to_string();
    let copies = files.len().to_string();
    let disks: Vec<String> = files.iter().map(|f| sb.p(&format!("disks/{f}"))).collect();
    let mut args = vec![
        "create", name, "--size", &size_arg, "--mirror", "--copies", &copies,
    ];
    for d in &disks {
        args.extend(["--disk", d.as_str()]);
    }
    sb.mv(&args).ok();
    let (src, data) = sb.data_file("fill.bin", size as usize, 42);
    sb.mv(&["copy", &src, &format!("vol:{name}")]).ok();
    data
}

fn scrub_json(sb: &Sandbox, args: &[&str]) -> serde_json::Value {
    let r = sb.mv(&[&["scrub"], args, &["--json"]].concat()).ok();
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

/// (offset, length, plexes' file names) of each reported range.
fn ranges(report: &serde_json::Value) -> Vec<(u64, u64, Vec<String>)> {
    report["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let plexes = r["plexes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().rsplit('/').next().unwrap().to_string())
                .collect();
            (
                r["offset"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
                plexes,
            )
        })
        .collect()
}

const SIZE: u64 = 3 * MIB;

/// One sector, a 4 KiB block across the first 1 MiB chunk boundary, and
/// the volume's last sector.
const INJECTED: [(u64, usize); 3] = [(7 * 512, 512), (MIB - 2048, 4096), (SIZE - 512, 512)];

#[test]
fn a_clean_mirror_scrubs_with_no_mismatch_over_its_whole_size() {
    let sb = Sandbox::new();
    three_disks(&sb);
    mirror(&sb, "m", SIZE, &["a.img", "b.img"]);
    let r = scrub_json(&sb, &["m"]);
    for k in [
        "volume",
        "checked_bytes",
        "mismatches",
        "repaired",
        "ranges",
    ] {
        assert!(!r[k].is_null(), "scrub --json lacks {k}: {r}");
    }
    assert_eq!(r["volume"], "m");
    assert_eq!(r["checked_bytes"], SIZE);
    assert_eq!(r["mismatches"], 0);
    assert_eq!(r["repaired"], 0);
    assert_eq!(r["ranges"], serde_json::json!([]));
    let text = sb.mv(&["scrub", "m"]).ok().stdout;
    assert!(text.contains("identical"), "{text}");
}

#[test]
fn scrub_reports_injected_mismatches_at_their_exact_offsets_and_changes_nothing() {
    let sb = Sandbox::new();
    three_disks(&sb);
    mirror(&sb, "m", SIZE, &["a.img", "b.img"]);
    for (at, len) in INJECTED {
        corrupt(&sb, "b.img", "m", at, len);
    }
    let before = sb.fingerprint();
    let r = scrub_json(&sb, &["m"]);
    let ab = vec!["a.img".to_string(), "b.img".to_string()];
    assert_eq!(
        ranges(&r),
        INJECTED
            .iter()
            .map(|(at, len)| (*at, *len as u64, ab.clone()))
            .collect::<Vec<_>>()
    );
    assert_eq!(r["mismatches"], 3);
    assert_eq!(r["repaired"], 0);
    assert_eq!(r["checked_bytes"], SIZE);
    assert_eq!(sb.fingerprint(), before, "a scrub without --repair wrote");
    let text = sb.mv(&["scrub", "m"]).ok().stdout;
    assert!(
        text.contains(&format!(
            "mismatch at offset {}, 4096 bytes: plexes differ on {} and {} (the copy on {} does not match the block checksums, the copy on {} does); a repair would keep the copy on {}",
            MIB - 2048,
            sb.p("disks/a.img"),
            sb.p("disks/b.img"),
            sb.p("disks/b.img"),
            sb.p("disks/a.img"),
            sb.p("disks/a.img"),
        )),
        "{text}"
    );
}

#[test]
fn repair_of_a_two_way_mirror_keeps_the_copy_matching_its_checksums_and_a_second_scrub_is_clean() {
    let sb = Sandbox::new();
    three_disks(&sb);
    let data = mirror(&sb, "m", SIZE, &["a.img", "b.img"]);
    // The first plex holds the odd bytes: without checksums md's rule (the
    // first plex wins) would copy them over the good copy; the block
    // checksums say the second plex's copy is the right one.
    for (at, len) in INJECTED {
        corrupt(&sb, "a.img", "m", at, len);
    }
    let r = scrub_json(&sb, &["m", "--repair"]);
    assert_eq!(r["mismatches"], 3);
    assert_eq!(r["repaired"], 3);
    for m in r["ranges"].as_array().unwrap() {
        assert_eq!(m["verdict"], "checksum", "{r:#}");
        assert!(m["kept"].as_str().unwrap().ends_with("b.img"), "{r:#}");
    }
    assert!(plex_read(&sb, "a.img", "m", 0, SIZE as usize) == data);
    assert!(plex_read(&sb, "b.img", "m", 0, SIZE as usize) == data);
    let again = scrub_json(&sb, &["m"]);
    assert_eq!(again["mismatches"], 0);
    assert_eq!(sb.status()["volumes"][0]["state"], "healthy");
}

#[test]
fn repair_of_a_three_way_mirror_keeps_the_majority_copy() {
    let sb = Sandbox::new();
    three_disks(&sb);
    let data = mirror(&sb, "m", SIZE, &["a.img", "b.img", "c.img"]);
    // The odd plex is the first one: the majority outvotes it.
    for (at, len) in INJECTED {
        corrupt(&sb, "a.img", "m", at, len);
    }
    let r = scrub_json(&sb, &["m", "--repair"]);
    let ba = vec!["b.img".to_string(), "a.img".to_string()];
    assert_eq!(
        ranges(&r),
        INJECTED
            .iter()
            .map(|(at, len)| (*at, *len as u64, ba.clone()))
            .collect::<Vec<_>>()
    );
    for f in ["a.img", "b.img", "c.img"] {
        assert_eq!(plex_read(&sb, f, "m", 0, SIZE as usize), data, "{f}");
    }
    assert_eq!(scrub_json(&sb, &["m"])["mismatches"], 0);
}

#[test]
fn scrub_of_a_simple_volume_is_refused_and_changes_nothing() {
    let sb = Sandbox::new();
    three_disks(&sb);
    sb.mv(&["create", "s", "--size", "2M"]).ok();
    let before = sb.fingerprint();
    sb.mv(&["scrub", "s", "--repair"])
        .refused("volume s has fewer than two in-sync plexes: there is nothing to compare");
    sb.mv(&["scrub", "nosuch"])
        .refused("volume nosuch does not exist");
    assert_eq!(sb.fingerprint(), before);
}

#[test]
fn scrub_compares_only_the_in_sync_plexes() {
    let sb = Sandbox::new();
    three_disks(&sb);
    mirror(&sb, "m", SIZE, &["a.img", "b.img"]);
    sb.mv(&["fail", &sb.p("disks/b.img")]).ok();
    sb.mv(&["scrub", "m"])
        .refused("volume m has fewer than two in-sync plexes");
}

#[test]
fn a_throttled_scrub_takes_as_long_as_its_rate_says() {
    let sb = Sandbox::new();
    three_disks(&sb);
    mirror(&sb, "m", SIZE, &["a.img", "b.img"]);
    let t = std::time::Instant::now();
    let r = scrub_json(&sb, &["m", "--rate", "6M"]);
    assert_eq!(r["checked_bytes"], SIZE);
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(450),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn a_read_error_stops_the_scrub_with_exit_1_and_fails_that_plex() {
    use mirrorvol::disk::{Disk, FaultyDisk};
    use mirrorvol::group::{DiskSet, Group, Lookup, NoProgress};
    use std::sync::Arc;

    let sb = Sandbox::new();
    three_disks(&sb);
    mirror(&sb, "m", SIZE, &["a.img", "b.img"]);
    let bad_at = plex_start(&sb, "b.img", "m") + MIB + 4096;
    let set = DiskSet::expand(&[sb.path("disks")], Default::default()).unwrap();
    {
        let mut g = Group::assemble(&set, Lookup::Required).unwrap().unwrap();
        let b = g.resolve_disk(&sb.path("disks/b.img")).unwrap();
        g.wrap_disks(|uuid, disk| {
            if uuid != b {
                return disk;
            }
            let f = Arc::new(FaultyDisk::new(disk));
            f.fail_reads(bad_at..bad_at + 512);
            f as Arc<dyn Disk>
        });
        // Through the group's controller, as the command runs it.
        let live = mirrorvol::group::live::LiveGroup::start(g, Default::default());
        let e = live.scrub("m", false, None, &NoProgress).unwrap_err();
        assert_eq!(e.exit_code(), 1, "{e}");
        assert!(
            e.to_string()
                .contains(&format!("stopped at volume offset {MIB}")),
            "{e}"
        );
    }
    let s = sb.status();
    let m = volume(&s, "m");
    assert_eq!(m["state"], "failed-redundancy");
    let states: Vec<&str> = strings(&m["plexes"], "state");
    assert_eq!(states, ["in-sync", "failed"]);
}

#[test]
fn serve_scrubs_in_the_background_and_reports_the_mismatching_range() {
    let sb = Sandbox::new();
    three_disks(&sb);
    mirror(&sb, "m", 4 << 20, &["a.img", "b.img"]);
    corrupt(&sb, "b.img", "m", 3 << 20, 4096);
    let served =
        serve::Served::start_args(&sb, &["--scrub-interval", "1", "--scrub-rate", "64M"], &[]);
    let want = format!(
        "scrub of volume m: plexes differ at offset {}, 4096 bytes",
        3 << 20
    );
    let start = std::time::Instant::now();
    while !served.stderr().contains(&want) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "no scrub report:\n{}",
            served.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (code, _) = served.stop();
    assert_eq!(code, 0);
    // A background scrub only reports: the plexes still differ.
    let r = scrub_json(&sb, &["m"]);
    assert_eq!(ranges(&r).len(), 1);
}
