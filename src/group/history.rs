//! The group's history of configuration changes (`zpool history`): every
//! command that changes the config is recorded in it once, with the time,
//! the command, the user and the host: an offline command at its first
//! commit (a refused one commits nothing), a request to `serve` once it
//! has succeeded, with one more commit. It lives in
//! the config itself (`history`, the last [`HISTORY_KEPT`] entries), so
//! every disk carries it and it survives what the config survives.
//!
//! Who acts: an offline command is the process's own command line and user
//! ([`set_process_actor`]); under `serve`, each control request is recorded
//! as the command it stands for, with the user on the other end of the
//! control socket ([`Actor::peer`]). Changes the daemon makes by itself (a
//! disk failed by an I/O error, a resync's checkpoint or end) are not
//! commands: they are in the events, not here (as `zpool history` without
//! `-i`).

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Entries a config keeps; older ones are dropped.
pub const HISTORY_KEPT: usize = 200;

pub use crate::format::config::HistoryEntry;

/// Who is changing the config, until their first commit records them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub command: String,
    pub user: String,
    pub host: String,
}

static PROCESS_ACTOR: OnceLock<Actor> = OnceLock::new();

/// Records `command` (the command line of an offline command) as who
/// changes the config in this process.
pub fn set_process_actor(command: String) {
    let uid = {
        // SAFETY: getuid has no preconditions and cannot fail.
        unsafe { libc::getuid() }
    };
    let _ = PROCESS_ACTOR.set(Actor {
        command,
        user: user_name(uid),
        host: host_name(),
    });
}

/// The actor of this process, if [`set_process_actor`] named one.
pub fn process_actor() -> Option<&'static Actor> {
    PROCESS_ACTOR.get()
}

impl Actor {
    /// A request through the control socket by the process of `uid`.
    pub fn peer(command: String, uid: Option<u32>) -> Actor {
        Actor {
            command,
            user: uid.map_or_else(|| "unknown".to_string(), user_name),
            host: host_name(),
        }
    }

    /// The entry this actor's change at `seqno` makes.
    pub fn entry(&self, seqno: u64) -> HistoryEntry {
        HistoryEntry {
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            seqno,
            command: self.command.clone(),
            user: self.user.clone(),
            host: self.host.clone(),
        }
    }
}

/// The name of user `uid` (its number when it has none).
fn user_name(uid: u32) -> String {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: a zeroed passwd is a valid out-parameter for getpwuid_r.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, and the buffer's length
    // is the one passed.
    let r = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if r != 0 || found.is_null() || pwd.pw_name.is_null() {
        return uid.to_string();
    }
    // SAFETY: on success pw_name points to a NUL-terminated string in `buf`.
    unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) }
        .to_string_lossy()
        .into_owned()
}

/// This machine's host name.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The bytes the history may take in the config (its slot holds 1 MiB).
pub const HISTORY_BYTES: usize = 64 << 10;
/// A command line longer than this is cut (a long --disks list).
pub const COMMAND_CHARS: usize = 512;

/// Appends an entry, dropping the oldest past [`HISTORY_KEPT`] entries or
/// [`HISTORY_BYTES`] bytes of command lines, names and the rest.
pub fn record(history: &mut Vec<HistoryEntry>, mut entry: HistoryEntry) {
    if entry.command.chars().count() > COMMAND_CHARS {
        entry.command = entry
            .command
            .chars()
            .take(COMMAND_CHARS)
            .collect::<String>()
            + "...";
    }
    history.push(entry);
    let excess = history.len().saturating_sub(HISTORY_KEPT);
    history.drain(..excess);
    let size = |e: &HistoryEntry| e.command.len() + e.user.len() + e.host.len() + 80;
    let mut total: usize = history.iter().map(size).sum();
    while total > HISTORY_BYTES && history.len() > 1 {
        total -= size(&history.remove(0));
    }
}

/// The history as `history` prints it: one line per change, oldest first.
pub fn text(history: &[HistoryEntry]) -> String {
    if history.is_empty() {
        return "No configuration change recorded (builds before the history kept none).\n".into();
    }
    let mut out = String::new();
    for e in history {
        let when =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(e.time));
        out.push_str(&format!(
            "{when}  config {:<5} {}@{}  {}\n",
            e.seqno, e.user, e.host, e.command
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_keeps_the_newest_entries() {
        let mut h = Vec::new();
        let a = Actor::peer("mirrorvol fail /d/a".into(), Some(0));
        assert_eq!(a.user, "root");
        for seqno in 0..HISTORY_KEPT as u64 + 5 {
            record(&mut h, a.entry(seqno));
        }
        assert_eq!(h.len(), HISTORY_KEPT);
        assert_eq!(h[0].seqno, 5);
        let t = text(&h[..1]);
        assert!(
            t.contains("config 5") && t.contains("root@") && t.ends_with("mirrorvol fail /d/a\n"),
            "{t}"
        );
        assert_eq!(Actor::peer("x".into(), Some(4_000_000)).user, "4000000");
        // Long command lines are cut, and the bytes kept bounded.
        let long = Actor::peer("y".repeat(10_000), Some(0));
        for seqno in 0..500 {
            record(&mut h, long.entry(seqno));
        }
        assert!(h.iter().all(|e| e.command.len() <= COMMAND_CHARS + 3));
        let bytes: usize = h.iter().map(|e| e.command.len()).sum();
        assert!(bytes <= HISTORY_BYTES, "{bytes}");
    }
}
