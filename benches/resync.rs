//! Resync throughput against `dd` copying the same bytes between the same
//! files (issue 5, item 7: target ≥ 0.9×). Not a test: it prints medians and
//! the ratio.
//!
//!   cargo bench --bench resync -- [--mib N] [--runs N] [--dir DIR]
//!
//! Two raw image files in DIR, opened O_DIRECT (as `serve` runs); a simple
//! volume of N MiB (default 512) of non-zero data on the first; then, each
//! run, a new plex on the second is resynced in full through the resync
//! engine (unthrottled, as `add-mirror` does), and `dd bs=4M iflag=direct
//! oflag=direct` copies the same bytes from the first file to the second.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use mirrorvol::format::Style;
use mirrorvol::group::live::LiveGroup;
use mirrorvol::group::ops::{self, InitOptions};
use mirrorvol::group::{DiskSet, Group, Lookup, NoProgress};

const MIB: u64 = 1 << 20;

fn main() {
    let mut mib = 512u64;
    let mut runs = 3usize;
    let mut dir = PathBuf::from("/var/tmp");
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--mib" => mib = it.next().and_then(|v| v.parse().ok()).unwrap_or(mib),
            "--runs" => runs = it.next().and_then(|v| v.parse().ok()).unwrap_or(runs),
            "--dir" => dir = it.next().map(PathBuf::from).unwrap_or(dir),
            _ => {}
        }
    }
    let work = tempfile::Builder::new()
        .prefix("mirrorvol-resync-bench-")
        .tempdir_in(&dir)
        .expect("a work directory");
    let paths: Vec<PathBuf> = ["a.img", "b.img"]
        .iter()
        .map(|n| work.path().join(n))
        .collect();
    for p in &paths {
        std::fs::File::create(p)
            .and_then(|f| f.set_len((mib + 64) * MIB))
            .expect("create an image file");
    }
    let opts = InitOptions {
        style: Style::Raw,
        controller: None,
        group: Some("bench".into()),
        force: false,
        region_size: 0,
        spare: false,
    };
    drop(ops::init(None, &paths, &opts).expect("init"));
    let assemble = || {
        let set = DiskSet {
            explicit: paths.clone(),
            open: mirrorvol::group::DiskOpen {
                direct: true,
                ..Default::default()
            },
            ..DiskSet::default()
        };
        let mut g = Group::assemble(&set, Lookup::Required).unwrap().unwrap();
        g.start_bitmaps().unwrap();
        g
    };
    let mut g = assemble();
    g.create("v", mib * MIB, 1, &paths[..1]).expect("create");
    // Run by the group's controller, as `add-mirror` runs it.
    let live = LiveGroup::start(g, Default::default());
    let mut chunk = vec![0u8; (4 * MIB) as usize];
    let mut x = 0x9e3779b97f4a7c15u64;
    for at in (0..mib * MIB).step_by(chunk.len()) {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        live.write("v", at, &chunk).expect("fill the volume");
    }
    let (mut engine, mut dd) = (Vec::new(), Vec::new());
    for run in 0..runs {
        live.add_mirror("v", Some(&paths[1])).expect("add-mirror");
        let t = Instant::now();
        live.resync_in_foreground(&NoProgress, None)
            .expect("resync");
        engine.push(t.elapsed().as_secs_f64());
        let (src, dst) = live
            .with_group(|g| {
                let v = g.volume("v").unwrap();
                let at = |p: &mirrorvol::format::PlexEntry| {
                    g.members[&p.disk].label.layout.data_offset() + p.offset
                };
                (at(&v.plexes[0]), at(&v.plexes[1]))
            })
            .unwrap();
        live.remove_mirror("v", &paths[1]).unwrap();
        let t = Instant::now();
        let status = Command::new("dd")
            .arg(format!("if={}", paths[0].display()))
            .arg(format!("of={}", paths[1].display()))
            .args(["bs=4M", "iflag=direct,skip_bytes,count_bytes"])
            .args(["oflag=direct,seek_bytes", "conv=notrunc", "status=none"])
            .arg(format!("skip={src}"))
            .arg(format!("seek={dst}"))
            .arg(format!("count={}", mib * MIB))
            .status()
            .expect("run dd");
        assert!(status.success(), "dd failed");
        dd.push(t.elapsed().as_secs_f64());
        eprintln!(
            "run {}: resync {:.2} s, dd {:.2} s",
            run + 1,
            engine[run],
            dd[run]
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (e, d) = (median(&mut engine), median(&mut dd));
    let mb = (mib * MIB) as f64 / 1e6;
    println!(
        "resync {mib} MiB: engine {:.0} MB/s, dd {:.0} MB/s, ratio {:.2} (target >= 0.9), medians of {runs} runs",
        mb / e,
        mb / d,
        d / e
    );
}
