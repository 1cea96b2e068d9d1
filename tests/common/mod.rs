//! Shared test scaffolding: a sandbox of image files, the real binary, and a
//! fingerprint of every disk byte to prove that refusals change nothing.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod crash;
pub mod ext4;
pub mod faulty;
pub mod serve;
pub mod tls;

pub const MIB: u64 = 1024 * 1024;

/// True when tests that need root or external tools must run (CI).
pub fn e2e_required() -> bool {
    std::env::var("MIRRORVOL_E2E").as_deref() == Ok("require")
}

/// Skips a test that cannot run here, loudly; under MIRRORVOL_E2E=require it
/// fails instead.
pub fn skip_or_fail(why: &str) {
    if e2e_required() {
        panic!("required end-to-end test cannot run: {why}");
    }
    eprintln!("SKIPPED (set MIRRORVOL_E2E=require to make this fail): {why}");
}

pub fn have_tool(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A temporary directory holding a group's image files.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

/// What one run of the binary did.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts that a finished process was refused (see [`Run::refused`]).
    #[track_caller]
    pub fn refused_from(o: Output, needle: &str) -> Run {
        Run::from(o).refused(needle)
    }

    /// Asserts a refusal: exit 2 and one sentence on stderr containing `needle`.
    #[track_caller]
    pub fn refused(self, needle: &str) -> Run {
        assert_eq!(
            self.code, 2,
            "expected exit 2\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "one error line expected:\n{}", self.stderr);
        assert!(
            errors[0].contains(needle),
            "error should mention {needle:?}: {}",
            errors[0]
        );
        assert!(
            !self.stderr.contains("panicked"),
            "panic on user input: {}",
            self.stderr
        );
        self
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mirrorvol")
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::Builder::new()
                .prefix("mirrorvol-test-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// A sparse image file of `mib` MiB in the disks directory.
    pub fn image(&self, name: &str, mib: u64) -> String {
        fs::create_dir_all(self.path("disks")).unwrap();
        let path = self.path("disks").join(name);
        let f = fs::File::create(&path).unwrap();
        f.set_len(mib * MIB).unwrap();
        path.display().to_string()
    }

    pub fn disks_dir(&self) -> String {
        self.p("disks")
    }

    /// Runs `mirrorvol ARGS` with `--disks` set to the disks directory.
    pub fn mv(&self, args: &[&str]) -> Run {
        Run::from(
            Command::new(bin())
                .env("MIRRORVOL_DISKS", self.disks_dir())
                .env("MIRRORVOL_RUN_DIR", self.path("run"))
                .env("MIRRORVOL_HOST_ID_FILE", self.path("host-id"))
                .args(args)
                .output()
                .expect("run mirrorvol"),
        )
    }

    /// Runs `mirrorvol ARGS` with `disks` (paths or NBD URIs, comma
    /// separated) as the group's disks.
    pub fn mv_on(&self, disks: &str, args: &[&str]) -> Run {
        Run::from(
            Command::new(bin())
                .env("MIRRORVOL_DISKS", disks)
                .env("MIRRORVOL_RUN_DIR", self.path("run"))
                .env("MIRRORVOL_HOST_ID_FILE", self.path("host-id"))
                .args(args)
                .output()
                .expect("run mirrorvol"),
        )
    }

    /// Runs `mirrorvol ARGS` with no environment for disks.
    pub fn mv_plain(&self, args: &[&str]) -> Run {
        Run::from(
            Command::new(bin())
                .env_remove("MIRRORVOL_DISKS")
                .env("MIRRORVOL_RUN_DIR", self.path("run"))
                .env("MIRRORVOL_HOST_ID_FILE", self.path("host-id"))
                .args(args)
                .output()
                .expect("run mirrorvol"),
        )
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let r = self.mv(&["status", "--json"]).ok();
        serde_json::from_str(&r.stdout).expect("status --json is JSON")
    }

    /// Every byte of every file under the sandbox's disks directory, hashed.
    pub fn fingerprint(&self) -> Vec<(PathBuf, u32)> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.path("disks")).unwrap() {
            let p = e.unwrap().path();
            out.push((p.clone(), crc32c::crc32c(&fs::read(&p).unwrap())));
        }
        out.sort();
        out
    }

    /// Size, head and tail of every disk file: for sparse files too large to
    /// read whole.
    pub fn fingerprint_sizes(&self) -> Vec<(PathBuf, u64, u32, u32)> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.path("disks")).unwrap() {
            let p = e.unwrap().path();
            let len = fs::metadata(&p).unwrap().len();
            let head = read_range(&p, 0, (2 * MIB).min(len) as usize);
            let tail_len = MIB.min(len);
            let tail = read_range(&p, len - tail_len, tail_len as usize);
            out.push((p, len, crc32c::crc32c(&head), crc32c::crc32c(&tail)));
        }
        out.sort();
        out
    }

    /// A file of `len` pseudo-random bytes from `seed`.
    pub fn data_file(&self, name: &str, len: usize, seed: u64) -> (String, Vec<u8>) {
        let data = pattern(len, seed);
        let p = self.path(name);
        fs::write(&p, &data).unwrap();
        (p.display().to_string(), data)
    }

    /// Reads a volume out through `copy` and returns its bytes.
    pub fn read_volume(&self, name: &str) -> Vec<u8> {
        let out = self.path(&format!("out-{name}.bin"));
        let _ = fs::remove_file(&out);
        self.mv(&["copy", &format!("vol:{name}"), &out.display().to_string()])
            .ok();
        fs::read(&out).unwrap()
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// Reads `len` bytes at `offset` of a file.
pub fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(path).unwrap();
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// The volume named `name` in a status report.
pub fn volume<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("volume {name} in status: {status:#}"))
}

/// The string `key` of every object of a JSON array: the disks of a
/// volume's plexes, the paths of a report's disks, the history's commands.
pub fn strings<'a>(list: &'a serde_json::Value, key: &str) -> Vec<&'a str> {
    list.as_array()
        .unwrap_or_else(|| panic!("an array: {list:#}"))
        .iter()
        .map(|o| o[key].as_str().unwrap_or_else(|| panic!("{key} in {o:#}")))
        .collect()
}

/// The disk whose path ends with `file` in a status report.
pub fn disk<'a>(status: &'a serde_json::Value, file: &str) -> &'a serde_json::Value {
    status["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["path"].as_str().unwrap().ends_with(file))
        .unwrap_or_else(|| panic!("disk {file} in status: {status:#}"))
}

/// Runs a command that must be refused and checks every disk is unchanged.
#[track_caller]
pub fn refused_unchanged(sb: &Sandbox, args: &[&str], needle: &str) {
    let before = sb.fingerprint();
    sb.mv(args).refused(needle);
    assert_eq!(
        sb.fingerprint(),
        before,
        "a refusal changed a disk: {args:?}"
    );
}

/// Where volume `name`'s plex starts in the image file `file`: the disk's
/// data offset (its label) plus the plex's offset (the config), both from
/// `examine --json`.
pub fn plex_start(sb: &Sandbox, file: &str, name: &str) -> u64 {
    let r = sb
        .mv_plain(&["examine", &sb.p(&format!("disks/{file}")), "--json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let uuid = v["label"]["disk_uuid"].clone();
    let vol = v["config"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .unwrap();
    let plex = vol["plexes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["disk"] == uuid)
        .unwrap_or_else(|| panic!("volume {name} has no plex on {file}"));
    v["label"]["data_offset"].as_u64().unwrap() + plex["offset"].as_u64().unwrap()
}

/// `len` bytes of volume `name` at volume offset `at`, as the plex on
/// `file` holds them.
pub fn plex_read(sb: &Sandbox, file: &str, name: &str, at: u64, len: usize) -> Vec<u8> {
    let start = plex_start(sb, file, name);
    read_range(&sb.path("disks").join(file), start + at, len)
}

/// Flips every byte of `len` bytes at volume offset `at` on one plex only.
pub fn corrupt(sb: &Sandbox, file: &str, name: &str, at: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let bad: Vec<u8> = plex_read(sb, file, name, at, len)
        .iter()
        .map(|b| !b)
        .collect();
    let start = plex_start(sb, file, name);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(sb.path("disks").join(file))
        .unwrap();
    f.write_all_at(&bad, start + at).unwrap();
    bad
}

/// The resyncs of `volume` onto `disk` a `serve` log reports, in order:
/// the bytes each copied, and whether from the write-intent bitmaps. The
/// lines read "resynced 4 MiB (4194304 bytes) of volume V onto D (...)",
/// or "resynced 0 bytes of ...".
#[allow(dead_code)]
pub fn resyncs_in_log(log: &str, volume: &str, disk: &str) -> Vec<(u64, bool)> {
    log.lines()
        .filter(|l| {
            l.starts_with("resynced ") && l.contains(&format!(" of volume {volume} onto {disk} ("))
        })
        .map(|l| {
            let amount = l["resynced ".len()..].split(" of volume").next().unwrap();
            let bytes = amount
                .rsplit_once('(')
                .map_or(amount, |(_, n)| n)
                .trim_end_matches(')')
                .trim_end_matches(" bytes")
                .parse()
                .unwrap_or_else(|_| panic!("no byte count in {l}"));
            (bytes, l.contains("from the write-intent bitmaps"))
        })
        .collect()
}
