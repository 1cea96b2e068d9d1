//! Damaged metadata at the group level, on real image files: a destroyed
//! label copy or config slot is covered by the other copies, reported, and
//! healed by the next config change; a torn config write loses nothing; a
//! disk whose every label copy is damaged is treated as missing, so its
//! mirror keeps working; and when nothing readable is left the error is
//! clear, names the disks and exits 1, never a panic.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use mirrorvol::disk::{FileDisk, OpenOptions};
use mirrorvol::format::layout::{CONFIG_SLOT_SIZE, LABEL_SIZE};
use mirrorvol::format::ondisk::{self, LabelRead, SlotRead};
use mirrorvol::format::slot::{ConfigSlot, SLOT_HEADER_LEN};
use mirrorvol::format::{GroupConfig, Label};
use mirrorvol::group::{DiskSet, Group, Lookup};

const FILES: [&str; 3] = ["a.img", "b.img", "c.img"];
const SLOT_NAMES: [&str; 2] = ["A", "B"];

/// `n` disks of 64 MiB in group `g`: a.img (gpt, c0), b.img (mbr, c1),
/// c.img (raw, c2).
fn init_disks(sb: &Sandbox, n: usize) {
    let styles = ["gpt", "mbr", "raw"];
    for i in 0..n {
        let img = sb.image(FILES[i], 64);
        let ctrl = format!("c{i}");
        let mut args = vec!["init", &img, "--style", styles[i], "--controller", &ctrl];
        if i == 0 {
            args.extend(["--group", "g"]);
            sb.mv_plain(&args).ok();
        } else {
            sb.mv(&args).ok();
        }
    }
}

/// The disks of [`init_disks`], with a mirror `m` of 4 MiB with a plex on
/// each, filled with known data.
fn group(sb: &Sandbox, n: usize) -> Vec<u8> {
    init_disks(sb, n);
    let copies = n.to_string();
    sb.mv(&[
        "create", "m", "--size", "4M", "--mirror", "--copies", &copies,
    ])
    .ok();
    let (src, data) = sb.data_file("data.bin", 4 * MIB as usize, 7);
    sb.mv(&["copy", &src, "vol:m"]).ok();
    data
}

fn disk_path(sb: &Sandbox, file: &str) -> PathBuf {
    sb.path("disks").join(file)
}

fn open_ro(path: &Path) -> FileDisk {
    FileDisk::open(
        path,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

fn read_label(path: &Path) -> LabelRead {
    ondisk::read_label(&open_ro(path))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .unwrap_or_else(|| panic!("{}: no label", path.display()))
}

fn read_slots(path: &Path, label: &Label) -> SlotRead {
    ondisk::read_config(&open_ro(path), label).unwrap()
}

/// Overwrites `len` bytes at `offset` of a file with pseudo-random garbage.
fn garbage(path: &Path, offset: u64, len: usize, seed: u64) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&pattern(len, seed), offset).unwrap();
    f.sync_all().unwrap();
}

/// Damages a label copy but keeps its magic: a decoder sees damage, not a
/// disk that was never labelled.
fn smash_keeping_magic(path: &Path, offset: u64) {
    garbage(path, offset + 16, 64, 99);
}

fn seqno(sb: &Sandbox) -> u64 {
    sb.status()["group"]["seqno"].as_u64().unwrap()
}

/// `status --json` succeeds, and its warnings (stderr) are returned.
fn status_warnings(sb: &Sandbox) -> (serde_json::Value, String) {
    let r = sb.mv(&["status", "--json"]).ok();
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    (serde_json::from_str(&r.stdout).unwrap(), r.stderr)
}

/// Every label copy and config slot of every disk is good and holds the
/// group's newest config.
#[track_caller]
fn assert_all_metadata_good(sb: &Sandbox, n: usize) {
    let seq = seqno(sb);
    for file in &FILES[..n] {
        let path = disk_path(sb, file);
        let read = read_label(&path);
        assert!(read.primary_ok && read.backup_ok, "{file}: {read:?}");
        let slots = read_slots(&path, &read.label);
        assert_eq!(slots.valid, [true, true], "{file}");
        assert_eq!(slots.newest.unwrap().1.seqno, seq, "{file}");
    }
    let (_, warnings) = status_warnings(sb);
    assert!(!warnings.contains("warning"), "{warnings}");
}

#[test]
fn a_destroyed_primary_label_is_covered_by_the_backup_and_healed_by_the_next_change() {
    let sb = Sandbox::new();
    let data = group(&sb, 3);
    for (i, file) in FILES.iter().enumerate() {
        let path = disk_path(&sb, file);
        let label = read_label(&path).label;
        garbage(
            &path,
            label.layout.primary_label_offset(),
            LABEL_SIZE as usize,
            i as u64,
        );
        let read = read_label(&path);
        assert_eq!((read.primary_ok, read.backup_ok), (false, true), "{file}");
        assert_eq!(read.label, label, "{file}: the backup stands in");

        let (s, warnings) = status_warnings(&sb);
        assert_eq!(disk(&s, file)["state"], "online", "{file}");
        assert_eq!(volume(&s, "m")["state"], "healthy", "{file}");
        assert!(
            warnings.contains(file) && warnings.contains("damaged primary label"),
            "{file}: {warnings}"
        );
        assert_eq!(sb.read_volume("m"), data, "{file}");
        // Reading changes no metadata: still damaged until a config change.
        assert!(!read_label(&path).primary_ok, "{file}");

        sb.mv(&["create", &format!("x{i}"), "--size", "1M"]).ok();
        assert_all_metadata_good(&sb, 3);
    }
    assert_eq!(sb.read_volume("m"), data);
}

#[test]
fn a_destroyed_backup_label_is_covered_by_the_primary_and_healed_by_the_next_change() {
    let sb = Sandbox::new();
    let data = group(&sb, 3);
    for (i, file) in FILES.iter().enumerate() {
        let path = disk_path(&sb, file);
        let label = read_label(&path).label;
        garbage(
            &path,
            label.layout.backup_label_offset(),
            LABEL_SIZE as usize,
            10 + i as u64,
        );
        let read = read_label(&path);
        assert_eq!((read.primary_ok, read.backup_ok), (true, false), "{file}");
        assert_eq!(read.label, label);

        let (s, warnings) = status_warnings(&sb);
        assert_eq!(volume(&s, "m")["state"], "healthy", "{file}");
        assert!(
            warnings.contains(file) && warnings.contains("damaged backup label"),
            "{file}: {warnings}"
        );
        assert_eq!(sb.read_volume("m"), data, "{file}");

        sb.mv(&["create", &format!("x{i}"), "--size", "1M"]).ok();
        assert_all_metadata_good(&sb, 3);
    }
    assert_eq!(sb.read_volume("m"), data);
}

/// Destroys the config slot `slot` of a.img after making sure it holds that
/// disk's newest config; the group then takes the newest config from the
/// other disks, reports a.img as damaged and behind, and the next change
/// heals it.
fn destroyed_newest_config_slot_is_covered_and_healed(slot: usize) {
    let sb = Sandbox::new();
    let data = group(&sb, 3);
    let a = disk_path(&sb, "a.img");
    let label = read_label(&a).label;
    if read_slots(&a, &label).newest.unwrap().0 != slot {
        sb.mv(&["create", "pad", "--size", "1M"]).ok();
    }
    let (newest, config) = read_slots(&a, &label).newest.unwrap();
    assert_eq!(newest, slot);
    let seq = seqno(&sb);
    assert_eq!(config.seqno, seq);

    garbage(
        &a,
        label.layout.config_slot_offset(slot),
        CONFIG_SLOT_SIZE as usize,
        20,
    );
    let slots = read_slots(&a, &label);
    assert!(!slots.valid[slot]);
    assert_eq!(slots.newest.as_ref().unwrap().0, 1 - slot);
    assert_eq!(slots.newest.unwrap().1.seqno, seq - 1, "the older slot");

    let (s, warnings) = status_warnings(&sb);
    assert_eq!(s["group"]["seqno"], seq, "the newest config of the others");
    assert_eq!(volume(&s, "m")["state"], "healthy");
    let slot_name = format!("config slot {}", SLOT_NAMES[slot]);
    assert!(
        warnings.contains("a.img") && warnings.contains(&slot_name),
        "{warnings}"
    );
    assert!(
        warnings.contains("missed the last config change"),
        "{warnings}"
    );
    assert_eq!(sb.read_volume("m"), data);

    sb.mv(&["create", "x", "--size", "1M"]).ok();
    assert_all_metadata_good(&sb, 3);
    assert_eq!(sb.read_volume("m"), data);
}

#[test]
fn a_destroyed_newest_config_in_slot_a_is_covered_by_the_other_disks_and_healed() {
    destroyed_newest_config_slot_is_covered_and_healed(0);
}

#[test]
fn a_destroyed_newest_config_in_slot_b_is_covered_by_the_other_disks_and_healed() {
    destroyed_newest_config_slot_is_covered_and_healed(1);
}

#[test]
fn destroying_the_newest_config_slot_on_every_disk_falls_back_to_the_older_slot() {
    let sb = Sandbox::new();
    let data = group(&sb, 2);
    let before = seqno(&sb);
    sb.mv(&["create", "last", "--size", "1M"]).ok();
    for file in &FILES[..2] {
        let path = disk_path(&sb, file);
        let label = read_label(&path).label;
        let (newest, _) = read_slots(&path, &label).newest.unwrap();
        garbage(&path, label.layout.config_slot_offset(newest), 4096, 30);
    }
    // The last change is lost on every disk, as if it had never been
    // committed; everything before it is intact.
    let (s, warnings) = status_warnings(&sb);
    assert_eq!(s["group"]["seqno"], before);
    assert!(
        s["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["name"] != "last"),
        "{s:#}"
    );
    assert_eq!(volume(&s, "m")["state"], "healthy");
    assert!(warnings.contains("damaged config slot"), "{warnings}");
    assert_eq!(sb.read_volume("m"), data);

    sb.mv(&["create", "again", "--size", "1M"]).ok();
    assert_all_metadata_good(&sb, 2);
}

/// Writes the first half of a new config (seqno + 1, with one more volume)
/// over the older slot of `path`, as a crash in the middle of a commit would.
fn torn_write(path: &Path) {
    let label = read_label(path).label;
    let (newest, slot) = read_slots(path, &label).newest.unwrap();
    let mut config = GroupConfig::from_text(&slot.text).unwrap();
    config.seqno += 1;
    let mut extra = config.volumes[0].clone();
    extra.name = "torn".into();
    config.volumes.push(extra);
    let text = config.to_text().into_bytes();
    let buf = ConfigSlot {
        seqno: slot.seqno + 1,
        group_uuid: label.group_uuid,
        text: text.clone(),
    }
    .encode(CONFIG_SLOT_SIZE as usize)
    .unwrap();
    // Half of the header and text: the write stops inside the text.
    let cut = (SLOT_HEADER_LEN + text.len()) / 2;
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&buf[..cut], label.layout.config_slot_offset(1 - newest))
        .unwrap();
    f.sync_all().unwrap();
    let slots = read_slots(path, &label);
    assert!(!slots.valid[1 - newest], "the torn slot is not valid");
    assert!(!slots.empty[1 - newest]);
    assert_eq!(slots.newest.unwrap().1, slot, "the previous config stands");
}

#[test]
fn a_torn_config_write_on_every_disk_loses_nothing() {
    let sb = Sandbox::new();
    let data = group(&sb, 3);
    let seq = seqno(&sb);
    let before = sb.status()["volumes"].clone();
    for file in FILES {
        torn_write(&disk_path(&sb, file));
    }
    let (s, warnings) = status_warnings(&sb);
    assert_eq!(s["group"]["seqno"], seq, "the previous config is used");
    assert_eq!(s["volumes"], before);
    assert!(warnings.contains("damaged config slot"), "{warnings}");
    assert_eq!(sb.read_volume("m"), data);

    sb.mv(&["create", "x", "--size", "1M"]).ok();
    assert_all_metadata_good(&sb, 3);
    assert_eq!(sb.read_volume("m"), data);
}

#[test]
fn a_torn_config_write_on_one_disk_loses_nothing() {
    let sb = Sandbox::new();
    let data = group(&sb, 2);
    let seq = seqno(&sb);
    torn_write(&disk_path(&sb, "b.img"));
    let (s, warnings) = status_warnings(&sb);
    assert_eq!(s["group"]["seqno"], seq);
    assert_eq!(volume(&s, "m")["state"], "healthy");
    assert!(
        warnings.contains("b.img") && warnings.contains("damaged config slot"),
        "{warnings}"
    );
    assert_eq!(sb.read_volume("m"), data);
    sb.mv(&["delete", "m"]).ok();
    assert_all_metadata_good(&sb, 2);
}

/// Both label copies of b.img damaged, either way a disk dies: wholly
/// overwritten (magic gone) on its GPT partition, or scribbled over with
/// the magic intact.
fn both_labels_damaged(sb: &Sandbox, keep_magic: bool) -> PathBuf {
    let b = disk_path(sb, "b.img");
    let label = read_label(&b).label;
    for at in [
        label.layout.primary_label_offset(),
        label.layout.backup_label_offset(),
    ] {
        if keep_magic {
            smash_keeping_magic(&b, at);
        } else {
            garbage(&b, at, LABEL_SIZE as usize, 40);
        }
    }
    let err = ondisk::read_label(&open_ro(&b)).unwrap_err();
    assert!(
        matches!(err, ondisk::FormatError::Damaged),
        "the labels read as damaged: {err}"
    );
    b
}

/// Two disks a.img (gpt) and b.img (gpt here, so that wholly overwritten
/// labels still read as ours), mirror `m` on both.
fn two_gpt_disks(sb: &Sandbox) -> Vec<u8> {
    for (i, file) in FILES[..2].iter().enumerate() {
        let img = sb.image(file, 64);
        let ctrl = format!("c{i}");
        let mut args = vec!["init", &img, "--style", "gpt", "--controller", &ctrl];
        if i == 0 {
            args.extend(["--group", "g"]);
            sb.mv_plain(&args).ok();
        } else {
            sb.mv(&args).ok();
        }
    }
    sb.mv(&["create", "m", "--size", "4M", "--mirror"]).ok();
    let (src, data) = sb.data_file("data.bin", 4 * MIB as usize, 8);
    sb.mv(&["copy", &src, "vol:m"]).ok();
    data
}

fn both_labels_of_one_disk_damaged_leave_the_mirror_working(keep_magic: bool) {
    let sb = Sandbox::new();
    let data = two_gpt_disks(&sb);
    let b = both_labels_damaged(&sb, keep_magic);

    // Through a directory (the binary): b.img is reported and missing.
    let (s, warnings) = status_warnings(&sb);
    assert_eq!(disk(&s, "b.img")["state"], "missing", "{s:#}");
    assert_eq!(disk(&s, "a.img")["state"], "online");
    assert_eq!(volume(&s, "m")["state"], "failed-redundancy");
    let line = warnings
        .lines()
        .find(|l| l.contains("every label copy is damaged"))
        .unwrap_or_else(|| panic!("a warning about the labels: {warnings}"));
    assert!(line.contains("b.img"), "{line}");
    assert_eq!(sb.read_volume("m"), data);

    // Named explicitly (the library): the same.
    let set = DiskSet {
        explicit: vec![disk_path(&sb, "a.img"), b.clone()],
        ..DiskSet::default()
    };
    let g = Group::assemble(&set, Lookup::Required).unwrap().unwrap();
    assert_eq!(g.members.len(), 1);
    assert!(
        g.warnings
            .iter()
            .any(|w| w.contains("b.img") && w.contains("every label copy is damaged")),
        "{:?}",
        g.warnings
    );
    drop(g);

    // The mirror takes writes, and the damaged disk is left alone.
    let untouched = crc32c::crc32c(&fs::read(&b).unwrap());
    let (src, new) = sb.data_file("new.bin", MIB as usize, 9);
    // A disk that cannot say which it is is no disk of the majority.
    sb.mv(&["copy", &src, "vol:m"]).refused("--force-claim");
    sb.mv(&["--force-claim", "copy", &src, "vol:m"]).ok();
    let mut want = data;
    want[..MIB as usize].copy_from_slice(&new);
    assert_eq!(sb.read_volume("m"), want);
    assert_eq!(crc32c::crc32c(&fs::read(&b).unwrap()), untouched);
    let s = sb.status();
    assert_eq!(disk(&s, "b.img")["state"], "missing");
}

#[test]
fn both_labels_overwritten_on_one_disk_of_a_mirror_treat_it_as_missing() {
    both_labels_of_one_disk_damaged_leave_the_mirror_working(false);
}

#[test]
fn both_labels_scribbled_on_one_disk_of_a_mirror_treat_it_as_missing() {
    both_labels_of_one_disk_damaged_leave_the_mirror_working(true);
}

#[test]
fn every_config_slot_destroyed_on_every_disk_is_a_clear_error() {
    let sb = Sandbox::new();
    group(&sb, 2);
    for file in &FILES[..2] {
        let path = disk_path(&sb, file);
        let label = read_label(&path).label;
        for slot in 0..2 {
            garbage(&path, label.layout.config_slot_offset(slot), 4096, 50);
        }
    }
    let before = sb.fingerprint();
    let r = sb.mv(&["status"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(r.stderr.contains("config"), "{}", r.stderr);
    for file in &FILES[..2] {
        assert!(r.stderr.contains(file), "{}", r.stderr);
    }
    let r = sb.mv(&["create", "x", "--size", "1M"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(sb.fingerprint(), before, "a failed assembly writes nothing");
}

#[test]
fn every_metadata_copy_destroyed_on_every_disk_is_a_clear_error() {
    for keep_magic in [false, true] {
        let sb = Sandbox::new();
        two_gpt_disks(&sb);
        for file in &FILES[..2] {
            let path = disk_path(&sb, file);
            let label = read_label(&path).label;
            for slot in 0..2 {
                garbage(&path, label.layout.config_slot_offset(slot), 4096, 60);
            }
            for at in [
                label.layout.primary_label_offset(),
                label.layout.backup_label_offset(),
            ] {
                if keep_magic {
                    smash_keeping_magic(&path, at);
                } else {
                    garbage(&path, at, LABEL_SIZE as usize, 61);
                }
            }
        }
        let before = sb.fingerprint();
        for args in [&["status"][..], &["create", "x", "--size", "1M"]] {
            let r = sb.mv(args);
            assert_eq!(r.code, 1, "keep_magic={keep_magic}: {}", r.stderr);
            assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
            for file in &FILES[..2] {
                assert!(r.stderr.contains(file), "{}", r.stderr);
            }
        }
        assert_eq!(sb.fingerprint(), before, "a failed assembly writes nothing");
    }
}

/// a.img (gpt), b.img (mbr), c.img (raw); the mirror `m` on a and b and the
/// simple volume `solo` on a (its only copy), each filled. Returns their data.
fn group_with_a_sole_copy(sb: &Sandbox) -> (Vec<u8>, Vec<u8>) {
    init_disks(sb, FILES.len());
    let (a, b) = (sb.p("disks/a.img"), sb.p("disks/b.img"));
    sb.mv(&[
        "create", "m", "--size", "4M", "--mirror", "--disk", &a, "--disk", &b,
    ])
    .ok();
    sb.mv(&["create", "solo", "--size", "4M", "--disk", &a])
        .ok();
    let (src, m) = sb.data_file("m.bin", 4 * MIB as usize, 7);
    sb.mv(&["copy", &src, "vol:m"]).ok();
    let (src, solo) = sb.data_file("solo.bin", 4 * MIB as usize, 8);
    sb.mv(&["copy", &src, "vol:solo"]).ok();
    (m, solo)
}

/// Zeroes everything of a disk but its data area: partition table, both
/// label copies, config slots and bitmap.
fn wipe_metadata(path: &Path) {
    let layout = read_label(path).label.layout;
    let size = fs::metadata(path).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; layout.data_offset() as usize], 0)
        .unwrap();
    let end = layout.data_offset() + layout.data_size;
    f.write_all_at(&vec![0u8; (size - end) as usize], end)
        .unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_disk_wiped_of_all_metadata_is_reported_repaired_around_and_restored_with_its_data() {
    let sb = Sandbox::new();
    let (m, solo) = group_with_a_sole_copy(&sb);
    let a = sb.p("disks/a.img");
    wipe_metadata(Path::new(&a));

    // Every command goes on without it: status names it and why.
    let (st, warnings) = status_warnings(&sb);
    let entry = st["unreadable"]
        .as_array()
        .and_then(|u| u.iter().find(|e| e["path"] == a.as_str()))
        .unwrap_or_else(|| panic!("a.img is not listed unreadable: {st:#}"));
    assert!(
        entry["reason"]
            .as_str()
            .unwrap()
            .contains("no mirrorvol label"),
        "{entry}"
    );
    assert!(warnings.contains("a.img"), "{warnings}");
    assert_eq!(volume(&st, "m")["state"], "failed-redundancy", "{st:#}");
    assert_eq!(volume(&st, "solo")["state"], "failed", "{st:#}");
    assert_eq!(sb.read_volume("m"), m);

    // Plain init refuses the path, naming both ways out; nothing changes.
    refused_unchanged(&sb, &["init", &a, "--style", "gpt"], "init --restore");

    // repair moves m's plex to c.
    sb.mv(&["repair", "m"]).ok();
    let st = sb.status();
    assert_eq!(volume(&st, "m")["state"], "healthy", "{st:#}");

    // The label comes back from the config the other disks hold; the data
    // was never touched: reactivate puts solo back as it was.
    let r = sb.mv(&["init", "--restore", &a]).ok();
    assert!(r.stdout.contains("restored the label"), "{}", r.stdout);
    sb.mv(&["reactivate", &a]).ok();
    let st = sb.status();
    assert_eq!(disk(&st, "a.img")["state"], "online", "{st:#}");
    assert_eq!(volume(&st, "solo")["state"], "healthy", "{st:#}");
    assert_eq!(
        sb.read_volume("solo"),
        solo,
        "solo's data after the restore"
    );
    assert_eq!(sb.read_volume("m"), m);
    // A second restore finds the label and refuses.
    refused_unchanged(&sb, &["init", "--restore", &a], "nothing to restore");
}

#[test]
fn a_wiped_disk_can_be_made_a_new_disk_of_the_group_with_init_force() {
    let sb = Sandbox::new();
    let (m, _) = group_with_a_sole_copy(&sb);
    let a = sb.p("disks/a.img");
    wipe_metadata(Path::new(&a));
    sb.mv(&["init", &a, "--style", "raw", "--force"]).ok();
    let st = sb.status();
    let states: Vec<&str> = st["disks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["path"] == a.as_str())
        .map(|d| d["state"].as_str().unwrap())
        .collect();
    let mut sorted = states.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["missing", "online"],
        "the old member and the new disk: {st:#}"
    );
    // m's plex on the old member is repaired onto the new disk or c.
    sb.mv(&["repair", "m"]).ok();
    let st = sb.status();
    assert_eq!(volume(&st, "m")["state"], "healthy", "{st:#}");
    assert_eq!(sb.read_volume("m"), m);
}

#[test]
fn a_byte_copy_of_a_disk_is_refused_naming_both_paths() {
    let sb = Sandbox::new();
    group(&sb, 2);
    fs::copy(disk_path(&sb, "b.img"), disk_path(&sb, "b-copy.img")).unwrap();
    let before = sb.fingerprint();
    let r = sb.mv(&["status"]).refused("same disk UUID");
    assert!(
        r.stderr.contains("b.img") && r.stderr.contains("b-copy.img"),
        "{}",
        r.stderr
    );
    sb.mv(&["copy", "vol:m", &sb.p("out.img")])
        .refused("same disk UUID");
    assert_eq!(sb.fingerprint(), before, "a refusal changed a disk");
}
