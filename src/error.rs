//! The error kinds and their exit statuses.
//!
//! Every error carries one plain sentence that names the object it concerns.
//! The kind decides the exit status, in exactly one place ([`Error::exit_code`]):
//!
//! ```text
//!   Refused ──► 2   the request was malformed or not allowed; nothing changed
//!   Io      ──► 1   a disk operation failed (with path/offset context)
//!   Corrupt ──► 1   metadata is damaged beyond what the copies can heal
//!   Failed  ──► 1   the operation could not be completed for another reason
//!   Unhealthy ► 3   `status --test` or `-x`: a volume lacks redundancy or a
//!                   disk is out of service, but every volume serves its data
//!             ► 4   the same, and a volume serves no data (failed, split
//!                   brain, or waiting on its disks)
//! ```

use std::io;
use std::path::Path;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A refused or malformed request. Nothing on disk was changed.
    #[error("{0}")]
    Refused(String),
    /// An I/O error, with the object and operation it happened on.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Metadata that cannot be decoded from any of its copies.
    #[error("{0}")]
    Corrupt(String),
    /// Any other failure of an operation that was accepted.
    #[error("{0}")]
    Failed(String),
    /// What `status --test` found: the report was printed; this names what
    /// needs attention.
    #[error("{}: {}", if *.failed { "failed" } else { "degraded" }, .problems.join("; "))]
    Unhealthy { failed: bool, problems: Vec<String> },
}

impl Error {
    pub fn refused(msg: impl Into<String>) -> Self {
        Error::Refused(msg.into())
    }

    pub fn failed(msg: impl Into<String>) -> Self {
        Error::Failed(msg.into())
    }

    pub fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }

    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// An I/O error on a path, e.g. "cannot open /dev/sdb: Permission denied".
    pub fn io_path(op: &str, path: &Path, source: io::Error) -> Self {
        Error::io(format!("cannot {op} {}", path.display()), source)
    }

    /// The process exit status for this error (DESIGN.md §6).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Refused(_) => 2,
            Error::Io { .. } | Error::Corrupt(_) | Error::Failed(_) => 1,
            Error::Unhealthy { failed: false, .. } => 3,
            Error::Unhealthy { failed: true, .. } => 4,
        }
    }
}
