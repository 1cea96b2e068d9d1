//! `mirrorvol serve` driven by third-party NBD clients: nbdinfo, qemu-io,
//! qemu-img, nbdcopy and fio, including a disk that fails mid-run (a real
//! faulty disk, `common::faulty`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::faulty::{mirror_group_faulty_b, rig_available};
use common::serve::{Served, mirror_group, ok, run, tools, wait_status};
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
        ] {
            assert_eq!(e[flag], true, "{flag} of {name}: {e:#}");
        }
        assert_eq!(e["is_read_only"], false);
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
