//! The control socket of `serve`: a Unix socket through which other
//! processes run operations on the group the daemon holds.
//!
//! One JSON request per connection, on one line; one JSON response line:
//!
//! ```text
//! {"op": "status"}                       → {"ok": true, "status": {...}, "text": "..."}
//! {"op": "history"}                      → {"ok": true, "report": [...], "text": "..."}
//! {"op": "iostat"}                       → {"ok": true, "report": {"time", "disks": [...], "volumes": [...]}}
//! {"op": "fail", "path": P, "force": B}  → {"ok": true, "message": "marked disk P failed"}
//! {"op": "reactivate", "path": P}        → {"ok": true, "message": "reactivated disk P; ..."}
//! {"op": "set-disk", "path": P, "write_mostly"?: B, "write_behind"?: N}
//! {"op": "create", "name", "size", "copies", "disks"}
//! {"op": "add-mirror", "name", "disk"?}  {"op": "remove-mirror", "name", "disk"}
//! {"op": "remove-disk", "path"}         {"op": "replace", "path", "new"?, "cancel"}
//! {"op": "break", "name", "disk", "new_name"?, "nokeep"}
//! {"op": "repair", "name", "disk"?}      {"op": "extend", "name", "size"}
//! {"op": "delete", "name", "force"}      {"op": "copy", "src", "dst"}
//! {"op": "init", "paths", "style", "controller"?, "group"?, "force", "spare"}
//!                                        → {"ok": true, "message": "...", "warnings": [...]}
//! {"op": "resync", "name", "action"?: "pause"|"resume"|"cancel", "rate"?}
//!                                        → {"ok": true, "message": "..."}
//! {"op": "scrub", "name", "repair", "rate"?}
//!                                        → {"ok": true, "report": {...}, "text": "..."}
//! anything refused or failed             → {"ok": false, "code": 2|1, "error": "sentence"}
//! ```
//!
//! `code` is the exit status the offline command would have had. Paths are
//! absolute: the daemon's working directory is not the caller's.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// An operation sent to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// `history`: the config's record of changes.
    History,
    /// `iostat`: the I/O counters of every disk and volume since `serve`
    /// opened them.
    Iostat,
    Fail {
        path: PathBuf,
        #[serde(default)]
        force: bool,
    },
    Reactivate {
        path: PathBuf,
    },
    /// `set-disk PATH [--write-mostly on|off] [--write-behind N]`.
    SetDisk {
        path: PathBuf,
        #[serde(flatten)]
        set: crate::group::live::DiskSettings,
    },
    Create {
        name: String,
        size: u64,
        copies: usize,
        #[serde(default)]
        disks: Vec<PathBuf>,
    },
    AddMirror {
        name: String,
        #[serde(default)]
        disk: Option<PathBuf>,
    },
    RemoveMirror {
        name: String,
        disk: PathBuf,
    },
    RemoveDisk {
        path: PathBuf,
    },
    /// `replace PATH NEW`, or `replace PATH --cancel`.
    Replace {
        path: PathBuf,
        #[serde(default)]
        new: Option<PathBuf>,
        #[serde(default)]
        cancel: bool,
    },
    Break {
        name: String,
        disk: PathBuf,
        #[serde(default)]
        new_name: Option<String>,
        #[serde(default)]
        nokeep: bool,
    },
    Repair {
        name: String,
        #[serde(default)]
        disk: Option<PathBuf>,
    },
    Extend {
        name: String,
        size: u64,
    },
    Delete {
        name: String,
        /// Disconnect the volume's NBD clients instead of refusing.
        #[serde(default)]
        force: bool,
    },
    /// Each side a path (absolute) or `vol:NAME`.
    Copy {
        src: String,
        dst: String,
        /// Bytes/s at most (`copy --rate`).
        #[serde(default)]
        rate: Option<u64>,
    },
    Scrub {
        name: String,
        #[serde(default)]
        repair: bool,
        #[serde(default)]
        rate: Option<u64>,
    },
    ResolveSplitBrain {
        keep: PathBuf,
    },
    /// `resync NAME`: `action` is `pause`, `resume` or `cancel`; `rate`
    /// (bytes/s, 0: serve's pacing again) may come with it or alone.
    Resync {
        name: String,
        #[serde(default)]
        action: Option<String>,
        #[serde(default)]
        rate: Option<u64>,
    },
    /// `init` of new disks into the group in service.
    Init {
        paths: Vec<PathBuf>,
        style: crate::format::Style,
        #[serde(default)]
        controller: Option<String>,
        #[serde(default)]
        group: Option<String>,
        #[serde(default)]
        force: bool,
        #[serde(default)]
        spare: bool,
    },
}

impl Request {
    /// The command line the request stands for, for the history; None for
    /// what changes no config (status, history, copy, scrub).
    pub fn command_line(&self) -> Option<String> {
        let p = |p: &Path| p.display().to_string();
        let opt = |flag: &str, v: &Option<String>| {
            v.as_ref()
                .map(|v| format!(" {flag} {v}"))
                .unwrap_or_default()
        };
        let optp = |flag: &str, v: &Option<PathBuf>| opt(flag, &v.as_deref().map(p));
        let on = |flag: &str, b: bool| if b { format!(" {flag}") } else { String::new() };
        let line = match self {
            Request::Status
            | Request::History
            | Request::Iostat
            | Request::Copy { .. }
            | Request::Scrub { .. } => {
                return None;
            }
            Request::Fail { path, force } => format!("fail {}{}", p(path), on("--force", *force)),
            Request::Reactivate { path } => format!("reactivate {}", p(path)),
            Request::SetDisk { path, set } => format!(
                "set-disk {}{}{}",
                p(path),
                opt(
                    "--write-mostly",
                    &set.write_mostly
                        .map(|on| if on { "on" } else { "off" }.to_string())
                ),
                opt("--write-behind", &set.write_behind.map(|n| n.to_string()))
            ),
            Request::Create {
                name,
                size,
                copies,
                disks,
            } => format!(
                "create {name} --size {size}{}{}",
                if *copies > 1 {
                    format!(" --mirror --copies {copies}")
                } else {
                    String::new()
                },
                disks
                    .iter()
                    .map(|d| format!(" --disk {}", p(d)))
                    .collect::<String>()
            ),
            Request::AddMirror { name, disk } => {
                format!("add-mirror {name}{}", optp("--disk", disk))
            }
            Request::RemoveMirror { name, disk } => {
                format!("remove-mirror {name} --disk {}", p(disk))
            }
            Request::RemoveDisk { path } => format!("remove-disk {}", p(path)),
            Request::Replace { path, new, cancel } => format!(
                "replace {}{}{}",
                p(path),
                new.as_deref()
                    .map(|n| format!(" {}", p(n)))
                    .unwrap_or_default(),
                on("--cancel", *cancel)
            ),
            Request::Break {
                name,
                disk,
                new_name,
                nokeep,
            } => format!(
                "break {name} --disk {}{}{}",
                p(disk),
                opt("--new-name", new_name),
                on("--nokeep", *nokeep)
            ),
            Request::Repair { name, disk } => format!("repair {name}{}", optp("--disk", disk)),
            Request::Extend { name, size } => format!("extend {name} --size {size}"),
            Request::Delete { name, force } => format!("delete {name}{}", on("--force", *force)),
            Request::ResolveSplitBrain { keep } => {
                format!("resolve-split-brain --keep {}", p(keep))
            }
            Request::Resync { name, action, rate } => format!(
                "resync {name}{}{}",
                action
                    .as_ref()
                    .map(|a| format!(" --{a}"))
                    .unwrap_or_default(),
                rate.map(|r| format!(" --rate {r}")).unwrap_or_default()
            ),
            Request::Init {
                paths,
                style,
                controller,
                group,
                force,
                spare,
            } => format!(
                "init {} --style {style}{}{}{}{}",
                paths.iter().map(|x| p(x)).collect::<Vec<_>>().join(" "),
                opt("--controller", controller),
                opt("--group", group),
                on("--force", *force),
                on("--spare", *spare)
            ),
        };
        Some(format!("mirrorvol {line}"))
    }

    /// How long the caller waits for the answer: operations answer at once
    /// (resyncs run in the background), but a config commit under a slow
    /// disk may take a while, and a scrub or copy runs to its end.
    pub fn timeout(&self) -> Option<Duration> {
        match self {
            Request::Scrub { .. } | Request::Copy { .. } => None,
            _ => Some(Duration::from_secs(120)),
        }
    }
}

/// The daemon's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// `status`: the report as `status --json` prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// `status`: the report as `status` prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// What an operation did, as the offline command prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Warnings the operation gave, one sentence each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// `scrub`: the report as `scrub --json` prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
    /// The exit status of an error: 2 refused, 1 failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn message(text: impl Into<String>) -> Response {
        Response {
            ok: true,
            message: Some(text.into()),
            ..Response::default()
        }
    }

    pub fn from_error(e: &Error) -> Response {
        Response {
            ok: false,
            code: Some(e.exit_code()),
            error: Some(e.to_string()),
            ..Response::default()
        }
    }

    /// The error an unsuccessful response carries, with its exit status.
    pub fn into_result(self) -> Result<Response> {
        if self.ok {
            return Ok(self);
        }
        let msg = self
            .error
            .unwrap_or_else(|| "the daemon refused the request".to_string());
        Err(match self.code {
            Some(2) => Error::refused(msg),
            _ => Error::failed(msg),
        })
    }
}

/// One line of JSON.
pub fn encode<T: Serialize>(value: &T) -> String {
    let mut s = serde_json::to_string(value).expect("control messages serialize");
    s.push('\n');
    s
}

pub fn decode_request(line: &str) -> Result<Request> {
    serde_json::from_str(line.trim())
        .map_err(|e| Error::refused(format!("malformed control request ({e})")))
}

pub fn decode_response(line: &str) -> Result<Response> {
    serde_json::from_str(line.trim())
        .map_err(|e| Error::failed(format!("malformed answer from the daemon ({e})")))
}

/// Sends one request; `Err` when nobody answers (a stale socket) or the
/// answer is cut short.
pub fn call(socket: &Path, request: &Request) -> io::Result<Response> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(request.timeout())?;
    stream.write_all(encode(request).as_bytes())?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection without answering",
        ));
    }
    decode_response(&line).map_err(io::Error::other)
}

/// Whether something accepts connections on `socket`.
pub fn answers(socket: &Path) -> bool {
    UnixStream::connect(socket).is_ok()
}

/// A control socket being served; dropping it stops the accepting thread
/// and removes the socket (and the files in `remove`).
pub struct ControlSocket {
    path: PathBuf,
    remove: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The listening socket, to wake its accepting thread by a shutdown
    /// when its path is gone (removed by hand, or by a cleaner of the run
    /// directory): a connection to the path can no longer reach it.
    waker: Option<UnixListener>,
    /// (device, inode) of the socket file it bound: a path that another
    /// serve has bound since (ours removed meanwhile) is left to it.
    bound: Option<(u64, u64)>,
}

/// Handles one request from a caller.
pub type Handler = Arc<dyn Fn(Request, &Caller) -> Response + Send + Sync>;

/// Who sent a request: the history records them with what they changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user id of the process on the other end (None: not known).
    pub uid: Option<u32>,
    /// How the request came: `control socket` or `web view`.
    pub via: &'static str,
    /// The connection the request came on, while it is answered (None for
    /// the web view): a long request stops when its client goes.
    peer: Option<std::os::fd::RawFd>,
}

impl Caller {
    /// The caller of the web view (who holds the token, if actions).
    pub fn web() -> Caller {
        Caller {
            uid: None,
            via: "web view",
            peer: None,
        }
    }
}

impl Caller {
    /// Whether the client hung up (killed, or ^C) while its request runs.
    pub fn gone(&self) -> bool {
        let Some(fd) = self.peer else {
            return false;
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the descriptor is the connection that
        // `answer` holds open while the handler (our caller) runs.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }
}

/// The user id of the process on the other end of `conn` (SO_PEERCRED).
fn peer_uid(conn: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed ucred is a valid out-parameter.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the descriptor is open for the call, and `cred` is valid for
    // the length passed.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

impl ControlSocket {
    /// Binds `path` (creating its directory 0700) and answers each
    /// connection on a thread of its own with `handler`. A socket file
    /// nobody answers on is left over from a daemon that died, and is
    /// replaced; one that answers is refused.
    pub fn bind(path: &Path, handler: Handler) -> Result<ControlSocket> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            std::fs::create_dir_all(dir).map_err(|e| Error::io_path("create", dir, e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io_path("set permissions of", dir, e))?;
        }
        if path.exists() {
            if answers(path) {
                return Err(Error::refused(format!(
                    "control socket {} is in use by another mirrorvol serve",
                    path.display()
                )));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener =
            UnixListener::bind(path).map_err(|e| Error::io_path("bind control socket", path, e))?;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        let waker = listener.try_clone().ok();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let handler = handler.clone();
                    let _ = std::thread::Builder::new()
                        .name("control-request".into())
                        .spawn(move || {
                            answer(conn, &*handler);
                            // An online copy's requests a hung disk still
                            // has are seen to end if it answers soon.
                            crate::volume::queue::drain_here(crate::volume::queue::LEFTOVER_WAIT);
                        });
                }
            })
            .map_err(|e| Error::io("cannot start the control socket thread", e))?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            remove: Vec::new(),
            stop,
            thread: Some(thread),
            waker,
            bound: file_id(path),
        })
    }

    /// Removes `file` too when the socket goes.
    pub fn remove_with(&mut self, file: PathBuf) {
        self.remove.push(file);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// (device, inode) of the file at `path`, if there is one.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Reads one request from a connection and writes the answer.
fn answer(conn: UnixStream, handler: &(dyn Fn(Request, &Caller) -> Response + Send + Sync)) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    if BufReader::new(&conn).read_line(&mut line).is_err() || line.trim().is_empty() {
        return;
    }
    let response = match decode_request(&line) {
        Ok(request) => handler(
            request,
            &Caller {
                uid: peer_uid(&conn),
                via: "control socket",
                peer: Some(std::os::fd::AsRawFd::as_raw_fd(&conn)),
            },
        ),
        Err(e) => Response::from_error(&e),
    };
    let _ = (&conn).write_all(encode(&response).as_bytes());
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread so that it sees the flag: a shutdown
        // of the listening socket ends its accept (EINVAL), and a connection
        // wakes it where that would not.
        if let Some(w) = &self.waker {
            // SAFETY: the descriptor is the listener's clone, open until
            // `self` is dropped; shutdown takes no pointer.
            unsafe {
                libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(w), libc::SHUT_RDWR);
            }
        }
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Its files go with it, unless another serve has bound the path
        // since (they are that one's now).
        match (file_id(&self.path), self.bound) {
            (Some(now), Some(bound)) if now != bound => return,
            _ => {}
        }
        let _ = std::fs::remove_file(&self.path);
        for f in &self.remove {
            let _ = std::fs::remove_file(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket whose path another serve has bound since (the first one's
    /// removed under it) leaves that path, and the files it would remove,
    /// to the other: before, it removed them as it stopped.
    #[test]
    fn a_control_socket_leaves_a_path_another_has_bound_since() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let pid = dir.path().join("c.pid");
        let handler: Handler = Arc::new(|_, _| Response::from_error(&Error::refused("no")));
        let mut first = ControlSocket::bind(&path, handler.clone()).unwrap();
        first.remove_with(pid.clone());
        std::fs::remove_file(&path).unwrap();
        let second = ControlSocket::bind(&path, handler).unwrap();
        std::fs::write(&pid, b"2").unwrap();
        drop(first);
        assert!(path.exists(), "the second socket's path stays");
        assert!(pid.exists(), "so do the files it goes with");
        assert!(UnixStream::connect(&path).is_ok());
        drop(second);
        assert!(!path.exists());
    }

    /// A control socket whose path was removed under it (a cleaner of the
    /// run directory) still lets serve stop: it hung in the join before.
    #[test]
    fn a_control_socket_whose_path_is_gone_still_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let handler: Handler = Arc::new(|_, _| Response::from_error(&Error::refused("no")));
        let socket = ControlSocket::bind(&path, handler).unwrap();
        std::fs::remove_file(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(socket);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the control socket stops without its path");
    }

    #[test]
    fn requests_decode_from_their_documented_lines() {
        assert_eq!(
            decode_request(r#"{"op": "status"}"#).unwrap(),
            Request::Status
        );
        assert_eq!(
            decode_request(r#"{"op": "fail", "path": "/d/a.img"}"#).unwrap(),
            Request::Fail {
                path: "/d/a.img".into(),
                force: false
            }
        );
        assert_eq!(
            decode_request(r#"{"op":"reactivate","path":"/d/a.img"}"#).unwrap(),
            Request::Reactivate {
                path: "/d/a.img".into()
            }
        );
        for r in [
            Request::Status,
            Request::Fail {
                path: "x".into(),
                force: true,
            },
        ] {
            let line = encode(&r);
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            assert_eq!(decode_request(&line).unwrap(), r);
        }
    }

    #[test]
    fn unknown_or_malformed_requests_are_refused() {
        for line in [
            r#"{"op": "create"}"#,
            "not json",
            r#"{"op": "fail"}"#,
            r#"{"op": "format"}"#,
        ] {
            let e = decode_request(line).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{line}: {e}");
        }
    }

    #[test]
    fn errors_keep_their_exit_status() {
        for e in [Error::refused("no"), Error::failed("broken")] {
            let line = encode(&Response::from_error(&e));
            let back = decode_response(&line).unwrap();
            assert!(!back.ok);
            let again = back.into_result().unwrap_err();
            assert_eq!(again.exit_code(), e.exit_code());
            assert_eq!(again.to_string(), e.to_string());
        }
        let ok = decode_response(&encode(&Response::message("done"))).unwrap();
        assert_eq!(ok.into_result().unwrap().message.as_deref(), Some("done"));
    }

    #[test]
    fn a_bound_socket_answers_and_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/ctl.sock");
        let handler: Handler = Arc::new(|r, _| match r {
            Request::Status => Response::message("status"),
            _ => Response::from_error(&Error::refused("not here")),
        });
        let sock = ControlSocket::bind(&path, handler.clone()).unwrap();
        let mode = std::fs::metadata(dir.path().join("run"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let r = call(&path, &Request::Status).unwrap();
        assert_eq!(r.message.as_deref(), Some("status"));
        let r = call(&path, &Request::Reactivate { path: "x".into() }).unwrap();
        assert_eq!(r.code, Some(2));
        // A second daemon on the same socket is refused.
        assert!(ControlSocket::bind(&path, handler).is_err());
        drop(sock);
        assert!(!path.exists());
    }
}
