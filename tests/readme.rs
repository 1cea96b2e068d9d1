//! The README's walk-through runs as written: every ```sh block after a
//! `<!-- walk-through -->` line, in order, in one bash with `set -e`, from
//! `cargo install` to an ext4 on a served mirror and its online break.
//!
//! HOME is a temporary directory (the tour's scratch directory and the
//! completions land there) and `cargo install` installs into another
//! (CARGO_INSTALL_ROOT, first on PATH), so the machine is left as it was;
//! the release build it reuses is the one `.ci/run`'s demo made. Whatever
//! the script leaves behind on failure (mounts, the loop device, serve) is
//! found by the paths this test made and taken down.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Sandbox, have_tool, is_root, skip_or_fail};

/// The walk-through's blocks, in order.
fn walk_through(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if !line.starts_with("<!-- walk-through") {
            continue;
        }
        assert_eq!(
            lines.next(),
            Some("```sh"),
            "a walk-through marker is followed by a ```sh block"
        );
        let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        blocks.push(block.join("\n"));
    }
    blocks
}

#[test]
fn the_readme_names_its_walk_through_blocks() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks = walk_through(&readme);
    assert_eq!(blocks.len(), 3, "install, the tour, serving: {blocks:#?}");
    assert!(blocks[0].starts_with("cargo install --locked --path ."));
    assert!(blocks[2].contains("mkfs.ext4"));
}

/// Takes down what the script may have left: by the paths under `tour`.
fn clean_up(tour: &Path, run_dir: &Path) {
    let data = tour.join("mnt/data");
    let nbd = tour.join("mnt/nbd");
    // A break that failed may have left the filesystem frozen.
    let _ = Command::new("fsfreeze").arg("-u").arg(&data).output();
    let _ = Command::new("umount").arg(&data).status();
    // The loop device over the FUSE file, found by its backing file.
    if let Ok(o) = Command::new("losetup")
        .args([
            "-j",
            &nbd.join("nbd").display().to_string(),
            "-O",
            "NAME",
            "-n",
        ])
        .output()
    {
        for dev in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
    }
    let _ = Command::new("umount").arg(&nbd).status();
    // serve, by the pid file it wrote in this test's run directory.
    for entry in std::fs::read_dir(run_dir).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "pid")
            && let Ok(text) = std::fs::read_to_string(entry.path())
            && let Some(pid) = text
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) with a pid read from our own pid file.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

#[test]
fn the_readme_walk_through_runs_as_written() {
    if !is_root() {
        skip_or_fail("the walk-through needs root (losetup, mount)");
        return;
    }
    for tool in [
        "nbdinfo",
        "nbdfuse",
        "mkfs.ext4",
        "fsck.ext4",
        "fsfreeze",
        "cargo",
    ] {
        if !have_tool(tool) {
            skip_or_fail(&format!("the walk-through needs {tool}"));
            return;
        }
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(manifest.join("README.md")).unwrap();
    let sb = Sandbox::new();
    let (home, root, run_dir) = (sb.path("home"), sb.path("cargo-root"), sb.path("run"));
    std::fs::create_dir_all(&home).unwrap();
    // On any exit (a failed step, or the time limit's TERM) the background
    // jobs (serve, nbdfuse) go too, so that nothing outlives the script.
    let mut script = String::from(
        "set -euo pipefail\ntrap 'exit 143' TERM\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n",
    );
    for block in walk_through(&readme) {
        script.push_str(&block);
        script.push('\n');
    }
    // cargo and rustup find their homes from HOME unless told.
    let real_home = PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| real_home.join(".cargo"));
    let rustup_home = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| real_home.join(".rustup"));
    let path = format!(
        "{}:{}",
        root.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // A clean environment, as a user's shell: what cargo test sets for
    // tests (CARGO_*, RUST*) would make cargo install rebuild.
    // Output to files, not pipes: a background job that outlived a failed
    // step would hold a pipe open and the test would wait for it forever.
    let (out_file, err_file) = (sb.path("walk.out"), sb.path("walk.err"));
    let status = Command::new("timeout")
        .args(["600", "bash", "-c", &script])
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .current_dir(&manifest)
        .env_clear()
        .env("HOME", &home)
        .env("CARGO_HOME", &cargo_home)
        .env("RUSTUP_HOME", &rustup_home)
        .env("CARGO_INSTALL_ROOT", &root)
        .env("PATH", path)
        .env("MIRRORVOL_RUN_DIR", &run_dir)
        .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
        .status()
        .expect("timeout(1) and bash");
    let tour = home.join("mirrorvol-tour");
    clean_up(&tour, &run_dir);
    let stdout = std::fs::read_to_string(&out_file).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_file).unwrap_or_default();
    assert!(
        status.success(),
        "the walk-through failed ({status}; 124: it ran past 10 minutes):\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    // What the comments say happened.
    assert!(stdout.contains("snap holds the data"), "{stdout}");
    assert!(stdout.contains("exit 3: degraded"), "{stdout}");
    assert!(stdout.contains("repaired volume data"), "{stdout}");
    assert!(
        stdout.contains("export=\"data\"") || stdout.contains("export=\"snap\""),
        "nbdinfo lists the exports: {stdout}"
    );
    assert!(
        stdout.contains("split off the plex on") || stdout.contains("frozen"),
        "the online break: {stdout}"
    );
    assert!(home.join(".local/share/man/man8/mirrorvol.8").exists());
    assert!(root.join("bin/mirrorvol").exists());
    // The broken-off copy of the mounted filesystem is clean: fsck finds
    // nothing to do on it (it was frozen around the break).
    let image = sb.path("frozen.img");
    let copied = Command::new(root.join("bin/mirrorvol"))
        .args(["copy", "vol:frozen", &image.display().to_string()])
        .current_dir(&tour)
        .env("MIRRORVOL_DISKS", "a.img,b.img,c.img")
        .env("MIRRORVOL_RUN_DIR", &run_dir)
        .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
        .output()
        .unwrap();
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    let fsck = Command::new("fsck.ext4")
        .args(["-n", "-f", &image.display().to_string()])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "the frozen copy is a clean ext4: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// The block after `<!-- netns walk-through` in the README.
fn netns_walk_through(readme: &str) -> String {
    let mut lines = readme.lines();
    lines
        .by_ref()
        .find(|l| l.starts_with("<!-- netns walk-through"))
        .expect("the README has a netns walk-through");
    assert_eq!(lines.next(), Some("```sh"));
    lines
        .take_while(|l| *l != "```")
        .collect::<Vec<_>>()
        .join("\n")
}

/// The README's mirror across two network namespaces runs as written, with
/// a namespace, veth names and a /30 of this process's own: the writes
/// made while the link is cut get no error, the far disk comes back by
/// itself, and afterwards the far image alone holds every write.
#[test]
fn the_readme_walk_through_across_two_namespaces_runs_as_written() {
    if !is_root() {
        skip_or_fail("the namespace walk-through needs root (ip netns)");
        return;
    }
    for tool in ["ip", "qemu-nbd", "qemu-io", "nbdinfo"] {
        if !have_tool(tool) {
            skip_or_fail(&format!("the namespace walk-through needs {tool}"));
            return;
        }
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let pid = std::process::id();
    let (ns, near, far) = (
        format!("mwt-{pid}"),
        format!("mwn{pid}"),
        format!("mwf{pid}"),
    );
    let net = format!("172.{}.{}.", 16 + pid % 16, (pid / 16) % 63 * 4);
    let block = netns_walk_through(&readme)
        .replace("mirror-far", &ns)
        .replace("mvnear0", &near)
        .replace("mvfar0", &far)
        .replace("10.77.0.", &net);
    let sb = Sandbox::new();
    let home = sb.path("home");
    std::fs::create_dir_all(&home).unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_mirrorvol"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = format!(
        "set -euo pipefail\ntrap 'exit 143' TERM\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{block}\n"
    );
    let (out_file, err_file) = (sb.path("walk.out"), sb.path("walk.err"));
    let status = Command::new("timeout")
        .args(["180", "bash", "-c", &script])
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .env("HOME", &home)
        .env("PATH", path)
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
        .status()
        .expect("timeout(1) and bash");
    // What the block made, by the names given it.
    let _ = Command::new("ip").args(["link", "del", &near]).output();
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    let stdout = std::fs::read_to_string(&out_file).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_file).unwrap_or_default();
    assert!(
        status.success(),
        "the namespace walk-through failed ({status}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("exit 3: degraded"), "{stdout}");
    assert!(
        stdout.contains("resynced 48 MiB (50331648 bytes) of volume data onto nbd://"),
        "only what was written while away: {stdout}"
    );
    // The far image alone: the write before the cut and the one made
    // while the link was down.
    let dir = home.join("mirrorvol-far");
    let copy = sb.path("far-alone.bin");
    let copied = Command::new(&bin)
        .args(["copy", "vol:data", &copy.display().to_string()])
        .current_dir(&dir)
        .env("MIRRORVOL_DISKS", "far.img")
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
        .output()
        .unwrap();
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    let got = std::fs::read(&copy).unwrap();
    assert!(got[..16 << 20].iter().all(|&b| b == 1), "the first write");
    assert!(
        got[16 << 20..48 << 20].iter().all(|&b| b == 2),
        "the write made while the link was cut"
    );
}
