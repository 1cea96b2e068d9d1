//! Block checksums on image files: bytes flipped in one plex's data area
//! (or in its checksum area) behind mirrorvol's back, offline and while
//! `serve` runs, are found by the reads that meet them, served from the
//! copy that matches its checksums, and repaired on disk; copies that are
//! both bad fail the read rather than return either.

mod common;

use std::os::unix::fs::FileExt;

use common::serve::{self, Served};
use common::*;

const MIB: u64 = 1 << 20;

/// Where the checksum of volume offset `at` of `name`'s plex on `file`
/// lies in that file.
fn sum_at(sb: &Sandbox, file: &str, name: &str, at: u64) -> u64 {
    let r = sb
        .mv_plain(&["examine", &sb.p(&format!("disks/{file}")), "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let data = v["label"]["data_offset"].as_u64().unwrap();
    let sums = v["label"]["checksum_offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("checksum_offset in {v:#}"));
    let plex = plex_start(sb, file, name) - data;
    sums + (plex + at) / 4096 * 4
}

fn entry(sb: &Sandbox, file: &str, at: u64) -> u32 {
    let b = read_range(&sb.path("disks").join(file), at, 4);
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn poke(sb: &Sandbox, file: &str, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(sb.path("disks").join(file))
        .unwrap();
    f.write_all_at(bytes, at).unwrap();
    f.sync_all().unwrap();
}

/// A two-way mirror `data` of 16 MiB on a.img and b.img, filled with a
/// pattern through mirrorvol; returns the pattern.
fn filled(sb: &Sandbox) -> Vec<u8> {
    serve::mirror_group(sb, 64, 16);
    let (src, data) = sb.data_file("fill.bin", (16 * MIB) as usize, 7);
    sb.mv(&["copy", &src, "vol:data"]).ok();
    data
}

/// Waits (10 s at most) until the block at volume offset `at` of `data`'s
/// plex on `file` holds 0x5a again: a read's repair follows its answer.
fn wait_repaired(sb: &Sandbox, file: &str, at: u64) {
    let t = std::time::Instant::now();
    while plex_read(sb, file, "data", at, 4096) != vec![0x5a; 4096] {
        assert!(t.elapsed().as_secs() < 10, "{file} not repaired at {at}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The `scrub --json` report of volume `data`.
fn scrub_json(sb: &Sandbox, repair: bool) -> serde_json::Value {
    let mut args = vec!["scrub", "data", "--json"];
    if repair {
        args.push("--repair");
    }
    let r = sb.mv(&args).ok();
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

/// A copy flipped in two places, one on each plex, offline: the volume
/// reads back right whichever plex each read goes to; `scrub` names, for
/// each flipped range, the plex whose copy fails its checksums (the first
/// plex as often as the second: no guess), and `--repair` mends exactly
/// those from the good copy.
#[test]
fn flipped_bytes_on_either_copy_are_read_right_and_scrub_names_the_bad_copy() {
    let sb = Sandbox::new();
    let data = filled(&sb);
    // Checksums are on disk after the command's clean stop.
    let at = sum_at(&sb, "a.img", "data", MIB);
    assert_eq!(
        entry(&sb, "a.img", at),
        crc32c::crc32c(&data[MIB as usize..MIB as usize + 4096])
    );
    corrupt(&sb, "a.img", "data", MIB + 100, 10);
    corrupt(&sb, "b.img", "data", 9 * MIB, 4096);
    assert!(plex_read(&sb, "a.img", "data", MIB, 4096) != data[MIB as usize..][..4096]);
    let got = sb.read_volume("data");
    assert!(got == data, "the volume reads back as written");
    // What the reads did not meet (a read repairs what it meets), scrub
    // finds, naming the bad copy by its checksums.
    let report = scrub_json(&sb, false);
    for r in report["ranges"].as_array().unwrap() {
        assert_eq!(r["verdict"], "checksum", "{report:#}");
        let off = r["offset"].as_u64().unwrap();
        let bad = if off < 4 * MIB { "a.img" } else { "b.img" };
        let outvoted = r["outvoted"][0].as_str().unwrap();
        assert!(outvoted.ends_with(bad), "{report:#}");
    }
    let report = scrub_json(&sb, true);
    assert!(
        report["mismatches"].as_u64() == report["repaired"].as_u64(),
        "{report:#}"
    );
    assert!(plex_read(&sb, "a.img", "data", 0, data.len()) == data);
    assert!(plex_read(&sb, "b.img", "data", 0, data.len()) == data);
    assert_eq!(scrub_json(&sb, false)["mismatches"], 0);
}

/// `scrub --repair` keeps the copy that matches its checksums even where
/// the old rule (ties to the first plex) would have copied the bad one
/// over it: the first plex is the one flipped.
#[test]
fn scrub_repair_never_copies_the_bad_copy_over_the_good_one() {
    let sb = Sandbox::new();
    let data = filled(&sb);
    corrupt(&sb, "a.img", "data", 5 * MIB, 4096);
    let report = scrub_json(&sb, true);
    let ranges = report["ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 1, "{report:#}");
    assert_eq!(ranges[0]["verdict"], "checksum");
    assert!(
        ranges[0]["kept"].as_str().unwrap().ends_with("b.img"),
        "{report:#}"
    );
    assert!(plex_read(&sb, "a.img", "data", 0, data.len()) == data);
    assert!(plex_read(&sb, "b.img", "data", 0, data.len()) == data);
    let text = sb.mv(&["scrub", "data"]).ok().stdout;
    assert!(text.contains("identical"), "{text}");
}

/// A damaged checksum block: the data of that plex is right and matches
/// its twin. Reads serve it as it is (whichever copy they go to), `scrub`
/// says the checksum is what is wrong, and `--repair` rewrites it without
/// writing data.
#[test]
fn a_damaged_checksum_entry_is_found_and_rewritten_from_the_data() {
    let sb = Sandbox::new();
    let data = filled(&sb);
    let at = sum_at(&sb, "a.img", "data", 5 * MIB);
    let good = entry(&sb, "a.img", at);
    poke(&sb, "a.img", at, &(!good).to_le_bytes());
    let got = sb.read_volume("data");
    assert!(got == data);
    // A read that met it mended it already; else scrub finds it.
    if entry(&sb, "a.img", at) != good {
        let report = scrub_json(&sb, false);
        let ranges = report["ranges"].as_array().unwrap();
        assert_eq!(ranges.len(), 1, "{report:#}");
        assert_eq!(ranges[0]["verdict"], "checksum-entry");
        assert_eq!(ranges[0]["offset"], 5 * MIB);
        assert_eq!(ranges[0]["length"], 4096);
        assert!(
            ranges[0]["outvoted"][0]
                .as_str()
                .unwrap()
                .ends_with("a.img")
        );
        let before = plex_read(&sb, "a.img", "data", 0, data.len());
        let text = sb.mv(&["scrub", "data", "--repair"]).ok().stdout;
        assert!(text.contains("the checksums on"), "{text}");
        assert!(plex_read(&sb, "a.img", "data", 0, data.len()) == before);
    }
    assert_eq!(entry(&sb, "a.img", at), good, "the entry was mended");
    assert!(plex_read(&sb, "a.img", "data", 0, data.len()) == data);
}

/// Both copies of one block flipped, differently: no copy can be trusted
/// there, so the read fails (as a disk's unreadable sector would) rather
/// than return either; the rest of the volume still reads.
#[test]
fn a_block_bad_on_every_copy_fails_its_read_and_no_other() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    let data = filled(&sb);
    corrupt(&sb, "a.img", "data", 3 * MIB, 512);
    corrupt(&sb, "b.img", "data", 3 * MIB + 1024, 512);
    let events = sb.path("events.jsonl");
    let hook = format!("cat >> {}", events.display());
    let s = Served::start_args(&sb, &["--on-event", &hook], &[]);
    let uri = s.uri("data");
    let (code, out, err) = serve::run(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "read 3M 4k",
    ]));
    assert!(
        out.contains("Input/output error") || err.contains("Input/output error"),
        "{code} {out} {err}"
    );
    let out = serve::qemu_io(&uri, &["read -v 0 4k"]);
    assert!(out.contains("read 4096/4096"), "{out}");
    let before = &data[(3 * MIB - 4096) as usize..(3 * MIB) as usize];
    assert!(plex_read(&sb, "a.img", "data", 3 * MIB - 4096, 4096) == before);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    let text = std::fs::read_to_string(&events).unwrap_or_default();
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"checksum-mismatch\"") && l.contains("\"repaired\":\"no\""))
        .collect();
    assert!(bad.len() >= 2, "events: {text}\nlog: {log}");
}

/// While `serve` runs: bytes flipped under it are served right through a
/// real NBD client, the copy is repaired, the error is counted, and a
/// `checksum-mismatch` event goes to the hook.
#[test]
fn flipped_bytes_under_serve_are_served_right_repaired_and_reported() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    serve::mirror_group(&sb, 64, 16);
    let events = sb.path("events.jsonl");
    let hook = format!("cat >> {}", events.display());
    let s = Served::start_args(&sb, &["--on-event", &hook], &[]);
    let uri = s.uri("data");
    serve::qemu_io(&uri, &["write -P 0x5a 0 8M", "flush"]);
    // Each copy flipped once, at places the reads below cover whole.
    corrupt(&sb, "a.img", "data", 2 * MIB, 4096);
    corrupt(&sb, "b.img", "data", 6 * MIB + 4096, 8);
    // Reads bypass the page cache of the files (O_DIRECT): they see the
    // flipped bytes, and the answer is still right.
    serve::qemu_io(&uri, &["read -P 0x5a 0 8M"]);
    // The repair follows the answer, under the range lock.
    for (file, at) in [("a.img", 2 * MIB), ("b.img", 6 * MIB + 4096)] {
        wait_repaired(&sb, file, at);
    }
    let st = serve::status(&sb);
    let errors: u64 = st["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["errors"].as_u64().unwrap_or(0))
        .sum();
    assert!(errors >= 2, "errors counted: {st:#}");
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    let text = std::fs::read_to_string(&events).unwrap_or_default();
    let mismatches: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"checksum-mismatch\""))
        .collect();
    assert!(mismatches.len() >= 2, "events: {text}\nlog: {log}");
    assert!(
        mismatches.iter().any(|l| l.contains("a.img"))
            && mismatches.iter().any(|l| l.contains("b.img")),
        "{text}"
    );
}

/// Where only one copy's checksum is known and it fails, the other copy
/// (unknown) is kept, never the one known bad; where every copy fails its
/// checksum, scrub says no copy is good and `--repair` leaves both alone.
#[test]
fn scrub_never_keeps_a_copy_known_bad_and_leaves_a_block_bad_everywhere() {
    let sb = Sandbox::new();
    let data = filled(&sb);
    // a's copy at 2 MiB is bad; b's checksum there is unknown.
    corrupt(&sb, "a.img", "data", 2 * MIB, 4096);
    poke(&sb, "b.img", sum_at(&sb, "b.img", "data", 2 * MIB), &[0; 4]);
    // Both copies at 7 MiB are bad, differently.
    corrupt(&sb, "a.img", "data", 7 * MIB, 512);
    corrupt(&sb, "b.img", "data", 7 * MIB + 2048, 512);
    let before_b = plex_read(&sb, "b.img", "data", 7 * MIB, 4096);
    let report = scrub_json(&sb, true);
    let ranges = report["ranges"].as_array().unwrap();
    let at = |off: u64| {
        ranges
            .iter()
            .find(|r| r["offset"].as_u64().unwrap() / 4096 == off / 4096)
            .unwrap_or_else(|| panic!("a range at {off}: {report:#}"))
    };
    assert!(
        at(2 * MIB)["kept"].as_str().unwrap().ends_with("b.img"),
        "{report:#}"
    );
    assert_eq!(at(2 * MIB)["repaired"], true);
    assert!(plex_read(&sb, "a.img", "data", 2 * MIB, 4096) == data[(2 * MIB) as usize..][..4096]);
    assert_eq!(at(7 * MIB)["verdict"], "no-good-copy", "{report:#}");
    assert_eq!(at(7 * MIB)["repaired"], false);
    assert!(plex_read(&sb, "b.img", "data", 7 * MIB, 4096) == before_b);
    let text = sb.mv(&["scrub", "data"]).ok().stdout;
    assert!(text.contains("none is known good"), "{text}");
}

/// With checksums off (MIRRORVOL_NO_CHECKSUMS=1, for benchmarks) the disks'
/// checksums are forgotten, not left stale: a later run with them reads
/// everything written meanwhile without an error.
#[test]
fn a_run_without_checksums_leaves_none_stale() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    let data = filled(&sb);
    let s = Served::start(&sb, &[], &[("MIRRORVOL_NO_CHECKSUMS", "1")]);
    serve::qemu_io(
        &s.uri("data"),
        &["write -P 0x3c 1M 2M", "write -P 0x11 12M 64k", "flush"],
    );
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    let mut want = data.clone();
    want[MIB as usize..(3 * MIB) as usize].fill(0x3c);
    want[(12 * MIB) as usize..(12 * MIB) as usize + 65536].fill(0x11);
    let events = sb.path("events.jsonl");
    let hook = format!("cat >> {}", events.display());
    let s = Served::start_args(&sb, &["--on-event", &hook], &[]);
    serve::qemu_io(
        &s.uri("data"),
        &["read -P 0x3c 1M 2M", "read -P 0x11 12M 64k"],
    );
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    let text = std::fs::read_to_string(&events).unwrap_or_default();
    assert!(!text.contains("checksum-mismatch"), "{text}");
    assert!(sb.read_volume("data") == want);
    assert_eq!(scrub_json(&sb, false)["mismatches"], 0);
}

/// A write of less than 4 KiB gets its block's checksum from a verified
/// read of the rest of the block (a read-modify-write): the entries on both
/// disks are those of the blocks as they end up, and a later flip in such
/// a block is named by the checksums, not by the first-plex rule.
#[test]
fn a_write_smaller_than_a_block_keeps_its_block_checksummed() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    let mut data = filled(&sb);
    let s = Served::start(&sb, &[], &[]);
    serve::qemu_io(
        &s.uri("data"),
        &["write -P 0x77 4608 512", "write -P 0x78 3M 1536", "flush"],
    );
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    data[4608..5120].fill(0x77);
    data[(3 * MIB) as usize..(3 * MIB) as usize + 1536].fill(0x78);
    for file in ["a.img", "b.img"] {
        for at in [4096, 3 * MIB] {
            let want = crc32c::crc32c(&data[at as usize..at as usize + 4096]);
            assert_eq!(
                entry(&sb, file, sum_at(&sb, file, "data", at)),
                want,
                "{file} at {at}"
            );
        }
    }
    corrupt(&sb, "a.img", "data", 4096 + 2048, 512);
    let report = scrub_json(&sb, true);
    assert_eq!(report["ranges"][0]["verdict"], "checksum", "{report:#}");
    assert!(plex_read(&sb, "a.img", "data", 0, data.len()) == data);
}

/// Scrub, `test-mirrors` and reads honour the written map: a region the
/// volume never wrote reads as zeroes whatever a disk holds there (here,
/// bytes planted behind mirrorvol's back), scrub does not read it (and
/// says how much it skipped), and each plex tested alone serves it as
/// zeroes too.
#[test]
fn never_written_regions_read_as_zeroes_and_scrub_and_test_mirrors_skip_them() {
    let sb = Sandbox::new();
    serve::mirror_group(&sb, 64, 32);
    let (src, data) = sb.data_file("fill.bin", (4 * MIB) as usize, 9);
    sb.mv(&["copy", &src, "vol:data"]).ok();
    // Garbage where the volume never wrote, on one copy only.
    corrupt(&sb, "b.img", "data", 20 * MIB, 65536);
    assert!(plex_read(&sb, "b.img", "data", 20 * MIB, 4096) != vec![0u8; 4096]);
    let mut want = vec![0u8; (32 * MIB) as usize];
    want[..data.len()].copy_from_slice(&data);
    assert!(sb.read_volume("data") == want);
    let report = scrub_json(&sb, false);
    assert_eq!(report["mismatches"], 0, "{report:#}");
    assert_eq!(report["unwritten_bytes"], 28 * MIB, "{report:#}");
    let text = sb.mv(&["scrub", "data"]).ok().stdout;
    assert!(text.contains("28 MiB of it never written"), "{text}");
    let r = sb.mv(&["test-mirrors", "data"]).ok();
    assert!(r.stdout.contains("2 passed, 0 failed"), "{}", r.stdout);
}

/// A rebuild leaves alone the stale entries a disk carries from an
/// earlier life where the volume was never written (never used: those
/// regions read as zeroes, and a region's first mark gives it the zero
/// block's). A write smaller than a block into such a region, after the
/// rebuild, reads back right, leaves right entries for its whole region,
/// and scrub and `test-mirrors` find both copies good.
#[test]
fn a_rebuilt_copy_with_stale_entries_where_nothing_was_written_gets_them_right() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    serve::mirror_group(&sb, 64, 32);
    let (src, data) = sb.data_file("fill.bin", (4 * MIB) as usize, 11);
    sb.mv(&["copy", &src, "vol:data"]).ok();
    sb.mv(&["remove-mirror", "data", "--disk", &sb.p("disks/b.img")])
        .ok();
    // Garbage over b.img's whole checksum area (64 KiB covers 64 MiB).
    let r = sb
        .mv_plain(&["examine", &sb.p("disks/b.img"), "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let area = v["label"]["checksum_offset"].as_u64().unwrap();
    poke(&sb, "b.img", area, &[0xAB; 65536]);
    let r = sb
        .mv(&["add-mirror", "data", "--disk", &sb.p("disks/b.img")])
        .ok();
    assert!(r.stdout.contains("given as zeroes"), "{}", r.stdout);
    // The written copy's entries are right on the rebuilt disk.
    let at = sum_at(&sb, "b.img", "data", 0);
    assert_eq!(entry(&sb, "b.img", at), crc32c::crc32c(&data[..4096]));
    // Where nothing was written the rebuild leaves the entries alone
    // (never used: those regions read as zeroes); the first write there
    // gives its region the right ones, below.
    let stale = sum_at(&sb, "b.img", "data", 20 * MIB);
    assert_eq!(entry(&sb, "b.img", stale), 0xABAB_ABAB);
    let s = Served::start(&sb, &[], &[]);
    serve::qemu_io(&s.uri("data"), &["write -P 0x5a 20971904 512", "flush"]);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    let mut want = vec![0u8; (32 * MIB) as usize];
    want[..data.len()].copy_from_slice(&data);
    want[20971904..20971904 + 512].fill(0x5a);
    assert!(sb.read_volume("data") == want);
    // Every entry of the region now written is that of what b.img holds.
    for block in 0..16u64 {
        let off = 20 * MIB + block * 4096;
        let want_sum = crc32c::crc32c(&want[off as usize..off as usize + 4096]);
        assert_eq!(
            entry(&sb, "b.img", sum_at(&sb, "b.img", "data", off)),
            want_sum,
            "b.img's entry for volume offset {off}"
        );
    }
    let report = scrub_json(&sb, false);
    assert_eq!(report["mismatches"], 0, "{report:#}");
    let r = sb.mv(&["test-mirrors", "data"]).ok();
    assert!(r.stdout.contains("2 passed, 0 failed"), "{}", r.stdout);
}

/// A rebuild whose source copy was flipped behind mirrorvol's back: the
/// copy's checksums (computed once, for the check and for the target's
/// entries) catch it, the chunk is read from the other copy instead, the
/// flipped copy is repaired, and the new copy gets the right data and the
/// right entries (not those of the flipped bytes).
#[test]
fn a_rebuild_from_a_flipped_copy_copies_and_hashes_the_good_one() {
    let sb = Sandbox::new();
    let data = filled(&sb);
    let r = sb.mv(&["status", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let first = v["volumes"][0]["plexes"][0]["disk"]
        .as_str()
        .unwrap()
        .to_string();
    let source = if first.ends_with("a.img") {
        "a.img"
    } else {
        "b.img"
    };
    corrupt(&sb, source, "data", 3 * MIB + 8192, 4096);
    sb.image("c.img", 64);
    sb.mv(&["init", &sb.p("disks/c.img")]).ok();
    let out = sb
        .mv(&["add-mirror", "data", "--disk", &sb.p("disks/c.img")])
        .ok()
        .stdout;
    assert!(out.contains("in sync"), "{out}");
    for file in ["a.img", "b.img", "c.img"] {
        assert!(
            plex_read(&sb, file, "data", 0, data.len()) == data,
            "{file} holds the data written"
        );
    }
    for off in [0, 3 * MIB + 8192, 15 * MIB] {
        let want = crc32c::crc32c(&data[off as usize..off as usize + 4096]);
        let at = sum_at(&sb, "c.img", "data", off);
        assert_eq!(entry(&sb, "c.img", at), want, "c.img's entry at {off}");
    }
    assert_eq!(scrub_json(&sb, false)["mismatches"], 0);
}

/// A read smaller than a block (512 bytes, as a client with 512-byte
/// sectors sends) is checked against its whole block's checksum: bytes
/// flipped in the same 4 KiB block, past the 512 read, are found, the
/// answer comes from the good copy, and the bad one is repaired.
#[test]
fn a_read_smaller_than_a_block_checks_the_whole_block_and_repairs_it() {
    if !serve::tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    serve::mirror_group(&sb, 64, 16);
    let s = Served::start(&sb, &[], &[]);
    let uri = s.uri("data");
    serve::qemu_io(&uri, &["write -P 0x5a 0 4M", "flush"]);
    corrupt(&sb, "a.img", "data", 2 * MIB + 1000, 10);
    // Reads rotate between the copies: a.img serves some of them.
    let read = format!("read -P 0x5a {} 512", 2 * MIB);
    serve::qemu_io(&uri, &[read.as_str(); 4]);
    wait_repaired(&sb, "a.img", 2 * MIB);
    // The error is counted once the repair is read back.
    serve::wait_status(&sb, &s, 10, "an error counted on a.img", |st| {
        st["disks"].as_array().is_some_and(|disks| {
            disks.iter().any(|d| {
                d["path"].as_str().is_some_and(|p| p.ends_with("a.img"))
                    && d["errors"].as_u64().unwrap_or(0) >= 1
            })
        })
    });
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
}
