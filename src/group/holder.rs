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

/// Whether any daemon recorded itself in the run directory (a pid file or
/// a socket at its default path): where none did, no disk need be read to
/// learn which group's daemon to look for.
pub fn any_recorded() -> bool {
    any_recorded_in(&run_dir())
}

fn any_recorded_in(dir: &Path) -> bool {
    match fs::read_dir(dir) {
        Ok(entries) => entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.ends_with(".pid") || name.ends_with(".sock")
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        // Unreadable: look the long way.
        Err(_) => true,
    }
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

pub use crate::disk::file::lock_holder;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_directory_records_a_daemon_by_its_pid_file_or_socket() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!any_recorded_in(&dir.path().join("absent")));
        assert!(!any_recorded_in(dir.path()));
        fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert!(!any_recorded_in(dir.path()));
        let group = Uuid::new_v4();
        fs::write(dir.path().join(format!("{group}.sock")), "").unwrap();
        assert!(any_recorded_in(dir.path()));
        fs::remove_file(dir.path().join(format!("{group}.sock"))).unwrap();
        fs::write(dir.path().join(format!("{group}.pid")), "1\n/x.sock\n").unwrap();
        assert!(any_recorded_in(dir.path()));
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
