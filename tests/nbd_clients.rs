//! `mirrorvol serve` driven by third-party NBD clients: nbdinfo, qemu-io,
//! qemu-img, nbdcopy and fio, including a disk that fails mid-run (a real
//! faulty disk, `common::faulty`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::faulty::{mirror_group_faulty_b, rig_available};
use common::serve::{Served, mirror_group, mirror_group_on, ok, run, tools, wait_status};
use common::{MIB, Sandbox};

#[test]
fn nbdinfo_lists_every_volume_with_size_and_flags() {
    if !tools(&["nbdinfo"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 32);
    sb.mv(&["create", "scratch", "--size", "8M"]).ok();
    let s = Served::start(&sb, &["127.0.0.1:0"], &[]);
    let out = ok(Command::new("nbdinfo")
        .arg("--list")
        .arg("--json")
        .arg(format!("nbd+unix://?socket={}", s.sock.display())));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let exports = v["exports"].as_array().unwrap();
    let get = |name: &str| {
        exports
            .iter()
            .find(|e| e["export-name"] == name)
            .unwrap_or_else(|| panic!("export {name} in {v:#}"))
    };
    for (name, size) in [("data", 32 * MIB), ("scratch", 8 * MIB)] {
        let e = get(name);
        assert_eq!(e["export-size"], size);
        for flag in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_multi_conn",
            "can_cache",
            "can_fast_zero",
            "can_df",
        ] {
            assert_eq!(e[flag], true, "{flag} of {name}: {e:#}");
        }
        assert_eq!(e["is_read_only"], false);
        // The metadata contexts it lists (through LIST_META_CONTEXT).
        let contexts: Vec<&str> = e["contexts"]
            .as_array()
            .map(|c| c.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        assert!(
            contexts.contains(&"base:allocation") && contexts.contains(&"mirrorvol:dirty"),
            "contexts of {name}: {e:#}"
        );
        assert_eq!(e["block_size_minimum"], 512);
        assert_eq!(e["block_size_preferred"], 4096);
        assert_eq!(e["block_size_maximum"], 32 * MIB);
    }
    // Over TCP on loopback too.
    let tcp = &s.addrs[1];
    assert!(tcp.starts_with("127.0.0.1:"), "{tcp}");
    let out = ok(Command::new("nbdinfo")
        .arg("--size")
        .arg(format!("nbd://{tcp}/data")));
    assert_eq!(out.trim(), (32 * MIB).to_string());
    // An unknown export is an error the client can report.
    let (code, _, err) =
        run(Command::new("nbdinfo").arg(format!("nbd+unix:///nosuch?socket={}", s.sock.display())));
    assert_ne!(code, 0);
    assert!(err.contains("nosuch"), "{err}");
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
}

#[test]
fn qemu_io_patterns_read_back_and_reach_both_plexes() {
    if !tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 16);
    let s = Served::start(&sb, &[], &[]);
    let out = ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "write -f -P 0xcd 1M 64k",
        "-c",
        "read -P 0xcd 1M 64k",
        "-c",
        "write -z 2M 1M",
        "-c",
        "read -P 0 2M 1M",
        "-c",
        "discard 3M 64k",
        "-c",
        "read -P 0 3M 64k",
        "-c",
        "flush",
        &s.uri("data"),
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
    // Both plexes hold the data: read it from each alone by breaking the
    // mirror.
    let data = sb.read_volume("data");
    assert!(data[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(
        data[MIB as usize..(MIB + 65536) as usize]
            .iter()
            .all(|&b| b == 0xcd)
    );
    sb.mv(&[
        "break",
        "data",
        "--disk",
        &sb.p("disks/b.img"),
        "--new-name",
        "copy",
    ])
    .ok();
    assert_eq!(sb.read_volume("copy"), data);
}

#[test]
fn qemu_img_convert_in_and_out_is_byte_for_byte() {
    if !tools(&["qemu-img"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 16);
    let (src, data) = sb.data_file("src.bin", 16 * MIB as usize, 7);
    let s = Served::start(&sb, &[], &[]);
    ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        &src,
        &s.uri("data"),
    ]));
    let out = sb.p("out.bin");
    ok(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &s.uri("data"), &out]));
    assert!(
        std::fs::read(&out).unwrap() == data,
        "qemu-img round trip differs"
    );
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
    assert!(sb.read_volume("data") == data);
}

#[test]
fn nbdcopy_copies_into_and_out_of_the_volume() {
    if !tools(&["nbdcopy"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 16);
    let (src, data) = sb.data_file("src.bin", 16 * MIB as usize, 11);
    let s = Served::start(&sb, &[], &[]);
    ok(Command::new("nbdcopy").args([&src, &s.uri("data")]));
    let out = sb.p("out.bin");
    ok(Command::new("nbdcopy").args([&s.uri("data"), &out]));
    assert!(
        std::fs::read(&out).unwrap() == data,
        "nbdcopy round trip differs"
    );
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
}

/// Writes `len` bytes of pattern `seed` at `offset` of the volume behind
/// `uri`, with qemu-io.
fn qemu_write(uri: &str, offset: u64, len: u64, byte: u8) {
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        &format!("write -P {byte} {offset} {len}"),
        uri,
    ]));
}

/// The (start, length, zero) extents of `qemu-img map --output=json`.
fn qemu_map(uri: &str) -> Vec<(u64, u64, bool)> {
    let out = ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut extents: Vec<(u64, u64, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let zero = e["zero"] == true && e["data"] == false;
        match extents.last_mut() {
            Some(last) if last.2 == zero && last.0 + last.1 == start => last.1 += len,
            _ => extents.push((start, len, zero)),
        }
    }
    extents
}

/// Half a volume written, in two places: `nbdinfo --map` and `qemu-img
/// map` (both through block status, base:allocation) show the holes and
/// the data where they are; `--map=mirrorvol:dirty` shows the regions just
/// written as dirty.
#[test]
fn nbdinfo_and_qemu_img_map_show_the_holes_and_data_of_a_half_written_volume() {
    if !tools(&["nbdinfo", "qemu-img", "qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 64);
    let s = Served::start(&sb, &[], &[]);
    let uri = s.uri("data");
    qemu_write(&uri, 0, 16 * MIB, 0x61);
    qemu_write(&uri, 32 * MIB, 16 * MIB, 0x62);
    let out = ok(Command::new("nbdinfo").args(["--map", "--json", &uri]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let map: Vec<(u64, u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        map,
        [
            (0, 16 * MIB, 0),
            (16 * MIB, 16 * MIB, 3),
            (32 * MIB, 16 * MIB, 0),
            (48 * MIB, 16 * MIB, 3)
        ],
        "nbdinfo --map: {out}"
    );
    assert_eq!(
        qemu_map(&uri),
        [
            (0, 16 * MIB, false),
            (16 * MIB, 16 * MIB, true),
            (32 * MIB, 16 * MIB, false),
            (48 * MIB, 16 * MIB, true)
        ]
    );
    let out = ok(Command::new("nbdinfo").args(["--map=mirrorvol:dirty", "--json", &uri]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let dirty_at = |at: u64| {
        v.as_array().unwrap().iter().any(|e| {
            let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            o <= at && at < o + l && e["type"].as_u64().unwrap() & 1 == 1
        })
    };
    assert!(dirty_at(0) && dirty_at(32 * MIB), "mirrorvol:dirty: {out}");
    assert!(!dirty_at(20 * MIB), "mirrorvol:dirty: {out}");
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
}

/// A 1 GiB volume holding 24 MiB: nbdcopy on four connections (multi-conn)
/// and qemu-img convert copy it into files that are equal and as sparse
/// as the data; nbdcopy on four connections writes it back into another
/// volume, flushing, and that volume reads back equal and stays sparse on
/// its plexes.
#[test]
fn nbdcopy_and_qemu_img_convert_copy_a_sparse_volume_sparsely() {
    if !tools(&["nbdcopy", "qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let sb = Sandbox::new();
    sb.image("a.img", 2200);
    sb.image("b.img", 2200);
    mirror_group_on(&sb, 1024);
    sb.mv(&["create", "copy", "--size", "1G", "--mirror"]).ok();
    let s = Served::start(&sb, &[], &[]);
    let uri = s.uri("data");
    qemu_write(&uri, 100 * MIB, 8 * MIB, 0x71);
    qemu_write(&uri, 700 * MIB, 16 * MIB, 0x72);
    assert_eq!(
        ok(Command::new("nbdinfo").args(["--can", "multi-conn", &uri])).trim(),
        ""
    );
    let allocated = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    let n = sb.p("nbdcopy.img");
    ok(Command::new("nbdcopy").args(["--connections=4", &uri, &n]));
    let q = sb.p("convert.img");
    ok(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri, &q]));
    for f in [&n, &q] {
        ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", f, &uri]));
        assert_eq!(std::fs::metadata(f).unwrap().len(), 1024 * MIB);
        let a = allocated(f);
        assert!(a <= 32 * MIB, "{f} holds {a} bytes for 24 MiB of data");
    }
    // Back into the other volume, four connections, flushed.
    let copy = s.uri("copy");
    ok(Command::new("nbdcopy").args(["--connections=4", "--flush", &n, &copy]));
    ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &n, &copy]));
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
    for disk in ["a.img", "b.img"] {
        let a = allocated(&sb.p(&format!("disks/{disk}")));
        assert!(
            a <= 96 * MIB,
            "{disk} holds {a} bytes for two volumes of 24 MiB"
        );
    }
    assert!(sb.read_volume("copy") == std::fs::read(&n).unwrap());
}

fn fio_args(uri: &str, size_mib: u64, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--name=mirror",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--numjobs=2",
        &format!("--size={size_mib}M"),
        &format!("--offset_increment={size_mib}M"),
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--do_verify=1",
        "--randrepeat=0",
        "--group_reporting",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// fio reports a verify failure as "verify: bad magic" or "... verify
/// failed"; the job is named so that neither can match otherwise.
fn assert_verified(out: &str, err: &str) {
    for text in [out, err] {
        assert!(!text.contains("verify"), "verify errors:\n{out}\n{err}");
    }
    assert!(out.contains("err= 0"), "{out}");
}

#[test]
fn fio_verify_two_jobs_on_two_connections() {
    if !tools(&["fio"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 96, 64);
    let s = Served::start(&sb, &[], &[]);
    let (code, out, err) = run(Command::new("fio").args(fio_args(&s.uri("data"), 16, &[])));
    assert_eq!(code, 0, "fio failed:\n{out}\n{err}");
    assert_verified(&out, &err);
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
}

#[test]
fn fio_verify_sees_no_error_when_a_disk_fails_mid_run() {
    if !rig_available(&["fio"]) {
        return;
    }
    let sb = Sandbox::new();
    // b.img is a real faulty disk, declared before the server so that it
    // goes after the server has stopped.
    let fault = mirror_group_faulty_b(&sb, 96, 64);
    let s = Served::start(&sb, &[], &[]);
    let mut fio = Command::new("fio")
        .args(fio_args(&s.uri("data"), 16, &["--rate_iops=2000"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Fail the disk once fio is well into its run: every I/O to b.img
    // fails with EIO from now on.
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    fault.fail_all();
    // The server fails the disk while fio still runs.
    wait_status(&sb, &s, 30, "b.img failed", |st| {
        common::disk(st, "b.img")["state"] == "failed"
    });
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio ended before the disk failed; the test proves nothing"
    );
    let o = fio.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        start.elapsed() > Duration::from_millis(1500),
        "fio ended before the disk failed; the test proves nothing:\n{out}"
    );
    assert!(o.status.success(), "fio failed:\n{out}\n{err}");
    assert_verified(&out, &err);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    let st = sb.status();
    assert_eq!(
        common::volume(&st, "data")["state"],
        "failed-redundancy",
        "{st:#}"
    );
    assert_eq!(common::disk(&st, "b.img")["state"], "failed", "{st:#}");
    // The surviving plex holds what fio wrote: the volume reads whole.
    assert_eq!(sb.read_volume("data").len(), 64 * MIB as usize);
}
