//! The command line on real loop devices (block devices, not image files):
//! partition tables that `sfdisk` and `blkid` accept, 4096-byte sectors,
//! every command, refusals that leave every device byte as it was, and
//! `O_DIRECT` through the library.
//!
//! Needs root and `losetup`; without them each test skips loudly, and under
//! `MIRRORVOL_E2E=require` (CI) it fails. Every test attaches its own loop
//! devices, names them with `--disks /dev/loopA,/dev/loopB` (never a
//! directory: /dev is not scanned), and detaches exactly those devices.

mod common;

use common::*;
use mirrorvol::disk::{Disk, FileDisk, OpenOptions};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

// ---- loop devices ----

/// A loop device over a sparse file in a temporary directory of its own.
/// Dropping it detaches that device, and only while it still shows our
/// backing file.
struct Loop {
    /// `/dev/loopN`, or empty while detached.
    dev: String,
    backing: PathBuf,
    sector_size: Option<u32>,
    /// Attach with `--read-only`.
    read_only: bool,
    _dir: tempfile::TempDir,
}

impl Loop {
    /// A `mib` MiB loop device with 512-byte sectors, or None (after
    /// [`skip_or_fail`]) when loop devices cannot be used here.
    fn new(mib: u64) -> Option<Loop> {
        Loop::with_sector_size(mib, None)
    }

    /// A loop device with `--sector-size` when `sector_size` is given.
    fn with_sector_size(mib: u64, sector_size: Option<u32>) -> Option<Loop> {
        if !is_root() {
            skip_or_fail("loop devices need root");
            return None;
        }
        if !have_tool("losetup") {
            skip_or_fail("losetup is not installed");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("mirrorvol-loop-")
            .tempdir()
            .expect("temp dir");
        let backing = dir.path().join("backing.img");
        fs::File::create(&backing)
            .unwrap()
            .set_len(mib * MIB)
            .unwrap();
        let mut l = Loop {
            dev: String::new(),
            backing,
            sector_size,
            read_only: false,
            _dir: dir,
        };
        match l.attach() {
            Ok(()) => Some(l),
            Err(why) => {
                skip_or_fail(&why);
                None
            }
        }
    }

    /// Attaches the backing file to the first free loop device.
    fn attach(&mut self) -> Result<(), String> {
        assert!(self.dev.is_empty(), "{} is still attached", self.dev);
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if let Some(ss) = self.sector_size {
            cmd.args(["--sector-size", &ss.to_string()]);
        }
        if self.read_only {
            cmd.arg("--read-only");
        }
        let out = cmd.arg(&self.backing).output().expect("run losetup");
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if dev.starts_with("/dev/loop") {
            // Attached, even if something failed after: Drop detaches it.
            self.dev = dev;
        }
        if !out.status.success() || self.dev.is_empty() {
            return Err(format!(
                "losetup --find --show{}{} {} failed: {}",
                match self.sector_size {
                    Some(ss) => format!(" --sector-size {ss}"),
                    None => String::new(),
                },
                if self.read_only { " --read-only" } else { "" },
                self.backing.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    /// Detaches (if attached) and attaches again, read-only or not; the
    /// device may get another name. Writes to a read-only one fail (EPERM).
    fn reattach(&mut self, read_only: bool) {
        self.detach();
        self.read_only = read_only;
        self.attach().unwrap_or_else(|why| panic!("{why}"));
    }

    /// Detaches the device if it is still ours.
    fn detach(&mut self) {
        if self.dev.is_empty() {
            return;
        }
        let dev = std::mem::take(&mut self.dev);
        let name = dev.trim_start_matches("/dev/");
        let shown =
            fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).unwrap_or_default();
        let ours = fs::canonicalize(&self.backing).unwrap_or_else(|_| self.backing.clone());
        if Path::new(shown.trim()) != ours {
            eprintln!(
                "warning: {dev} no longer shows {} as its backing file; left alone",
                ours.display()
            );
            return;
        }
        match Command::new("losetup").args(["-d", &dev]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: losetup -d {dev} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: losetup -d {dev}: {e}"),
        }
    }

    fn path(&self) -> &str {
        assert!(!self.dev.is_empty(), "loop device is detached");
        &self.dev
    }

    /// The device size the kernel reports (`blockdev --getsize64`).
    fn kernel_size(&self) -> u64 {
        let out = tool_output("blockdev", &["--getsize64", self.path()]);
        out.trim().parse().expect("blockdev prints a number")
    }

    /// A crc32c of every byte of the device.
    fn hash(&self) -> u32 {
        crc32c::crc32c(&fs::read(self.path()).expect("read the whole device"))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Runs a tool that must succeed and returns its stdout.
#[track_caller]
fn tool_output(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True when every tool is installed; otherwise skips (or fails under
/// require) and returns false.
fn tools(names: &[&str]) -> bool {
    for t in names {
        if !have_tool(t) {
            skip_or_fail(&format!("{t} is not installed"));
            return false;
        }
    }
    true
}

// ---- the binary on a group of loop devices ----

/// Runs `mirrorvol --disks A,B,... ARGS`, naming exactly these devices.
fn mv(sb: &Sandbox, group: &[&Loop], args: &[&str]) -> Run {
    let list: Vec<&str> = group.iter().map(|l| l.path()).collect();
    let list = list.join(",");
    let mut all = vec!["--disks", list.as_str()];
    all.extend_from_slice(args);
    sb.mv_plain(&all)
}

fn status(sb: &Sandbox, group: &[&Loop]) -> serde_json::Value {
    let r = mv(sb, group, &["status", "--json"]).ok();
    serde_json::from_str(&r.stdout).expect("status --json is JSON")
}

/// Reads a volume out through `copy vol:NAME FILE`.
fn read_volume(sb: &Sandbox, group: &[&Loop], name: &str) -> Vec<u8> {
    let out = sb.p(&format!("out-{name}.bin"));
    let _ = fs::remove_file(&out);
    mv(sb, group, &["copy", &format!("vol:{name}"), &out]).ok();
    fs::read(&out).unwrap()
}

/// Asserts a volume reads back as `data` followed by zeroes, `size` in all.
#[track_caller]
fn assert_holds(got: &[u8], data: &[u8], size: u64) {
    assert_eq!(got.len() as u64, size, "volume size");
    assert!(got[..data.len()] == data[..], "volume data differs");
    assert!(
        got[data.len()..].iter().all(|&b| b == 0),
        "volume tail is not zero"
    );
}

/// The disks (paths) holding a volume's plexes, with their states.
fn plexes(s: &serde_json::Value, name: &str) -> Vec<(String, String)> {
    volume(s, name)["plexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["disk"].as_str().unwrap().to_string(),
                p["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The sorted disk paths of a volume's plexes, all of which must be in sync.
#[track_caller]
fn in_sync_on(s: &serde_json::Value, name: &str) -> Vec<String> {
    let mut on: Vec<String> = plexes(s, name)
        .into_iter()
        .map(|(d, st)| {
            assert_eq!(st, "in-sync", "plex of {name} on {d}: {s:#}");
            d
        })
        .collect();
    on.sort();
    on
}

fn sorted(paths: &[&Loop]) -> Vec<String> {
    let mut v: Vec<String> = paths.iter().map(|l| l.path().to_string()).collect();
    v.sort();
    v
}

fn free(s: &serde_json::Value, l: &Loop) -> u64 {
    disk(s, l.path())["free"].as_u64().unwrap()
}

/// Asserts that `sfdisk -d` reads a `label` table (gpt or dos) with one
/// partition starting at sector `start`, and that `blkid -p` finds it.
#[track_caller]
fn assert_partition_table(l: &Loop, label: &str, start: u64, sector_size: u32) {
    let dump = tool_output("sfdisk", &["-d", l.path()]);
    assert!(dump.contains(&format!("label: {label}\n")), "{dump}");
    assert!(
        dump.contains(&format!("sector-size: {sector_size}\n")),
        "{dump}"
    );
    let parts: Vec<&str> = dump.lines().filter(|x| x.contains(" : start=")).collect();
    assert_eq!(parts.len(), 1, "one partition expected:\n{dump}");
    let first: u64 = parts[0]
        .split("start=")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(first, start, "partition start:\n{dump}");
    let probe = tool_output("blkid", &["-o", "export", "-p", l.path()]);
    assert!(probe.contains(&format!("PTTYPE={label}\n")), "{probe}");
}

// ---- tests ----

#[test]
fn mirror_on_loop_devices_survives_fail_and_repair() {
    if !tools(&["sfdisk", "blkid"]) {
        return;
    }
    let Some(a) = Loop::new(64) else { return };
    let Some(b) = Loop::new(64) else { return };
    let Some(c) = Loop::new(64) else { return };
    let g = [&a, &b, &c];
    let sb = Sandbox::new();
    sb.mv_plain(&[
        "init",
        a.path(),
        "--style",
        "gpt",
        "--controller",
        "c0",
        "--group",
        "g",
    ])
    .ok();
    mv(
        &sb,
        &g,
        &["init", b.path(), "--style", "mbr", "--controller", "c1"],
    )
    .ok();
    mv(
        &sb,
        &g,
        &["init", c.path(), "--style", "raw", "--controller", "c2"],
    )
    .ok();

    // The real tools read the tables mirrorvol wrote.
    assert_partition_table(&a, "gpt", 2048, 512);
    assert_partition_table(&b, "dos", 2048, 512);

    let s = status(&sb, &g);
    assert_eq!(s["group"]["name"], "g");
    for (l, style, ctrl) in [(&a, "gpt", "c0"), (&b, "mbr", "c1"), (&c, "raw", "c2")] {
        let d = disk(&s, l.path());
        assert_eq!(d["path"], l.path());
        assert_eq!(d["state"], "online");
        assert_eq!(d["style"], style);
        assert_eq!(d["controller"], ctrl);
        assert_eq!(d["size"], 64 * MIB);
    }

    mv(
        &sb,
        &g,
        &[
            "create",
            "m",
            "--size",
            "16M",
            "--mirror",
            "--disk",
            a.path(),
            "--disk",
            b.path(),
        ],
    )
    .ok();
    let (src, data) = sb.data_file("in.bin", 10 * MIB as usize + 512, 11);
    mv(&sb, &g, &["copy", &src, "vol:m"]).ok();

    mv(&sb, &g, &["fail", b.path()]).ok();
    let s = status(&sb, &g);
    assert_eq!(disk(&s, b.path())["state"], "failed");
    assert_eq!(volume(&s, "m")["state"], "failed-redundancy");
    assert_holds(&read_volume(&sb, &g, "m"), &data, 16 * MIB);

    mv(&sb, &g, &["repair", "m", "--disk", c.path()]).ok();
    let s = status(&sb, &g);
    let m = volume(&s, "m");
    assert_eq!(m["state"], "healthy", "{s:#}");
    assert_eq!(m["layout"], "mirror");
    assert_eq!(m["duplexed"], true);
    assert_eq!(in_sync_on(&s, "m"), sorted(&[&a, &c]));
    assert_eq!(disk(&s, b.path())["state"], "failed");

    // Each plex alone holds the data.
    mv(
        &sb,
        &g,
        &["break", "m", "--disk", c.path(), "--new-name", "half"],
    )
    .ok();
    let s = status(&sb, &g);
    assert_eq!(in_sync_on(&s, "m"), sorted(&[&a]));
    assert_eq!(in_sync_on(&s, "half"), sorted(&[&c]));
    assert_holds(&read_volume(&sb, &g, "m"), &data, 16 * MIB);
    assert_holds(&read_volume(&sb, &g, "half"), &data, 16 * MIB);
}

#[test]
fn loop_device_size_and_sector_size_are_respected() {
    if !tools(&["sfdisk", "blkid", "blockdev"]) {
        return;
    }
    let Some(big) = Loop::with_sector_size(64, Some(4096)) else {
        return;
    };
    let Some(small) = Loop::new(48) else { return };
    let g = [&big, &small];
    assert_eq!(
        tool_output("blockdev", &["--getss", big.path()]).trim(),
        "4096"
    );
    let sb = Sandbox::new();
    sb.mv_plain(&["init", big.path(), "--style", "gpt", "--group", "g4k"])
        .ok();
    // 1 MiB is sector 256 in 4096-byte sectors.
    assert_partition_table(&big, "gpt", 256, 4096);

    let r = sb.mv_plain(&["examine", big.path(), "--json"]).ok();
    let e: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(e["label"]["style"], "gpt");
    assert_eq!(e["label"]["member_offset"], MIB);
    assert_eq!(e["config"]["name"], "g4k");
    assert_eq!(e["size"], big.kernel_size());

    // A 512-byte-sector MBR disk joins; a mirror spans both sector sizes.
    mv(&sb, &g, &["init", small.path(), "--style", "mbr"]).ok();
    assert_partition_table(&small, "dos", 2048, 512);
    let s = status(&sb, &g);
    for l in g {
        assert_eq!(disk(&s, l.path())["size"], l.kernel_size());
    }
    assert_eq!(disk(&s, big.path())["size"], 64 * MIB);
    assert_eq!(disk(&s, small.path())["size"], 48 * MIB);

    mv(&sb, &g, &["create", "m", "--size", "12M", "--mirror"]).ok();
    assert_eq!(in_sync_on(&status(&sb, &g), "m"), sorted(&g));
    // Not a multiple of 4096: the 4K device takes it through the page cache.
    let (src, data) = sb.data_file("in.bin", 5 * MIB as usize + 1536, 12);
    mv(&sb, &g, &["copy", &src, "vol:m"]).ok();
    mv(&sb, &g, &["break", "m", "--disk", small.path()]).ok();
    assert_holds(&read_volume(&sb, &g, "m"), &data, 12 * MIB);
    assert_holds(&read_volume(&sb, &g, "m-broken"), &data, 12 * MIB);
}

#[test]
fn every_command_works_on_loop_devices() {
    let Some(a) = Loop::new(64) else { return };
    let Some(b) = Loop::new(64) else { return };
    let Some(c) = Loop::new(64) else { return };
    let g = [&a, &b, &c];
    let sb = Sandbox::new();

    // init: two devices at once, then a third joins on its own controller.
    sb.mv_plain(&[
        "init",
        a.path(),
        b.path(),
        "--style",
        "gpt",
        "--group",
        "lg",
    ])
    .ok();
    mv(
        &sb,
        &g,
        &["init", c.path(), "--style", "mbr", "--controller", "c2"],
    )
    .ok();
    let s0 = status(&sb, &g);
    assert_eq!(s0["disks"].as_array().unwrap().len(), 3);
    assert!(s0["volumes"].as_array().unwrap().is_empty());
    let text = mv(&sb, &g, &["status"]).ok().stdout;
    for l in g {
        assert!(text.contains(l.path()), "{text}");
    }
    assert!(text.contains("Online"), "{text}");

    // create (simple), copy in, extend.
    mv(
        &sb,
        &g,
        &["create", "s", "--size", "4M", "--disk", c.path()],
    )
    .ok();
    let s = status(&sb, &g);
    assert_eq!(volume(&s, "s")["layout"], "simple");
    assert_eq!(in_sync_on(&s, "s"), sorted(&[&c]));
    assert_eq!(free(&s, &c), free(&s0, &c) - 4 * MIB);
    let (src, data) = sb.data_file("s.bin", 4 * MIB as usize, 21);
    mv(&sb, &g, &["copy", &src, "vol:s"]).ok();
    mv(&sb, &g, &["extend", "s", "--size", "10M"]).ok();
    let s = status(&sb, &g);
    assert_eq!(volume(&s, "s")["size"], 10 * MIB);
    assert_eq!(free(&s, &c), free(&s0, &c) - 10 * MIB);
    assert_holds(&read_volume(&sb, &g, "s"), &data, 10 * MIB);

    // create (mirror), copy in, add-mirror, remove-mirror.
    mv(
        &sb,
        &g,
        &[
            "create",
            "m",
            "--size",
            "8M",
            "--mirror",
            "--disk",
            a.path(),
            "--disk",
            b.path(),
        ],
    )
    .ok();
    let s = status(&sb, &g);
    assert_eq!(volume(&s, "m")["layout"], "mirror");
    assert_eq!(volume(&s, "m")["state"], "healthy");
    assert_eq!(in_sync_on(&s, "m"), sorted(&[&a, &b]));
    let (src, data) = sb.data_file("m.bin", 8 * MIB as usize, 22);
    mv(&sb, &g, &["copy", &src, "vol:m"]).ok();
    mv(&sb, &g, &["add-mirror", "m", "--disk", c.path()]).ok();
    let s = status(&sb, &g);
    assert_eq!(in_sync_on(&s, "m"), sorted(&g));
    assert_eq!(volume(&s, "m")["state"], "healthy");
    mv(&sb, &g, &["remove-mirror", "m", "--disk", a.path()]).ok();
    let s = status(&sb, &g);
    assert_eq!(in_sync_on(&s, "m"), sorted(&[&b, &c]));
    assert_eq!(free(&s, &a), free(&s0, &a));

    // break (kept): both halves hold the data; delete the split-off half.
    mv(
        &sb,
        &g,
        &["break", "m", "--disk", c.path(), "--new-name", "half"],
    )
    .ok();
    let s = status(&sb, &g);
    assert_eq!(volume(&s, "m")["layout"], "simple");
    assert_eq!(in_sync_on(&s, "m"), sorted(&[&b]));
    assert_eq!(in_sync_on(&s, "half"), sorted(&[&c]));
    assert_eq!(read_volume(&sb, &g, "m"), data);
    assert_eq!(read_volume(&sb, &g, "half"), data);
    mv(&sb, &g, &["delete", "half"]).ok();
    let s = status(&sb, &g);
    assert_eq!(s["volumes"].as_array().unwrap().len(), 2);
    assert_eq!(free(&s, &c), free(&s0, &c) - 10 * MIB);

    // break --nokeep frees the plex.
    mv(&sb, &g, &["add-mirror", "m", "--disk", a.path()]).ok();
    assert_eq!(in_sync_on(&status(&sb, &g), "m"), sorted(&[&a, &b]));
    mv(&sb, &g, &["break", "m", "--disk", a.path(), "--nokeep"]).ok();
    let s = status(&sb, &g);
    assert_eq!(in_sync_on(&s, "m"), sorted(&[&b]));
    assert_eq!(free(&s, &a), free(&s0, &a));
    assert_eq!(s["volumes"].as_array().unwrap().len(), 2);

    // fail, write while it is away, reactivate: the stale plex resyncs.
    mv(&sb, &g, &["add-mirror", "m", "--disk", a.path()]).ok();
    mv(&sb, &g, &["fail", a.path()]).ok();
    let s = status(&sb, &g);
    assert_eq!(disk(&s, a.path())["state"], "failed");
    assert_eq!(volume(&s, "m")["state"], "failed-redundancy");
    let (src, data) = sb.data_file("m2.bin", 8 * MIB as usize, 23);
    mv(&sb, &g, &["copy", &src, "vol:m"]).ok();
    mv(&sb, &g, &["reactivate", a.path()]).ok();
    let s = status(&sb, &g);
    assert_eq!(disk(&s, a.path())["state"], "online");
    assert_eq!(volume(&s, "m")["state"], "healthy");
    assert_eq!(in_sync_on(&s, "m"), sorted(&[&a, &b]));

    // fail and repair: the new plex goes to the disk that has none.
    mv(&sb, &g, &["fail", b.path()]).ok();
    mv(&sb, &g, &["repair", "m"]).ok();
    let s = status(&sb, &g);
    assert_eq!(volume(&s, "m")["state"], "healthy");
    assert_eq!(in_sync_on(&s, "m"), sorted(&[&a, &c]));
    // The reactivated and the repaired plex each hold the new data alone.
    mv(
        &sb,
        &g,
        &["break", "m", "--disk", c.path(), "--new-name", "r"],
    )
    .ok();
    assert_eq!(read_volume(&sb, &g, "m"), data);
    assert_eq!(read_volume(&sb, &g, "r"), data);

    // copy volume to volume.
    mv(&sb, &g, &["copy", "vol:r", "vol:s"]).ok();
    assert_holds(&read_volume(&sb, &g, "s"), &data, 10 * MIB);

    // examine each device: its own label, the group's config.
    let seqno = status(&sb, &g)["group"]["seqno"].clone();
    for (l, style) in [(&a, "gpt"), (&b, "gpt"), (&c, "mbr")] {
        let r = sb.mv_plain(&["examine", l.path(), "--json"]).ok();
        let e: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(e["label"]["style"], style, "{e:#}");
        assert_eq!(e["label"]["group_uuid"], s0["group"]["uuid"]);
        assert_eq!(e["config"]["name"], "lg");
        let text = sb.mv_plain(&["examine", l.path()]).ok().stdout;
        assert!(text.contains(style), "{text}");
        // The failed disk missed the later configs; the others are current.
        if l.path() != b.path() {
            assert_eq!(e["seqno"], seqno, "{e:#}");
        }
    }

    // delete everything: all space comes back.
    mv(&sb, &g, &["reactivate", b.path()]).ok();
    for v in ["m", "r", "s"] {
        mv(&sb, &g, &["delete", v]).ok();
    }
    let s = status(&sb, &g);
    assert!(s["volumes"].as_array().unwrap().is_empty());
    for l in g {
        assert_eq!(disk(&s, l.path())["state"], "online");
        assert_eq!(free(&s, l), free(&s0, l));
    }
}

/// Every byte of every device, hashed.
fn fingerprint(watch: &[&Loop]) -> Vec<u32> {
    watch.iter().map(|l| l.hash()).collect()
}

/// Runs a command that must be refused and checks that no device differs
/// from `before`, the devices' fingerprint before the first refusal.
#[track_caller]
fn refused_unchanged(
    sb: &Sandbox,
    group: &[&Loop],
    (watch, before): (&[&Loop], &[u32]),
    args: &[&str],
    needle: &str,
) {
    mv(sb, group, args).refused(needle);
    assert_eq!(
        fingerprint(watch),
        before,
        "a refusal changed a device: {args:?}"
    );
}

#[test]
fn refusals_on_loop_devices_change_nothing() {
    if !tools(&["mkfs.ext4", "blkid"]) {
        return;
    }
    let Some(a) = Loop::new(32) else { return };
    let Some(b) = Loop::new(32) else { return };
    let Some(e) = Loop::new(32) else { return };
    let Some(tiny) = Loop::new(8) else { return };
    let g = [&a, &b];
    let all = [&a, &b, &e, &tiny];
    let sb = Sandbox::new();
    sb.mv_plain(&["init", a.path(), "--style", "gpt", "--group", "g"])
        .ok();
    mv(&sb, &g, &["init", b.path(), "--style", "mbr"]).ok();
    mv(&sb, &g, &["create", "m", "--size", "8M", "--mirror"]).ok();
    mv(
        &sb,
        &g,
        &["create", "s", "--size", "4M", "--disk", a.path()],
    )
    .ok();
    tool_output("mkfs.ext4", &["-q", "-F", e.path()]);
    assert!(tool_output("blkid", &["-o", "export", "-p", e.path()]).contains("TYPE=ext4"));
    let before = fingerprint(&all);
    let all = (&all[..], &before[..]);

    refused_unchanged(&sb, &g, all, &["init", e.path()], "ext");
    refused_unchanged(&sb, &g, all, &["init", tiny.path()], "too small");
    refused_unchanged(&sb, &g, all, &["init", a.path()], a.path());
    refused_unchanged(&sb, &g, all, &["create", "big", "--size", "1G"], "big");
    refused_unchanged(
        &sb,
        &g,
        all,
        &["create", "big", "--size", "20M", "--mirror"],
        "big",
    );
    refused_unchanged(
        &sb,
        &g,
        all,
        &["extend", "m", "--size", "16M"],
        "cannot be extended",
    );
    refused_unchanged(&sb, &g, all, &["repair", "m"], "nothing to repair");
    refused_unchanged(&sb, &g, all, &["copy", "vol:m", a.path()], a.path());
    let s = status(&sb, &g);
    assert_eq!(s["volumes"].as_array().unwrap().len(), 2);
    assert_eq!(volume(&s, "m")["state"], "healthy");

    // With --force the ext4 device joins the group.
    mv(&sb, &g, &["init", e.path(), "--force"]).ok();
    let g3 = [&a, &b, &e];
    let s = status(&sb, &g3);
    assert_eq!(disk(&s, e.path())["state"], "online");
    assert_eq!(disk(&s, e.path())["style"], "gpt");
}

#[test]
fn a_group_on_loop_devices_assembles_after_they_come_back_under_other_names() {
    let Some(mut a) = Loop::new(64) else { return };
    let Some(mut b) = Loop::new(64) else { return };
    let sb = Sandbox::new();
    sb.mv_plain(&["init", a.path(), b.path(), "--group", "g"])
        .ok();
    mv(&sb, &[&a, &b], &["create", "m", "--size", "8M", "--mirror"]).ok();
    let (src, data) = sb.data_file("in.bin", 8 * MIB as usize, 31);
    mv(&sb, &[&a, &b], &["copy", &src, "vol:m"]).ok();
    let uuids: Vec<serde_json::Value> = [&a, &b]
        .iter()
        .map(|l| disk(&status(&sb, &[&a, &b]), l.path())["uuid"].clone())
        .collect();

    // Detach both and attach in the other order: the names usually swap.
    a.detach();
    b.detach();
    b.reattach(false);
    a.reattach(false);
    let g = [&a, &b];
    let s = status(&sb, &g);
    assert_eq!(disk(&s, a.path())["uuid"], uuids[0], "{s:#}");
    assert_eq!(disk(&s, b.path())["uuid"], uuids[1], "{s:#}");
    assert_eq!(volume(&s, "m")["state"], "healthy");
    assert_eq!(in_sync_on(&s, "m"), sorted(&g));
    // Commands take the new names.
    mv(&sb, &g, &["fail", a.path()]).ok();
    assert_eq!(read_volume(&sb, &g, "m"), data);
    mv(&sb, &g, &["reactivate", a.path()]).ok();
    mv(&sb, &g, &["break", "m", "--disk", b.path(), "--nokeep"]).ok();
    let s = status(&sb, &g);
    assert_eq!(in_sync_on(&s, "m"), sorted(&[&a]));
    assert_eq!(read_volume(&sb, &g, "m"), data);
}

#[test]
fn a_disk_that_refuses_config_writes_is_marked_failed_and_the_user_is_told() {
    let Some(a) = Loop::new(64) else { return };
    let Some(mut b) = Loop::new(64) else { return };
    let sb = Sandbox::new();
    sb.mv_plain(&["init", a.path(), b.path(), "--group", "g"])
        .ok();
    mv(&sb, &[&a, &b], &["create", "m", "--size", "8M", "--mirror"]).ok();
    let (src, data) = sb.data_file("in.bin", 8 * MIB as usize, 51);
    mv(&sb, &[&a, &b], &["copy", &src, "vol:m"]).ok();

    // b comes back read-only: every write to it fails.
    b.reattach(true);
    let g = [&a, &b];
    let before = b.hash();
    let r = mv(
        &sb,
        &g,
        &["create", "x", "--size", "1M", "--disk", a.path()],
    )
    .ok();
    let told = format!("disk {} failed a config write", b.path());
    assert!(r.stderr.contains(&told), "stderr: {}", r.stderr);
    assert_eq!(b.hash(), before);
    let s = status(&sb, &g);
    assert_eq!(disk(&s, b.path())["state"], "failed");
    assert_eq!(volume(&s, "m")["state"], "failed-redundancy");
    assert_eq!(in_sync_on(&s, "x"), sorted(&[&a]));
    assert_eq!(read_volume(&sb, &g, "m"), data);

    // Writable again: reactivate brings it back in sync.
    b.reattach(false);
    let g = [&a, &b];
    mv(&sb, &g, &["reactivate", b.path()]).ok();
    let s = status(&sb, &g);
    assert_eq!(volume(&s, "m")["state"], "healthy");
    assert_eq!(in_sync_on(&s, "m"), sorted(&g));
}

/// A write through an `O_DIRECT` FileDisk, mirrored into `model`, then read
/// back through the same disk and checked against the model everywhere.
fn direct_write(disk: &FileDisk, model: &mut [u8], buf: &[u8], offset: u64) {
    disk.write_at(buf, offset).unwrap();
    let at = offset as usize;
    model[at..at + buf.len()].copy_from_slice(buf);
    let mut back = vec![0; buf.len()];
    disk.read_at(&mut back, offset).unwrap();
    assert!(
        back == buf,
        "{} bytes at {offset} read back differ",
        buf.len()
    );
}

#[test]
fn o_direct_on_loop_devices_round_trips_unaligned_and_aligned_buffers() {
    for sector_size in [512u32, 4096] {
        let Some(l) = Loop::with_sector_size(16, Some(sector_size)) else {
            return;
        };
        let path = Path::new(l.path());
        let opts = OpenOptions {
            direct: true,
            ..OpenOptions::default()
        };
        let disk = FileDisk::open(path, opts).unwrap();
        assert!(disk.is_block_device());
        assert_eq!(disk.size(), 16 * MIB);
        assert_eq!(disk.sector_size(), sector_size);

        let size = disk.size() as usize;
        let mut model = vec![0u8; size];
        // Aligned: offsets and lengths whole sectors, memory page-aligned.
        let mut raw = vec![0u8; 2 * MIB as usize + 4096];
        let skip = raw.as_ptr().align_offset(4096);
        let aligned = &mut raw[skip..skip + 2 * MIB as usize];
        aligned.copy_from_slice(&pattern(2 * MIB as usize, 40 + sector_size as u64));
        direct_write(&disk, &mut model, aligned, MIB);
        // Aligned offset and length, memory at an odd address.
        let odd = pattern(8193, 41);
        direct_write(&disk, &mut model, &odd[1..], 4096);
        // Unaligned offsets and lengths: inside one sector, across sector
        // and block edges, many blocks, the very last bytes of the device.
        direct_write(&disk, &mut model, &pattern(1000, 42), 777);
        direct_write(&disk, &mut model, &pattern(3, 43), 4095);
        direct_write(&disk, &mut model, &pattern(1, 44), MIB + 513);
        direct_write(&disk, &mut model, &pattern(100_001, 45), MIB + 65_537);
        direct_write(&disk, &mut model, &pattern(4097, 46), 3 * MIB - 2048);
        direct_write(&disk, &mut model, &pattern(10, 47), size as u64 - 10);
        disk.flush().unwrap();

        // Every byte, through O_DIRECT (unaligned read) and through the
        // page cache of the device.
        let mut back = vec![0u8; size - 1];
        disk.read_at(&mut back, 1).unwrap();
        assert!(back[..] == model[1..], "O_DIRECT read of the whole device");
        let cached = fs::read(path).unwrap();
        assert!(cached == model, "buffered read of the whole device");
        drop(disk);
    }
}

/// A loop device over a group's image file is the same disk: given both,
/// it is used once (with a warning), and a second `serve` reaching the
/// disk through the loop device, with its own control socket and run
/// directory, is refused while the first holds the file.
#[test]
fn a_loop_device_over_a_member_is_used_once_and_a_second_serve_through_it_is_refused() {
    let sb = Sandbox::new();
    let (a, b) = (sb.image("a.img", 80), sb.image("b.img", 80));
    sb.mv_plain(&["init", &a, &b, "--style", "raw", "--group", "g"])
        .ok();
    let files = format!("{a},{b}");
    sb.mv_plain(&[
        "--disks", &files, "create", "m", "--size", "16M", "--mirror",
    ])
    .ok();
    let dir = tempfile::tempdir().unwrap();
    let mut over_b = Loop {
        dev: String::new(),
        backing: PathBuf::from(&b),
        sector_size: None,
        read_only: false,
        _dir: dir,
    };
    if let Err(why) = over_b.attach() {
        return skip_or_fail(&why);
    }
    let all = format!("{a},{b},{}", over_b.path());
    let r = sb.mv_plain(&["--disks", &all, "status", "--json"]).ok();
    assert!(r.stderr.contains("are the same disk"), "{}", r.stderr);
    let st: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(st["disks"].as_array().unwrap().len(), 2, "{st:#}");
    assert_eq!(volume(&st, "m")["state"], "healthy", "{st:#}");

    // The first serve holds the files; the second comes through the loop
    // device under another run directory and control socket.
    // Its control socket, not its NBD socket, says it holds the disks: the
    // listeners are bound before the disks are opened (a taken address is
    // refused first), the control socket after the group is started.
    let sock = sb.path("first.sock");
    let ctl = sb.path("first-ctl.sock");
    let mut first = Command::new(bin())
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .args(["--disks", &files, "serve", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--control")
        .arg(&ctl)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !ctl.exists() {
        assert!(started.elapsed().as_secs() < 20, "serve did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let second = Command::new(bin())
        .env("MIRRORVOL_RUN_DIR", sb.path("run2"))
        .args(["--disks", over_b.path(), "serve"])
        .args([
            "--listen",
            &format!("unix:{}", sb.path("second.sock").display()),
        ])
        .args(["--control", &sb.p("second-ctl.sock")])
        .output()
        .unwrap();
    // SAFETY: kill takes integers; the pid is our own child's.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let _ = first.wait();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "the second serve: {err}");
    assert!(err.contains("in use"), "{err}");
}

/// Sectors read from a block device since it was attached.
fn sectors_read(l: &Loop) -> u64 {
    let name = l.path().trim_start_matches("/dev/");
    let stat = fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
    stat.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// On block devices, where every byte is data to `lseek`, a rebuild copies
/// what was written, by the written maps: a 4 GiB volume holding 64 MiB
/// gets a mirror for about 64 MiB read from its disk, not 4 GiB, and the
/// new copy alone holds the volume; `status` says what is written.
#[test]
fn a_rebuild_on_block_devices_reads_only_what_was_written() {
    let (Some(a), Some(b)) = (Loop::new(4200), Loop::new(4200)) else {
        return;
    };
    let sb = Sandbox::new();
    let group = [&a, &b];
    mv(&sb, &group, &["init", a.path(), b.path(), "--style", "raw"]).ok();
    mv(
        &sb,
        &group,
        &["create", "data", "--size", "4G", "--disk", a.path()],
    )
    .ok();
    let (src, want) = sb.data_file("in.bin", 64 << 20, 7);
    mv(&sb, &group, &["copy", &src, "vol:data"]).ok();
    let s = status(&sb, &group);
    assert_eq!(volume(&s, "data")["written"], 64u64 << 20, "{s:#}");

    let before = sectors_read(&a);
    let out = mv(&sb, &group, &["add-mirror", "data", "--disk", b.path()])
        .ok()
        .stdout;
    let read = (sectors_read(&a) - before) * 512;
    assert!(
        (64 << 20..80 << 20).contains(&read),
        "{read} bytes read from the source for 64 MiB written: {out}"
    );
    let s = status(&sb, &group);
    assert_eq!(in_sync_on(&s, "data"), sorted(&group));
    assert_eq!(volume(&s, "data")["written"], 64u64 << 20, "{s:#}");
    // The new copy itself (its device, past the 8 MiB of metadata of a
    // raw disk): the data, and zeroes elsewhere (sampled: it is 4 GiB).
    let plex = volume(&s, "data")["plexes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["disk"] == b.path())
        .unwrap()["offset"]
        .as_u64()
        .unwrap();
    let opts = OpenOptions {
        direct: true,
        read_only: true,
        ..OpenOptions::default()
    };
    let dev = FileDisk::open(Path::new(b.path()), opts).unwrap();
    let at = (8 << 20) + plex;
    let mut got = vec![0u8; 64 << 20];
    dev.read_at(&mut got, at).unwrap();
    assert!(got == want, "the 64 MiB written, on the new copy");
    for off in [64u64 << 20, 1 << 30, (4 << 30) - (1 << 20)] {
        let mut chunk = vec![1u8; 1 << 20];
        dev.read_at(&mut chunk, at + off).unwrap();
        assert!(chunk.iter().all(|&x| x == 0), "zeroes at {off}");
    }
}

/// Offline commands open block devices `O_DIRECT` (`devices_direct`): a
/// rebuild onto a loop device does not go through the device's own page
/// cache as well as its file's. Image files keep the page cache, and
/// without `devices_direct` (`serve --cache writeback`) devices do too.
#[test]
fn offline_opens_take_block_devices_direct_and_leave_files_cached() {
    use mirrorvol::group::{DiskOpen, open_disk_with};
    let Some(l) = Loop::new(16) else { return };
    let direct_of = |path: &Path, devices_direct: bool| {
        let q = open_disk_with(
            path,
            &DiskOpen {
                devices_direct,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let disk = q.queue().disk().expect("an open queue");
        let file = disk.as_file_disk().expect("a file disk");
        file.ring_target().direct_align.is_some()
    };
    let dev = PathBuf::from(&l.dev);
    assert!(
        direct_of(&dev, true),
        "{} opened through the page cache",
        l.dev
    );
    assert!(!direct_of(&dev, false), "{} opened O_DIRECT unasked", l.dev);
    // An image file on a filesystem that takes O_DIRECT stays cached.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let img = dir.path().join("f.img");
    fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    assert!(!direct_of(&img, true), "an image file opened O_DIRECT");
}

/// Bytes the filesystem holds for a file (its allocated blocks).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn zeroing_a_thin_loop_device_keeps_it_thin() {
    // Loop devices over sparse files are thin: a zeroing that keeps the
    // blocks mapped (BLKZEROOUT) allocates the whole backing range. What
    // mirrorvol zeroes (a new mirror's plexes, a rebuild's never-written
    // regions, a trim) is unmapped instead where the device can.
    let Some(a) = Loop::new(384) else { return };
    let Some(b) = Loop::new(384) else { return };
    let g = [&a, &b];
    let sb = Sandbox::new();
    mv(&sb, &g, &["init", a.path(), b.path(), "--style", "raw"]).ok();
    let (before_a, before_b) = (allocated(&a.backing), allocated(&b.backing));
    mv(
        &sb,
        &g,
        &["create", "v", "--size", "320M", "--disk", a.path()],
    )
    .ok();
    let (src, data) = sb.data_file("in.bin", 4 * MIB as usize, 5);
    mv(&sb, &g, &["copy", &src, "vol:v"]).ok();
    mv(&sb, &g, &["add-mirror", "v", "--disk", b.path()]).ok();
    let s = status(&sb, &g);
    assert_eq!(in_sync_on(&s, "v"), sorted(&[&a, &b]));
    // The data, and the metadata mirrorvol writes, are a few MiB; 320 MiB
    // of zeroes are not there.
    for (l, before) in [(&a, before_a), (&b, before_b)] {
        let grew = allocated(&l.backing) - before;
        assert!(
            grew < 32 * MIB,
            "{} ({}) grew by {grew} bytes for 4 MiB of data",
            l.path(),
            l.backing.display()
        );
    }
    // The new plex alone holds the data, and zeroes past it.
    mv(
        &sb,
        &g,
        &["break", "v", "--disk", b.path(), "--new-name", "half"],
    )
    .ok();
    assert_holds(&read_volume(&sb, &g, "half"), &data, 320 * MIB);
    assert_holds(&read_volume(&sb, &g, "v"), &data, 320 * MIB);
}
