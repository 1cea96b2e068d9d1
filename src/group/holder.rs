//! Who holds a group: `serve` records its pid and control socket in the run
//! directory (`$MIRRORVOL_RUN_DIR`, else `/run/mirrorvol`), in
//! `<group-uuid>.pid`, so that other processes can find it: the CLI sends
//! operations there, and a refused disk lock names the daemon.
//!
//! The group is found from one disk's label, read without taking the disk's
//! lock (the daemon holds it).

use std::fs;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::disk::{FileDisk, OpenOptions};
use crate::format::ondisk;

/// The environment variable naming the run directory.
pub const RUN_DIR_ENV: &str = "MIRRORVOL_RUN_DIR";

/// The run directory where daemons record themselves.
pub fn run_dir() -> PathBuf {
    match std::env::var_os(RUN_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from("/run/mirrorvol"),
    }
}

/// The default control socket of the daemon serving `group`.
pub fn default_socket(group: Uuid) -> PathBuf {
    run_dir().join(format!("{group}.sock"))
}

/// The file where the daemon serving `group` records its pid and socket.
pub fn pid_file(group: Uuid) -> PathBuf {
    run_dir().join(format!("{group}.pid"))
}

/// A daemon that recorded itself as serving a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub group: Uuid,
    /// None when only the socket was found.
    pub pid: Option<u32>,
    pub socket: PathBuf,
}

impl Holder {
    /// "mirrorvol serve (pid N, control socket PATH)".
    pub fn describe(&self) -> String {
        match self.pid {
            Some(pid) => format!(
                "mirrorvol serve (pid {pid}, control socket {})",
                self.socket.display()
            ),
            None => format!("mirrorvol serve (control socket {})", self.socket.display()),
        }
    }

    /// "mirrorvol serve (pid N)".
    pub fn short(&self) -> String {
        match self.pid {
            Some(pid) => format!("mirrorvol serve (pid {pid})"),
            None => "mirrorvol serve".to_string(),
        }
    }
}

/// The pid file's text: the pid, then the socket path, one a line.
pub fn pid_file_text(pid: u32, socket: &Path) -> String {
    format!("{pid}\n{}\n", socket.display())
}

/// Parses a pid file's text.
pub fn parse_pid_file(text: &str) -> Option<(u32, PathBuf)> {
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    let socket = PathBuf::from(lines.next()?.trim());
    (!socket.as_os_str().is_empty()).then_some((pid, socket))
}

/// The daemon recorded for `group`, if any: from its pid file, else a
/// socket at the default path. Whether it answers is the caller's test.
pub fn recorded(group: Uuid) -> Option<Holder> {
    if let Ok(text) = fs::read_to_string(pid_file(group))
        && let Some((pid, socket)) = parse_pid_file(&text)
    {
        return Some(Holder {
            group,
            pid: Some(pid),
            socket,
        });
    }
    let socket = default_socket(group);
    socket.exists().then_some(Holder {
        group,
        pid: None,
        socket,
    })
}

/// Whether a process with this pid exists.
pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The group UUID in a disk's label, read without the disk's lock.
pub fn group_of(path: &Path) -> Option<Uuid> {
    if super::is_nbd(path) {
        let shown = path.display().to_string();
        let disk = crate::disk::nbd::NbdDisk::open(&shown, super::REMOTE_IO_TIMEOUT).ok()?;
        return Some(ondisk::read_label(&disk).ok()??.label.group_uuid);
    }
    let disk = FileDisk::open(
        path,
        OpenOptions {
            read_only: true,
            lock: false,
            ..OpenOptions::default()
        },
    )
    .ok()?;
    Some(ondisk::read_label(&disk).ok()??.label.group_uuid)
}

/// The live daemon recorded for the group of the disk at `path`.
pub fn holder_of(path: &Path) -> Option<Holder> {
    recorded(group_of(path)?).filter(|h| h.pid.is_none_or(alive))
}

/// The process holding the `flock` on the file at `path`, from
/// `/proc/locks`, and its command line: what a refused disk lock names when
/// no daemon recorded itself (an offline command such as a long
/// `add-mirror`).
pub fn lock_holder(path: &Path) -> Option<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).ok()?;
    let dev = meta.dev();
    let locks = fs::read_to_string("/proc/locks").ok()?;
    let pid = locks_holder(&locks, libc::major(dev), libc::minor(dev), meta.ino())?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    Some((pid, words.join(" ")))
}

/// The pid of the FLOCK in `locks` (the text of `/proc/locks`) on the file
/// with device `major:minor` and inode `ino`. Lines read `1: FLOCK
/// ADVISORY WRITE 4242 fe:01:131 0 EOF` (major and minor in hex).
fn locks_holder(locks: &str, major: u32, minor: u32, ino: u64) -> Option<u32> {
    let want = format!("{major:02x}:{minor:02x}:{ino}");
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A waiter's line has "->" after the index: not the holder.
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, file, ..] if *file == want => pid.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_of_a_lock_is_found_in_proc_locks_text() {
        let text = "1: POSIX  ADVISORY  WRITE 10 fe:01:131 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 fe:01:131 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 77 fe:01:131 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 99 08:10:131 0 EOF\n";
        assert_eq!(locks_holder(text, 0xfe, 1, 131), Some(4242));
        assert_eq!(locks_holder(text, 8, 16, 131), Some(99));
        assert_eq!(locks_holder(text, 8, 16, 132), None);
    }

    #[test]
    fn the_holder_of_a_real_flock_is_this_process() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let file = fs::File::open(f.path()).unwrap();
        // SAFETY: flock takes integers; `file` owns the descriptor.
        assert_eq!(
            unsafe {
                libc::flock(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    libc::LOCK_EX | libc::LOCK_NB,
                )
            },
            0
        );
        let (pid, cmdline) = lock_holder(f.path()).expect("the lock is listed");
        assert_eq!(pid, std::process::id());
        assert!(!cmdline.is_empty());
        drop(file);
        assert_eq!(lock_holder(f.path()), None, "gone with the descriptor");
    }

    #[test]
    fn pid_file_round_trips() {
        let text = pid_file_text(4242, Path::new("/run/mirrorvol/x.sock"));
        assert_eq!(
            parse_pid_file(&text),
            Some((4242, PathBuf::from("/run/mirrorvol/x.sock")))
        );
        assert_eq!(parse_pid_file("garbage\n/x\n"), None);
        assert_eq!(parse_pid_file("12\n"), None);
    }
}
