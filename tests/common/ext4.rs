//! A real filesystem on a served volume: nbdfuse exposes an NBD export as
//! a file, a loop device sits on it, and ext4 goes on that; a tree of
//! files to write and their checksums to compare.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::pattern;
use super::serve::ok;

/// Undoes set-up steps in reverse order, whatever happens in the test.
#[derive(Default)]
pub struct Cleanup(Vec<Box<dyn FnOnce()>>);

impl Cleanup {
    pub fn push(&mut self, f: impl FnOnce() + 'static) {
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

/// Writes a tree of directories and files with varied sizes (`seed`
/// varies their bytes).
pub fn make_tree(root: &Path, seed: u64) {
    for d in 0..6 {
        let dir = root.join(format!("dir{d}/sub{}", d % 3));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..12u64 {
            let len = ((d * 12 + f) * 7919 % 300_000) as usize + 1;
            std::fs::write(
                dir.join(format!("f{f}.bin")),
                pattern(len, seed * 10_000 + d * 100 + f),
            )
            .unwrap();
        }
    }
}

/// crc32c of every file under `root`, by relative path.
pub fn checksums(root: &Path) -> Vec<(PathBuf, u32, usize)> {
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

pub fn sh(cmd: &str, args: &[&str]) -> Command {
    let mut c = Command::new(cmd);
    c.args(args);
    c
}

/// The NBD export `uri` as a loop device, through nbdfuse on `fuse_dir`;
/// both taken down by `cleanup`. Returns the loop device.
pub fn loop_on_nbdfuse(uri: &str, fuse_dir: &Path, cleanup: &mut Cleanup) -> String {
    std::fs::create_dir_all(fuse_dir).unwrap();
    let pidfile = fuse_dir.with_extension("pid");
    let child: Child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(fuse_dir)
        .arg(uri)
        .spawn()
        .expect("spawn nbdfuse");
    {
        let fuse_dir = fuse_dir.to_path_buf();
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
            // The loop device lets go of the FUSE file before it is
            // unmounted (`losetup -d` only asks).
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                let listed = Command::new("losetup")
                    .arg(&lo)
                    .output()
                    .is_ok_and(|o| o.status.success());
                if !listed {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    }
    lo
}
