//! A real filesystem on a served volume: nbdfuse exposes the export as a
//! file, a loop device sits on it, and ext4 is made, filled, checked and
//! read back across a remount.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::serve::{Served, mirror_group, ok, run, tools};
use common::{Sandbox, is_root, pattern};

/// Undoes set-up steps in reverse order, whatever happens in the test.
#[derive(Default)]
struct Cleanup(Vec<Box<dyn FnOnce()>>);

impl Cleanup {
    fn push(&mut self, f: impl FnOnce() + 'static) {
        self.0.push(Box::new(f));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        while let Some(f) = self.0.pop() {
            f();
        }
    }
}

/// Writes a tree of directories and files with varied sizes.
fn make_tree(root: &Path) {
    for d in 0..6 {
        let dir = root.join(format!("dir{d}/sub{}", d % 3));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..12u64 {
            let len = ((d * 12 + f) * 7919 % 300_000) as usize + 1;
            std::fs::write(dir.join(format!("f{f}.bin")), pattern(len, d * 100 + f)).unwrap();
        }
    }
}

/// crc32c of every file under `root`, by relative path.
fn checksums(root: &Path) -> Vec<(PathBuf, u32, usize)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, u32, usize)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().is_some_and(|n| n == "lost+found") {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let data = std::fs::read(&p).unwrap();
                out.push((
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    crc32c::crc32c(&data),
                    data.len(),
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn sh(cmd: &str, args: &[&str]) -> Command {
    let mut c = Command::new(cmd);
    c.args(args);
    c
}

#[test]
fn ext4_on_nbdfuse_and_loop_survives_fsck_and_remount() {
    if !tools(&["nbdfuse", "losetup", "mkfs.ext4", "fsck.ext4"]) {
        return;
    }
    if !is_root() || !Path::new("/dev/fuse").exists() {
        common::skip_or_fail("nbdfuse and loop devices need root and /dev/fuse");
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 160, 128);
    let served = Served::start(&sb, &[], &[]);
    let mut cleanup = Cleanup::default();

    // nbdfuse exposes the export as FUSE_DIR/nbd.
    let fuse_dir = sb.path("fuse");
    std::fs::create_dir_all(&fuse_dir).unwrap();
    let pidfile = sb.path("nbdfuse.pid");
    let child: Child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(&fuse_dir)
        .arg(served.uri("data"))
        .spawn()
        .expect("spawn nbdfuse");
    {
        let fuse_dir = fuse_dir.clone();
        let mut child = child;
        cleanup.push(move || {
            // As root, a FUSE mount comes off with umount(8).
            let _ = Command::new("umount").arg(&fuse_dir).status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        });
    }
    let start = Instant::now();
    while !pidfile.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nbdfuse not ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let image = fuse_dir.join("nbd");

    let lo = ok(&mut sh(
        "losetup",
        &["--find", "--show", &image.display().to_string()],
    ))
    .trim()
    .to_string();
    {
        let lo = lo.clone();
        cleanup.push(move || {
            let _ = Command::new("losetup").args(["-d", &lo]).status();
        });
    }
    ok(&mut sh("mkfs.ext4", &["-q", "-F", &lo]));

    let mnt = sb.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mount = |mnt: &Path| ok(&mut sh("mount", &[&lo, &mnt.display().to_string()]));
    let umount = |mnt: &Path| ok(&mut sh("umount", &[&mnt.display().to_string()]));
    mount(&mnt);
    {
        let mnt = mnt.clone();
        cleanup.push(move || {
            let _ = Command::new("umount").arg(&mnt).status();
        });
    }
    let tree = sb.path("tree");
    make_tree(&tree);
    ok(&mut sh(
        "cp",
        &[
            "-a",
            &format!("{}/.", tree.display()),
            &mnt.display().to_string(),
        ],
    ));
    let want = checksums(&tree);
    assert_eq!(want.len(), 72);
    ok(&mut sh("sync", &[]));
    umount(&mnt);

    let (code, out, err) = run(&mut sh("fsck.ext4", &["-fn", &lo]));
    assert_eq!(code, 0, "fsck found problems:\n{out}\n{err}");

    mount(&mnt);
    assert_eq!(checksums(&mnt), want, "files differ after remount");
    umount(&mnt);
    drop(cleanup);

    let (code, err) = served.stop();
    assert_eq!(code, 0, "{err}");
}
