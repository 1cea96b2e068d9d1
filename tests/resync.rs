//! The background resync engine through the group: an interrupted resync
//! resumes from its checkpoint (stopped through the library, or `serve`
//! killed with SIGKILL), and a group in service resyncs in the background
//! while status shows the progress.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{MIB, bin, pattern};
use mirrorvol::format::{PlexState, Style};
use mirrorvol::group::live::{LiveGroup, Resynced};
use mirrorvol::group::ops::{self, InitOptions};
use mirrorvol::group::{DiskSet, Group, Lookup, NoProgress};
use mirrorvol::volume::engine::{EngineOptions, Mode};
use mirrorvol::volume::resync::ResyncOptions;
use uuid::Uuid;

const VOL: u64 = 32 * MIB;

fn assemble(paths: &[PathBuf]) -> Group {
    let set = DiskSet {
        explicit: paths.to_vec(),
        ..DiskSet::default()
    };
    let mut g = Group::assemble(&set, Lookup::Required).unwrap().unwrap();
    g.start_bitmaps().unwrap();
    g
}

/// Two raw disks; a simple volume `v` of `size` bytes on the first, full of
/// pseudo-random data.
fn group(dir: &Path, size: u64) -> (Vec<PathBuf>, Vec<u8>) {
    let paths: Vec<PathBuf> = ["a.img", "b.img"].iter().map(|n| dir.join(n)).collect();
    for p in &paths {
        fs::File::create(p)
            .unwrap()
            .set_len(size + 16 * MIB)
            .unwrap();
    }
    let opts = InitOptions {
        style: Style::Raw,
        controller: None,
        group: Some("g".into()),
        force: false,
        region_size: 0,
        spare: false,
    };
    let mut g = ops::init(None, &paths, &opts).unwrap();
    g.start_bitmaps().unwrap();
    g.create("v", size, 1, &paths[..1]).unwrap();
    drop(g);
    let data = pattern(size as usize, 7);
    live(&paths).write("v", 0, &data).unwrap();
    (paths, data)
}

/// The group of `paths` run by its controller, as a command runs it.
fn live(paths: &[PathBuf]) -> Arc<LiveGroup> {
    LiveGroup::start(assemble(paths), EngineOptions::default())
}

/// Runs the resyncs the group needs to their end, as an offline command
/// does; returns what each printed and copied.
fn resync_all(paths: &[PathBuf]) -> Vec<Resynced> {
    live(paths).resync_in_foreground(&NoProgress, None).unwrap()
}

/// The bytes of the plex of `v` on `disk`, read from its image file.
fn plex_bytes(g: &Group, disk: Uuid) -> Vec<u8> {
    let v = g.volume("v").unwrap();
    let p = v.plexes.iter().find(|p| p.disk == disk).unwrap();
    let m = &g.members[&disk];
    common::read_range(
        &m.path,
        m.label.layout.data_offset() + p.offset,
        v.size as usize,
    )
}

fn plex(g: &Group, disk: Uuid) -> &mirrorvol::format::PlexEntry {
    g.volume("v")
        .unwrap()
        .plexes
        .iter()
        .find(|p| p.disk == disk)
        .unwrap()
}

#[test]
fn a_stopped_resync_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, data) = group(dir.path(), VOL);
    let mut g = assemble(&paths);
    let b = g.add_resyncing_plex("v", Some(&paths[1])).unwrap();
    let served = LiveGroup::start(g, EngineOptions::default());
    served.start_resyncs(ResyncOptions {
        max_rate: 32 * MIB,
        idle_chunk: MIB as usize,
        ..ResyncOptions::unthrottled()
    });
    let start = Instant::now();
    while served
        .resync_progress("v")
        .is_none_or(|p| p.done() < VOL / 2)
    {
        assert!(start.elapsed() < Duration::from_secs(20), "resync hangs");
        std::thread::sleep(Duration::from_millis(1));
    }
    served.stop_resyncs();
    let (state, at) = served
        .with_group(move |g| (plex(g, b).state, plex(g, b).resync_offset))
        .unwrap();
    drop(served);
    assert_eq!(state, PlexState::Resyncing);
    assert!((VOL / 2..VOL).contains(&at), "checkpoint at {at}");

    // After a restart: a write below the checkpoint, then the rest.
    live(&paths).write("v", MIB, &[0x5a; 8192]).unwrap();
    let done = resync_all(&paths);
    assert_eq!(done.len(), 1, "{done:?}");
    let copied = done[0].bytes;
    assert!(
        copied <= VOL - at + 2 * MIB,
        "copied {copied} bytes after a checkpoint at {at}"
    );
    assert!(
        done[0].line.contains("resumed from the checkpoint"),
        "{done:?}"
    );
    let g = assemble(&paths);
    assert_eq!(plex(&g, b).state, PlexState::InSync);
    assert_eq!(plex(&g, b).resync_offset, 0);
    let a = g.volume("v").unwrap().plexes[0].disk;
    let (on_a, on_b) = (plex_bytes(&g, a), plex_bytes(&g, b));
    assert!(on_a == on_b, "the plexes differ after the resumed resync");
    assert_eq!(&on_b[MIB as usize..MIB as usize + 8192], &[0x5a; 8192][..]);
    assert!(on_b[..MIB as usize] == data[..MIB as usize]);
}

#[test]
fn a_group_in_service_resyncs_in_the_background_and_status_shows_progress() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = group(dir.path(), VOL);
    let mut g = assemble(&paths);
    let b = g.add_resyncing_plex("v", Some(&paths[1])).unwrap();
    let live = LiveGroup::start(g, EngineOptions::default());
    live.start_resyncs(ResyncOptions {
        min_rate: 4 * MIB,
        max_rate: 16 * MIB,
        ..ResyncOptions::default()
    });
    let vol = live.volume("v").unwrap();
    let start = Instant::now();
    let mut seen_running = false;
    let mut n = 0u64;
    while live.resyncing() {
        assert!(start.elapsed() < Duration::from_secs(20), "resync hangs");
        // Foreground writes, on both sides of the position.
        vol.write((n * 7919 * 4096) % (VOL - 4096), &[n as u8; 4096])
            .unwrap();
        n += 1;
        let s = serde_json::to_value(live.status().unwrap()).unwrap();
        let p = &s["volumes"][0]["plexes"][1];
        if let Some(pct) = p["resync_percent"].as_f64()
            && p["state"] == "resyncing"
            && pct > 0.0
            && pct < 100.0
            && p["resync_rate"].as_u64().is_some_and(|r| r > 0)
        {
            assert!(p["resync_eta_seconds"].as_u64().is_some(), "{p}");
            seen_running = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen_running, "status never showed the resync under way");
    // 32 MiB at 4 to 16 MiB/s.
    assert!(start.elapsed() >= Duration::from_millis(1900));
    let s = serde_json::to_value(live.status().unwrap()).unwrap();
    let p = &s["volumes"][0]["plexes"][1];
    assert_eq!(p["state"], "in-sync", "{s}");
    assert_eq!(p["resync_percent"], 100.0);
    assert_eq!(vol.plex(b).unwrap().mode(), Mode::InSync);
    live.stop();
    drop(vol);
    drop(live);
    let g = assemble(&paths);
    assert_eq!(plex(&g, b).state, PlexState::InSync);
    let a = g.volume("v").unwrap().plexes[0].disk;
    assert!(plex_bytes(&g, a) == plex_bytes(&g, b), "the plexes differ");
}

#[test]
fn serve_killed_during_a_resync_resumes_it_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let (paths, _) = group(dir.path(), size);
    let mut g = assemble(&paths);
    let b = g.add_resyncing_plex("v", Some(&paths[1])).unwrap();
    drop(g);
    let disks = paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let sock = dir.path().join("nbd.sock");
    let mut child = std::process::Command::new(bin())
        .env("MIRRORVOL_RUN_DIR", dir.path().join("run"))
        .args(["--disks", &disks, "serve", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .args(["--resync-max-rate", "8M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // One checkpoint every 5 s: 40 MiB or so are recorded by 6.5 s.
    std::thread::sleep(Duration::from_millis(6500));
    child.kill().unwrap();
    child.wait().unwrap();
    let g = assemble(&paths);
    let at = plex(&g, b).resync_offset;
    assert_eq!(plex(&g, b).state, PlexState::Resyncing);
    assert!(
        (16 * MIB..size).contains(&at),
        "checkpoint at {at} after 6.5 s at 8 MiB/s"
    );
    drop(g);
    let done = resync_all(&paths);
    assert_eq!(done.len(), 1, "{done:?}");
    let copied = done[0].bytes;
    assert!(copied <= size - at + 4 * MIB, "copied {copied} after {at}");
    let g = assemble(&paths);
    let a = g.volume("v").unwrap().plexes[0].disk;
    assert!(plex_bytes(&g, a) == plex_bytes(&g, b), "the plexes differ");
}

#[test]
fn a_stale_plex_is_resynced_in_the_background_from_the_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = group(dir.path(), VOL);
    let mut g = assemble(&paths);
    let b = g.add_resyncing_plex("v", Some(&paths[1])).unwrap();
    drop(g);
    resync_all(&paths);
    // The plex on b falls behind: recorded stale, then 3 MiB written to a
    // alone (their regions' bits stay set on a while b is stale).
    let mut g = assemble(&paths);
    g.config.volume_mut("v").unwrap().plexes[1].state = PlexState::Stale;
    g.commit().unwrap();
    let a = g.volume("v").unwrap().plexes[0].disk;
    LiveGroup::start(g, EngineOptions::default())
        .write("v", 5 * MIB, &pattern(3 * MIB as usize, 9))
        .unwrap();
    let g = assemble(&paths);
    assert!(plex_bytes(&g, a) != plex_bytes(&g, b));
    drop(g);

    let g = assemble(&paths);
    let live = LiveGroup::start(g, EngineOptions::default());
    live.start_resyncs(ResyncOptions::default());
    let start = Instant::now();
    while live.resyncing() {
        assert!(start.elapsed() < Duration::from_secs(10), "resync hangs");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = serde_json::to_value(live.status().unwrap()).unwrap();
    assert_eq!(s["volumes"][0]["plexes"][1]["state"], "in-sync", "{s}");
    live.stop();
    drop(live);
    let g = assemble(&paths);
    assert!(plex_bytes(&g, a) == plex_bytes(&g, b), "the plexes differ");
}
