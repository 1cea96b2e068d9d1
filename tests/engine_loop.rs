//! The engine on loop devices opened O_DIRECT: a mirror made by the binary on
//! two loop devices, assembled with `DiskSet::direct`, under the concurrent
//! workload of the fault suite; every acknowledged write reads back and the
//! plexes are equal. Needs root and losetup (else skipped, or failed under
//! MIRRORVOL_E2E=require).

mod common;
mod rig;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mirrorvol::group::live::LiveGroup;
use rig::*;

/// A loop device attached by this test, detached on drop.
struct LoopDev(PathBuf);

impl LoopDev {
    fn attach(file: &Path) -> Result<LoopDev, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup --find --show failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(LoopDev(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim(),
        )))
    }

    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Whether this process holds `dev` open with O_DIRECT.
fn open_direct(dev: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|t| t == dev) && {
            let info = std::fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            info.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| i64::from_str_radix(f.trim(), 8).ok())
                .is_some_and(|f| f & libc::O_DIRECT as i64 != 0)
        }
    })
}

#[test]
fn a_mirror_on_loop_devices_opened_o_direct_keeps_every_acknowledged_write() {
    if !is_root() || !have_tool("losetup") {
        return skip_or_fail("needs root and losetup");
    }
    let sb = Sandbox::new();
    let mut devs = Vec::new();
    for name in ["a.raw", "b.raw"] {
        let file = sb.path(name);
        std::fs::File::create(&file)
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        match LoopDev::attach(&file) {
            Ok(d) => devs.push(d),
            Err(e) => return skip_or_fail(&e),
        }
    }
    let (a, b) = (devs[0].arg(), devs[1].arg());
    let both = format!("{a},{b}");
    sb.mv_plain(&["init", &a, "--controller", "c0", "--group", "g"])
        .ok();
    sb.mv_plain(&["--disks", &a, "init", &b, "--controller", "c1"])
        .ok();
    sb.mv_plain(&["--disks", &both, "create", "m", "--size", "16M", "--mirror"])
        .ok();

    let paths: Vec<PathBuf> = devs.iter().map(|d| d.0.clone()).collect();
    let g = assemble_with(&paths, true);
    let live: Arc<LiveGroup> = start_live(g, opts(5000, 20));
    for d in &paths {
        assert!(open_direct(d), "{} is not open O_DIRECT", d.display());
    }
    let vol = live.volume("m").unwrap();
    let blocks = vol.size() / BLOCK;
    let spec = WorkloadSpec::new(0x100b, blocks);
    let reference = Arc::new(Reference::new(blocks));
    reference.fill(&vol, 0..spec.written.start);
    let w = Workload::start(spec, vol.clone(), reference);
    assert!(
        w.wait_writes(400, false, Duration::from_secs(30)),
        "the writers stalled"
    );
    let (reference, counters) = w.stop();
    assert_eq!(
        counters
            .write_errors
            .load(std::sync::atomic::Ordering::SeqCst)
            + counters
                .read_errors
                .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "{:?}",
        counters.first_error.lock().unwrap()
    );
    vol.flush().unwrap();
    let s = states(&status_json(&live));
    assert_eq!(s.volume("m"), "healthy", "{s:?}");
    drop(vol);
    shut_down(live);

    let g = assemble_with(&paths, true);
    check_plexes(&g, "m", &reference, 2);
    drop(g);
    drop(devs);
}
