//! The command line (DESIGN.md §6): argument parsing, text and JSON output,
//! progress bars. Every error leaves as one sentence on stderr with the exit
//! status of its kind.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::daemon::control;
use crate::format::Style;
use crate::group::holder;
use crate::group::ops::{self, Endpoint, InitOptions, human};
use crate::group::{DiskSet, Group, Lookup, Progress};
use crate::{Error, Result};

/// `print!` for a command's output on stdout, without its panic when the
/// reader went away: `mirrorvol examine disk.img | head -1` ends the
/// command there, quietly and with status 0 (as ripgrep does), since what
/// was asked of it is done; another write error is reported and ends it
/// with status 1.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

/// `println!` likewise (see [`out!`]).
macro_rules! outln {
    () => {
        $crate::cli::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub mod demo;
pub mod examine;
pub mod health;
pub mod iostat;
pub mod manpage;
pub mod test_mirrors;

#[derive(Debug, Parser)]
#[command(
    name = "mirrorvol",
    version,
    about = "Mirrored volumes (RAID-1) in user space",
    long_about = "Mirrored volumes (RAID-1) in user space: disks are image files or block devices, \
                  grouped and labelled by `init`; volumes are simple or mirrored across disks."
)]
pub struct Cli {
    /// The group's disks: paths, comma-separated; a directory stands for every
    /// file and block device directly inside it.
    #[arg(long, env = "MIRRORVOL_DISKS", value_delimiter = ',', global = true)]
    pub disks: Vec<PathBuf>,

    /// How long any request to a disk may take (data, labels, config,
    /// bitmaps) before the disk is failed and the group goes on without it:
    /// seconds, or a number with ms, s or m.
    #[arg(
        long,
        env = "MIRRORVOL_IO_TIMEOUT",
        global = true,
        value_name = "DURATION",
        default_value = "30s",
        value_parser = parse_duration
    )]
    pub io_timeout: std::time::Duration,

    /// The same for disks that are NBD exports (nbd:// URIs), shorter: a
    /// far disk that stops answering (a link cut, a server hung) is failed
    /// within this and the group goes on with the others (md's failfast);
    /// never longer than --io-timeout.
    #[arg(
        long,
        env = "MIRRORVOL_REMOTE_IO_TIMEOUT",
        global = true,
        value_name = "DURATION",
        default_value = "5s",
        value_parser = parse_duration
    )]
    pub remote_io_timeout: std::time::Duration,

    /// What runs the disks' reads, writes and flushes: io_uring (a ring
    /// per disk with one thread, and one per NBD connection; worker threads
    /// where the kernel refuses io_uring), or worker threads alone.
    #[arg(
        long,
        env = "MIRRORVOL_IO_ENGINE",
        global = true,
        value_name = "ENGINE",
        default_value = "uring"
    )]
    pub io_engine: crate::volume::queue::IoEngine,

    /// Claim the group for writing although fewer than a majority of its
    /// disks in service are here (the others are gone for good, not on the
    /// far side of a partition).
    #[arg(
        long,
        env = "MIRRORVOL_FORCE_CLAIM",
        global = true,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub force_claim: bool,

    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process; `serve`'s many options make its variant large,
// which costs nothing here.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Label disks for a new group, or add them to the group of --disks.
    Init {
        /// The disks to label: image files or block devices.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Partition style: gpt, mbr or raw.
        #[arg(long, default_value = "gpt")]
        style: Style,
        /// The controller (I/O path) the disks sit behind; detected when absent.
        #[arg(long)]
        controller: Option<String>,
        /// The name of a new group.
        #[arg(long)]
        group: Option<String>,
        /// Overwrite a partition table, filesystem or label already there.
        #[arg(long)]
        force: bool,
        /// Bytes of data one write-intent bitmap bit covers, for a new group
        /// (a power of two, at least 4K; default 1M).
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        region_size: Option<u64>,
        /// Add the disks to the group of --disks as hot spares: they hold no
        /// plex until `repair` rebuilds a failed or missing plex onto one.
        #[arg(long)]
        spare: bool,
        /// Rewrite the lost label of the group's member last recorded at
        /// each PATH (its disk UUID, style and layout, from the config the
        /// other disks hold), leaving its data untouched; `reactivate PATH`
        /// then puts it back in service.
        #[arg(long, conflicts_with_all = ["force", "spare", "group", "region_size", "controller"])]
        restore: bool,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
    },
    /// Create a simple or mirrored volume.
    Create {
        /// The new volume's name.
        name: String,
        /// Size in bytes, or with a K, M, G or T suffix (powers of 1024).
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        size: u64,
        /// Make a mirrored volume.
        #[arg(long)]
        mirror: bool,
        /// Number of copies of a mirror (default 2).
        #[arg(long, requires = "mirror")]
        copies: Option<usize>,
        /// Put a plex on this disk (repeat for each plex).
        #[arg(long = "disk", id = "disk")]
        disk: Vec<PathBuf>,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
    },
    /// Add a plex to a volume and copy the volume onto it.
    AddMirror {
        /// The volume to add a plex to.
        name: String,
        /// Put the new plex on this disk; default: a disk with room and no
        /// copy of the volume, behind a controller the others do not use
        /// where one has room.
        #[arg(long)]
        disk: Option<PathBuf>,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
        /// Bytes/s (K/M/G suffixes) the copies it makes run at most; offline
        /// only they run in the foreground, unthrottled by default (under
        /// serve: as `resync NAME --rate`).
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        rate: Option<u64>,
    },
    /// Remove the plex on a disk from a mirror and free its space.
    RemoveMirror {
        /// The mirrored volume.
        name: String,
        /// The disk whose plex goes.
        #[arg(long)]
        disk: PathBuf,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
    },
    /// Replace a disk by another of the group in one step (zpool replace,
    /// mdadm --replace): its copies are rebuilt on NEW (under serve in the
    /// background), and it leaves the group once they are all in sync.
    Replace {
        /// The disk to replace (in service, failed or missing).
        path: PathBuf,
        /// The disk to rebuild its copies on: a disk of the group in service
        /// (label a new one with `init` first, or `init --spare`).
        #[arg(required_unless_present = "cancel")]
        new: Option<PathBuf>,
        /// Stop replacing PATH: it stays; the copies made on NEW stay too.
        #[arg(long, conflicts_with = "new")]
        cancel: bool,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
        /// Bytes/s (K/M/G suffixes) the copies it makes run at most; offline
        /// only they run in the foreground, unthrottled by default (under
        /// serve: as `resync NAME --rate`).
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        rate: Option<u64>,
    },
    /// Take a disk out of the group: one that holds no plex, or a failed or
    /// missing one whose plexes all have an in-sync copy elsewhere (they
    /// leave their volumes). Its label is wiped when it is here, and the
    /// group will not take it in again (mdadm --remove, vgreduce
    /// --removemissing, zpool detach).
    RemoveDisk {
        /// The disk to remove: a path it has (or had, when it is missing).
        path: PathBuf,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
    },
    /// Split the plex on a disk off into a simple volume of its own.
    Break {
        /// The mirrored volume.
        name: String,
        /// The disk whose plex is split off.
        #[arg(long)]
        disk: PathBuf,
        /// Name of the split-off volume (default NAME-broken).
        #[arg(long)]
        new_name: Option<String>,
        /// Free the split-off plex instead of keeping it as a volume.
        #[arg(long)]
        nokeep: bool,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
    },
    /// Replace failed or missing plexes with new space; resync stale ones.
    Repair {
        /// The volume to repair.
        name: String,
        /// Rebuild onto this disk; default: a hot spare, else a disk with
        /// room and no copy of the volume.
        #[arg(long)]
        disk: Option<PathBuf>,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
        /// Bytes/s (K/M/G suffixes) the copies it makes run at most; offline
        /// only they run in the foreground, unthrottled by default (under
        /// serve: as `resync NAME --rate`).
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        rate: Option<u64>,
    },
    /// Bring a returned or failed disk back; its stale plexes resync.
    Reactivate {
        /// The disk to bring back.
        path: PathBuf,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
        /// Bytes/s (K/M/G suffixes) the copies it makes run at most; offline
        /// only they run in the foreground, unthrottled by default (under
        /// serve: as `resync NAME --rate`).
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        rate: Option<u64>,
    },
    /// Resolve a split brain: keep the side of the disk at --keep (its
    /// config becomes the group's); the other side's plexes are resynced
    /// from it, incrementally where the write-intent bitmaps allow.
    ResolveSplitBrain {
        /// A disk of the side to keep.
        #[arg(long)]
        keep: PathBuf,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
        /// Bytes/s (K/M/G suffixes) the copies it makes run at most; offline
        /// only they run in the foreground, unthrottled by default (under
        /// serve: as `resync NAME --rate`).
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        rate: Option<u64>,
    },
    /// Pause, resume or cancel the resync of a volume, or set its rate,
    /// while serve runs (md's sync_action and sync_speed_max). A cancelled
    /// copy stays out of sync and is never read; --resume resyncs it,
    /// remove-mirror frees it.
    Resync {
        /// The volume whose resync to control.
        name: String,
        /// Stop the resync at its next checkpoint; none starts on the volume
        /// until --resume (or until serve starts again).
        #[arg(long, conflicts_with_all = ["resume", "cancel"])]
        pause: bool,
        /// Go on with a paused or cancelled resync, from its checkpoint.
        #[arg(long, conflicts_with = "cancel")]
        resume: bool,
        /// Stop the resync and record that its copies stay out of sync (a
        /// restart of serve does not resume it; --resume does).
        #[arg(long)]
        cancel: bool,
        /// Bytes/s (K/M/G suffixes) the volume's resyncs run at, whether or
        /// not clients are busy; 0: serve's --resync-min-rate and
        /// --resync-max-rate again.
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        rate: Option<u64>,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
    },
    /// Grow a simple volume into the free space that follows it.
    Extend {
        /// The simple volume to grow.
        name: String,
        /// The volume's new total size (not the amount to add), in bytes or
        /// with a K, M, G or T suffix.
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        size: u64,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume and free its space.
    Delete {
        /// The volume to delete.
        name: String,
        /// Under serve: disconnect the volume's NBD clients instead of
        /// refusing.
        #[arg(long)]
        force: bool,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
    },
    /// Change a disk's settings. --write-mostly on keeps reads off its
    /// plexes while another in-sync plex can serve them (md's write-mostly,
    /// for a slow or far disk: an NBD export on another machine); writes
    /// still go to every plex. Kept in the config; under serve it applies
    /// at once
    SetDisk {
        /// The disk (a path or an NBD URI of the group).
        path: PathBuf,
        /// on: its plexes serve reads only when no other in-sync plex can.
        #[arg(long, value_parser = ["on", "off"])]
        write_mostly: Option<String>,
        /// Write-behind on a write-mostly disk (md's): a write is answered
        /// once the other plexes have it, and up to N writes (64 MiB at
        /// most) to this disk may still be on their way; their regions stay
        /// dirty in the bitmaps until they land. 0: off.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=16383))]
        write_behind: Option<u32>,
        /// This disk's deadline: how long a request to it may take before
        /// the disk is failed, in place of --io-timeout (and, for an NBD
        /// export, --remote-io-timeout): seconds, or a number with ms, s or
        /// m. 0: back to those.
        #[arg(long, value_name = "DURATION", value_parser = parse_deadline)]
        timeout: Option<std::time::Duration>,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
    },
    /// Mark a disk failed (maintenance, tests).
    Fail {
        /// The disk to mark failed.
        path: PathBuf,
        /// Fail it even if it holds a volume's last in-sync plex.
        #[arg(long)]
        force: bool,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
    },
    /// Copy between a file or device and a volume (vol:NAME).
    Copy {
        /// What to read: a file or device, or vol:NAME for a volume.
        src: String,
        /// Where to write: a file (created when absent) or device, or
        /// vol:NAME for a volume.
        dst: String,
        /// Bytes/s (K/M/G suffixes) the copy runs at most, so that it
        /// leaves the disks to the volumes' clients; unthrottled by default.
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        rate: Option<u64>,
        /// Print what the command did as one JSON object on stdout:
        /// {"ok", "command", "messages", "warnings", "status"} (status:
        /// as `status --json` after the change); a refusal or failure is
        /// {"ok": false, "code", "error"}.
        #[arg(long)]
        json: bool,
    },
    /// Show the group, its disks and volumes.
    Status {
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
        /// After the report, name what needs attention on stderr and exit
        /// with status 3 when the group is degraded (a volume without full
        /// redundancy, a disk out of service or with errors) or 4 when a
        /// volume serves no data (as `mdadm --detail --test`).
        #[arg(long)]
        test: bool,
        /// Show only what is unhealthy, a line each with the command that
        /// deals with it, or "all volumes healthy" (as `zpool status -x`);
        /// exit statuses as --test.
        #[arg(short = 'x', long = "problems")]
        problems: bool,
    },
    /// Show the I/O of every disk and volume under serve (iostat): the
    /// totals since serve opened the disks, then, with --interval, the rates
    /// over each interval
    Iostat {
        /// Seconds between reports (0.1 to 86400); without it, one report.
        #[arg(long, value_name = "S")]
        interval: Option<f64>,
        /// Reports to print, the first included (default: until interrupted).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Print each report as one line of JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the configuration changes recorded in the group's config: when,
    /// which config, who (user@host) and the command (zpool history)
    History {
        /// Print JSON: an array of {time, seqno, command, user, host}.
        #[arg(long)]
        json: bool,
    },
    /// Show the label and config on one disk.
    Examine {
        /// The disk to read.
        path: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compare the plexes of a mirror and report where they differ; with
    /// --repair, make them equal (per sector the majority wins, ties and
    /// two-way mirrors going to the first in-sync plex).
    Scrub {
        /// The mirrored volume to compare.
        name: String,
        /// Write the winning copy over the differing ones.
        #[arg(long)]
        repair: bool,
        /// Compare at most this many bytes per second (K, M, G suffixes);
        /// default: as fast as the disks go.
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        rate: Option<u64>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Export each in-sync plex of a mirror alone, read-only, over NBD on a
    /// temporary Unix socket, and check that it holds the whole volume:
    /// compared with the other plexes, or by running --exec against it.
    TestMirrors {
        /// The mirrored volume whose plexes are tested.
        name: String,
        /// A shell command run once per plex; {uri} stands for the plex's
        /// NBD URI (also in $MIRRORVOL_URI). The plex passes when it exits 0.
        #[arg(long)]
        exec: Option<String>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Export every volume of the group over NBD (export name = volume name)
    /// until SIGINT or SIGTERM.
    Serve {
        /// unix:PATH, HOST:PORT or PORT (loopback); repeat for several
        /// listeners. Default 127.0.0.1:10809.
        #[arg(long)]
        listen: Vec<String>,
        /// none: O_DIRECT, bypassing the page cache (as qemu's --cache=none);
        /// writeback: through the page cache, made durable on flush.
        #[arg(long, default_value = "none", value_parser = ["none", "writeback"])]
        cache: String,
        /// Requests each disk serves at once (worker threads per disk).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
        disk_threads: u16,
        /// Background resyncs keep up this rate (bytes/s, K/M/G suffixes)
        /// even while clients do I/O (md's speed_limit_min). Default 1M.
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true, default_value = "1M")]
        resync_min_rate: u64,
        /// Background resyncs never exceed this rate; 0: unlimited, the
        /// default (md's speed_limit_max).
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true, default_value = "0")]
        resync_max_rate: u64,
        /// Scrub every mirror in the background every this many seconds
        /// (compare only; mismatches are logged). 0, the default: never.
        #[arg(long, default_value_t = 0)]
        scrub_interval: u64,
        /// Bytes per second a background scrub compares at most.
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true, default_value = "32M")]
        scrub_rate: u64,
        /// The control socket other mirrorvol commands reach the daemon
        /// through. Default: $MIRRORVOL_RUN_DIR/GROUP-UUID.sock, the run
        /// directory defaulting to /run/mirrorvol.
        #[arg(long)]
        control: Option<PathBuf>,
        /// Run CMD (with sh -c) for every event: disk-failed, disk-returned,
        /// volume-degraded, volume-healthy, resync-started, resync-progress,
        /// resync-finished, scrub-mismatch, split-brain. The fields are in
        /// MIRRORVOL_* environment variables and in one JSON line on stdin.
        #[arg(long, value_name = "CMD")]
        on_event: Option<String>,
        /// Seconds one run of the --on-event command may take before it is
        /// killed.
        #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        on_event_timeout: u64,
        /// Serve Prometheus metrics over HTTP at http://HOST:PORT/metrics
        /// (port 0: any free port, printed at start). Default: none.
        #[arg(long, value_name = "HOST:PORT")]
        metrics: Option<String>,
        /// Serve a web view of the group at http://HOST:PORT/ (PORT alone:
        /// on the loopback; port 0: any free port, printed at start): the
        /// disks with their volumes drawn across them, the volumes, the
        /// resyncs and scrubs under way, the events. Read-only unless
        /// --http-actions. Default: none.
        #[arg(long, value_name = "HOST:PORT")]
        http: Option<String>,
        /// Let the web view act on the group (break, add mirror, remove
        /// mirror, repair, reactivate, fail, scrub), each confirmed first,
        /// with a token written to --http-token-file (mode 0600): open the
        /// page at /?token=TOKEN.
        #[arg(long, requires = "http")]
        http_actions: bool,
        /// Where --http-actions writes its token; default:
        /// RUN-DIR/GROUP-UUID.http-token (RUN-DIR: $MIRRORVOL_RUN_DIR or
        /// /run/mirrorvol). Removed when serve stops.
        #[arg(long, value_name = "PATH", requires = "http_actions")]
        http_token_file: Option<PathBuf>,
        /// Also accept requests for this host (HOST or HOST:PORT, as a
        /// browser sends it): the name of a reverse proxy in front of the
        /// web view. Repeatable.
        #[arg(long, value_name = "HOST", requires = "http")]
        http_allow: Vec<String>,
        /// auto: a plex that fails is rebuilt onto a hot spare of the group
        /// at once (init --spare), as md does; off: spares wait for `repair`.
        #[arg(long, default_value = "auto", value_parser = ["auto", "off"])]
        hot_spares: String,
        /// auto: a disk that is an NBD export and lost its connection is
        /// reconnected with backoff and, once it shows it is the disk that
        /// left, reactivated (its plexes resync from the bitmaps); manual:
        /// it is reconnected and waits for `reactivate`.
        #[arg(long, default_value = "auto", value_parser = ["auto", "manual"])]
        remote_return: String,
        /// A remote disk that lost its connection (or was not reached at
        /// start) keeps its plexes this long while it is reconnected before
        /// a hot spare takes them over (after one more attempt when it
        /// ends); 0: at once. One that answers but is refused (not the
        /// disk that left) is replaced at once.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        remote_spare_delay: u64,
        /// NBD connections open at once; one more is closed when accepted.
        #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
        max_connections: u32,
        /// A client must finish the NBD handshake within this.
        #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        handshake_timeout: u64,
        /// A client that reads none of its replies for this long is
        /// disconnected.
        #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        client_timeout: u64,
        /// Request and reply data in flight over all clients (each client
        /// also at most 128M); past it, requests wait unread.
        #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true, default_value = "1G")]
        max_in_flight: u64,
        /// Offer NBD clients TLS (NBD_OPT_STARTTLS) with the X.509 files in
        /// DIR, named as qemu-nbd names them: ca-cert.pem, server-cert.pem,
        /// server-key.pem.
        #[arg(long, value_name = "DIR")]
        tls_certs: Option<PathBuf>,
        /// require (the default with --tls-certs): clients must start TLS
        /// before anything else; allow: clients choose; off: no TLS.
        #[arg(long, value_parser = ["require", "allow", "off"])]
        tls: Option<String>,
        /// yes: a TLS client must show a certificate signed by
        /// ca-cert.pem (as qemu-nbd's verify-peer); no: any client.
        #[arg(long, default_value = "yes", value_parser = ["yes", "no"])]
        tls_verify_peer: String,
        /// Listen on addresses beyond loopback without requiring TLS:
        /// anyone who reaches them can read and write every volume.
        #[arg(long)]
        insecure_listen: bool,
    },
    /// A self-contained tour on image files in a temporary directory.
    Demo {
        /// Work in this directory instead of a new temporary one (kept).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print a shell completion script (for example:
    /// `mirrorvol completions bash > /etc/bash_completion.d/mirrorvol`).
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page mirrorvol(8), in roff, with a section per
    /// command (`mirrorvol manpage > mirrorvol.8; man ./mirrorvol.8`).
    Manpage,
}

/// Parses a size: bytes, or a number with a K, M, G or T suffix (powers of
/// 1024; "KiB" and "k" are accepted too).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!(
            "size {s:?} is negative: a size is a number of bytes with an optional K, M, G or T suffix"
        ));
    }
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?} is not a number with an optional K, M, G or T suffix"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => {
            return Err(format!(
                "size {s:?} has an unknown suffix: use K, M, G or T"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses a duration: seconds (`30`, `2.5`), or a number with `ms`, `s` or
/// `m`; it must be more than zero.
/// `set-disk --timeout`: a duration, or 0 for the group's.
fn parse_deadline(s: &str) -> std::result::Result<std::time::Duration, String> {
    if s.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    parse_duration(s)
}

pub fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("duration {s:?} is not a number with an optional ms, s or m"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        other => {
            return Err(format!(
                "duration {s:?} has an unknown unit {other:?}: use ms, s or m"
            ));
        }
    };
    if !(secs > 0.0 && secs < 1e9) {
        return Err(format!(
            "duration {s:?} must be more than zero (and under 30 years)"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// A progress bar on stderr when it is a terminal, nothing otherwise.
struct Bar(Mutex<Option<ProgressBar>>);

impl Bar {
    fn new() -> Bar {
        Bar(Mutex::new(None))
    }
}

impl Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        crate::group::claim::activity::begin(what, total);
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template is valid")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar);
    }

    fn set(&self, done: u64) {
        crate::group::claim::activity::advance(done);
        if let Some(bar) = &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            bar.set_position(done);
        }
    }

    fn finish(&self) {
        crate::group::claim::activity::end();
        if let Some(bar) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar.finish_and_clear();
        }
    }
}

/// The entry point of the binary: parses the process arguments, runs, and
/// returns the exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    // Every command logs to stderr what MIRRORVOL_LOG asks for (serve too).
    crate::daemon::start_log();
    // The config's history records this command line with its first change
    // (serve's own changes are no command: its requests are recorded one
    // by one).
    if !matches!(cli.command, Command::Serve { .. }) {
        record_command_line();
    }
    run(cli)
}

/// Names this process's command line as who changes the config.
fn record_command_line() {
    let line: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| {
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a
            }
        })
        .collect();
    crate::group::history::set_process_actor(format!("mirrorvol {}", line.join(" ")));
}

/// Writes to stdout for [`out!`] and [`outln!`].
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Some(g) = GATHER.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        use std::fmt::Write as _;
        let _ = g.text.write_fmt(args);
        return;
    }
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_fmt(args).and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

/// Runs one parsed command, reporting errors on stderr.
pub fn run(cli: Cli) -> i32 {
    let result = if json_asked(&cli.command) {
        execute_json(cli)
    } else {
        execute(cli)
    };
    match result {
        Ok(()) => 0,
        // The report was printed; this is its verdict, not a failure.
        Err(e @ Error::Unhealthy { .. }) => {
            eprintln!("{e}");
            e.exit_code()
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// Whether a command that changes things was asked for `--json`.
fn json_asked(command: &Command) -> bool {
    match command {
        Command::Init { json, .. }
        | Command::Create { json, .. }
        | Command::AddMirror { json, .. }
        | Command::RemoveMirror { json, .. }
        | Command::Replace { json, .. }
        | Command::RemoveDisk { json, .. }
        | Command::Break { json, .. }
        | Command::Repair { json, .. }
        | Command::Reactivate { json, .. }
        | Command::ResolveSplitBrain { json, .. }
        | Command::Resync { json, .. }
        | Command::Extend { json, .. }
        | Command::Delete { json, .. }
        | Command::Fail { json, .. }
        | Command::SetDisk { json, .. }
        | Command::Copy { json, .. } => *json,
        _ => false,
    }
}

/// What a command prints while its output is gathered for `--json`: its
/// lines and its warnings.
#[derive(Default)]
struct Gathered {
    text: String,
    warnings: Vec<String>,
}

/// Some while a command's output is gathered for `--json`.
static GATHER: std::sync::Mutex<Option<Gathered>> = std::sync::Mutex::new(None);

/// Runs `f` with its output gathered; returns what it printed.
fn gathered<T>(f: impl FnOnce() -> T) -> (T, Gathered) {
    *GATHER.lock().unwrap_or_else(|e| e.into_inner()) = Some(Gathered::default());
    let r = f();
    let g = GATHER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    (r, g)
}

/// A command that changes things, with `--json`: what it printed becomes
/// `messages` and `warnings`, and `status` is the group's after it.
fn execute_json(cli: Cli) -> Result<()> {
    let name = command_name(&cli.command);
    // `init` of a new group names its disks itself.
    let disks = match (&cli.command, cli.disks.is_empty()) {
        (Command::Init { paths, .. }, true) => paths.clone(),
        _ => cli.disks.clone(),
    };
    let status_cli = Cli {
        disks,
        io_timeout: cli.io_timeout,
        remote_io_timeout: cli.remote_io_timeout,
        io_engine: cli.io_engine,
        force_claim: false,
        command: Command::Status {
            json: true,
            test: false,
            problems: false,
        },
    };
    let (result, said) = gathered(|| execute(cli));
    let object = match &result {
        Ok(()) => {
            let (status, shown) = gathered(|| execute(status_cli));
            let status = status
                .ok()
                .and_then(|()| serde_json::from_str::<serde_json::Value>(&shown.text).ok())
                .unwrap_or(serde_json::Value::Null);
            serde_json::json!({
                "ok": true,
                "command": name,
                "messages": said.text.lines().collect::<Vec<_>>(),
                "warnings": said.warnings,
                "status": status,
            })
        }
        Err(e) => serde_json::json!({
            "ok": false,
            "command": name,
            "code": e.exit_code(),
            "error": e.to_string(),
            "warnings": said.warnings,
        }),
    };
    outln!(
        "{}",
        serde_json::to_string_pretty(&object).expect("a report serializes")
    );
    result
}

fn warn(lines: &[String]) {
    if let Some(g) = GATHER.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        g.warnings.extend(lines.iter().cloned());
        return;
    }
    for w in lines {
        eprintln!("warning: {w}");
    }
}

/// The group's disks as the command line gives them: `--disks` and how
/// long a disk may take to answer.
pub struct Disks {
    pub paths: Vec<PathBuf>,
    pub timeout: std::time::Duration,
    /// The deadline of disks that are NBD exports.
    pub remote_timeout: std::time::Duration,
    pub engine: crate::volume::queue::IoEngine,
    /// How a command that writes claims the group.
    pub claim: crate::group::claim::ClaimOptions,
    /// The expansion, made once: a path that does not answer costs the
    /// deadline once per command.
    set: std::sync::OnceLock<DiskSet>,
    /// Paths that did not answer since, when asked which group they hold.
    hung: std::sync::Mutex<Vec<PathBuf>>,
}

impl Disks {
    fn new(
        paths: Vec<PathBuf>,
        (timeout, remote_timeout): (std::time::Duration, std::time::Duration),
        engine: crate::volume::queue::IoEngine,
        claim: crate::group::claim::ClaimOptions,
    ) -> Disks {
        Disks {
            paths,
            timeout,
            remote_timeout,
            engine,
            claim,
            set: std::sync::OnceLock::new(),
            hung: Default::default(),
        }
    }

    /// Records that `path` did not answer: it is not asked again.
    fn hung(&self, path: &std::path::Path) {
        self.hung
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.to_path_buf());
    }

    /// The disks to look at, opened with the deadline.
    fn set(&self) -> Result<DiskSet> {
        let mut set = self.expanded()?;
        set.hung.extend(
            self.hung
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        Ok(set)
    }

    fn expanded(&self) -> Result<DiskSet> {
        if let Some(set) = self.set.get() {
            return Ok(set.clone());
        }
        let set = DiskSet::expand(
            &self.paths,
            crate::group::DiskOpen {
                timeout: self.timeout,
                remote_timeout: self.remote_timeout,
                engine: self.engine,
                devices_direct: true,
                ..Default::default()
            },
        )?;
        Ok(self.set.get_or_init(|| set).clone())
    }

    /// The set opened to look only: read-only, without the lock, so that a
    /// command holding the disks does not keep `status` out.
    fn shared_set(&self) -> Result<DiskSet> {
        let mut set = self.set()?;
        set.open.shared = true;
        Ok(set)
    }
}

/// Assembles the group of `--disks`, or refuses when none was given.
fn assemble(disks: &Disks) -> Result<Group> {
    if disks.paths.is_empty() {
        return Err(Error::refused(
            "no disks given: name the group's disks with --disks or MIRRORVOL_DISKS",
        ));
    }
    let set = disks.set()?;
    let mut group = Group::assemble(&set, Lookup::Required)?.expect("required");
    flush_warnings(&mut group);
    Ok(group)
}

/// Assembles the group of `--disks` to look at it only (see
/// [`Disks::shared_set`]).
fn assemble_shared(disks: &Disks) -> Result<Group> {
    if disks.paths.is_empty() {
        return assemble(disks);
    }
    let mut group = Group::assemble(&disks.shared_set()?, Lookup::Required)?.expect("required");
    flush_warnings(&mut group);
    Ok(group)
}

/// Prints the warnings an operation added to the group.
fn flush_warnings(group: &mut Group) {
    warn(&group.warnings.split_off(0));
}

/// The name of a command as typed.
fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Init { .. } => "init",
        Command::Create { .. } => "create",
        Command::AddMirror { .. } => "add-mirror",
        Command::RemoveMirror { .. } => "remove-mirror",
        Command::Break { .. } => "break",
        Command::Repair { .. } => "repair",
        Command::Reactivate { .. } => "reactivate",
        Command::ResolveSplitBrain { .. } => "resolve-split-brain",
        Command::RemoveDisk { .. } => "remove-disk",
        Command::History { .. } => "history",
        Command::Iostat { .. } => "iostat",
        Command::Replace { .. } => "replace",
        Command::Resync { .. } => "resync",
        Command::Extend { .. } => "extend",
        Command::Delete { .. } => "delete",
        Command::Fail { .. } => "fail",
        Command::SetDisk { .. } => "set-disk",
        Command::Copy { .. } => "copy",
        Command::Status { .. } => "status",
        Command::Examine { .. } => "examine",
        Command::Scrub { .. } => "scrub",
        Command::TestMirrors { .. } => "test-mirrors",
        Command::Serve { .. } => "serve",
        Command::Demo { .. } => "demo",
        Command::Completions { .. } => "completions",
        Command::Manpage => "manpage",
    }
}

/// The running daemon that holds the group of `--disks`, if one answers on
/// its control socket. The group is read from the first labelled disk,
/// without its lock; a socket nobody answers on is ignored (the command
/// then runs here, and meets the disks' locks if something holds them).
fn find_daemon(disks: &Disks) -> Option<holder::Holder> {
    // No daemon recorded at all: no disk is read to learn the group.
    if !holder::any_recorded() {
        return None;
    }
    let set = disks.set().ok()?;
    // A disk that does not answer is passed over: the next one names the
    // group as well.
    // Local disks first: an NBD server that takes one client (qemu-nbd's
    // default) and is held by serve would make the look wait its deadline.
    let mut paths: Vec<&PathBuf> = set
        .explicit
        .iter()
        .chain(set.scanned.iter())
        .filter(|p| !set.hung.contains(p))
        .collect();
    paths.sort_by_key(|p| crate::group::is_nbd(p));
    // One at a time, until one answers: the others are left alone (a disk
    // `serve` is reading may hold its pages locked). One that does not
    // answer in time is not opened again by this command: a read left
    // hanging on it (a FUSE file whose server stopped) would make that
    // open wait in the kernel for good, and cost the deadline again.
    let group = paths.into_iter().find_map(|p| {
        let path = p.clone();
        match crate::group::within(disks.timeout, move || holder::group_of(&path)) {
            None => {
                disks.hung(p);
                None
            }
            Some(found) => found,
        }
    })?;
    let h = holder::recorded(group)?;
    if h.pid.is_some_and(|pid| !holder::alive(pid)) {
        return None;
    }
    control::answers(&h.socket).then_some(h)
}

/// Sends one request to the daemon; its refusals keep their exit status.
fn ask(h: &holder::Holder, request: &control::Request) -> Result<control::Response> {
    control::call(&h.socket, request)
        .map_err(|e| Error::failed(format!("{} did not answer ({e})", h.describe())))?
        .into_result()
}

/// A path as the daemon must see it: absolute (its working directory is
/// not ours).
fn absolute(p: PathBuf) -> PathBuf {
    if crate::group::is_nbd(&p) {
        return p;
    }
    std::path::absolute(&p).unwrap_or(p)
}

/// A side of `copy` as the daemon must see it.
fn absolute_endpoint(s: String) -> String {
    if s.starts_with("vol:") {
        s
    } else {
        absolute(PathBuf::from(&s)).display().to_string()
    }
}

/// Runs an operation offline the way `serve` runs it: the group's
/// controller, started with no listeners, runs it to completion (one
/// implementation of the operation for both), and stops with the command.
fn through_controller<T>(
    disks: &Disks,
    op: impl FnOnce(&crate::group::live::LiveGroup) -> Result<T>,
) -> Result<T> {
    let g = assemble_claimed(disks, true)?;
    through_group(g, op)
}

/// Assembles and claims the group of a command that writes (see
/// [`crate::group::claim`]); a split group is refused first when `split`.
fn assemble_claimed(disks: &Disks, split: bool) -> Result<Group> {
    let mut g = crate::group::claim::claim_assembled(
        || {
            let g = assemble(disks)?;
            if split {
                g.refuse_split()?;
            }
            Ok(g)
        },
        &disks.claim,
    )?;
    flush_warnings(&mut g);
    Ok(g)
}

/// Runs `op` on the controller of a group already assembled (and its
/// bitmaps started, when it writes).
fn through_group<T>(
    mut g: Group,
    op: impl FnOnce(&crate::group::live::LiveGroup) -> Result<T>,
) -> Result<T> {
    g.start_bitmaps()?;
    flush_warnings(&mut g);
    let live = crate::group::live::LiveGroup::start(g, Default::default());
    op(&live)
}

/// Prints the resyncs an offline command ran, one line each.
fn print_resyncs(resynced: &[crate::group::live::Resynced]) {
    for r in resynced {
        outln!("{}", r.line);
    }
}

/// Prints what an operation run through the controller did.
fn print_offline(done: crate::group::live::Done) {
    outln!("{}", done.message);
    warn(&done.warnings);
}

/// Prints what the daemon did: its message on stdout, its warnings on
/// stderr.
fn print_done(r: control::Response) {
    if let Some(m) = r.message {
        outln!("{m}");
    }
    warn(&r.warnings);
}

/// Prints a report the daemon made: as JSON, or as text.
/// Prints a `status` report (as JSON or as text, or with `-x` only its
/// problems) and, with `--test` or `-x`, its verdict as the exit status.
fn show_status(
    report: serde_json::Value,
    text: String,
    json: bool,
    test: bool,
    only: bool,
) -> Result<()> {
    let found = health::problems(&report);
    if only {
        out!("{}", health::only_problems(&found, json));
    } else {
        print_report(json, Some(report), Some(text));
    }
    match test || only {
        true => health::verdict(&found),
        false => Ok(()),
    }
}

fn print_report(json: bool, value: Option<serde_json::Value>, text: Option<String>) {
    if json {
        let value = value.unwrap_or_default();
        outln!(
            "{}",
            serde_json::to_string_pretty(&value).expect("a report serializes")
        );
    } else {
        out!("{}", text.unwrap_or_default());
    }
}

/// Runs a command through the daemon holding the group: it prints what the
/// offline command prints, except that resyncs run in the background.
fn execute_online(h: &holder::Holder, command: Command) -> Result<()> {
    use control::Request;
    // --rate: the daemon paces the resyncs of the volumes concerned (as
    // `resync NAME --rate`), once the command has started them (a refused
    // command leaves no rate behind).
    let paced: Option<(Vec<String>, u64)> = match &command {
        Command::AddMirror {
            name,
            rate: Some(r),
            ..
        }
        | Command::Repair {
            name,
            rate: Some(r),
            ..
        } => Some((vec![name.clone()], *r)),
        Command::Reactivate {
            path,
            rate: Some(r),
            ..
        }
        | Command::Replace {
            path,
            rate: Some(r),
            ..
        } => {
            let status = ask(h, &Request::Status)?.status.unwrap_or_default();
            let disk = absolute(path.clone()).display().to_string();
            let names = status["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| {
                    v["plexes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|p| p["disk"] == disk.as_str())
                })
                .filter_map(|v| v["name"].as_str().map(str::to_string))
                .collect();
            Some((names, *r))
        }
        _ => None,
    };

    let request = match command {
        Command::Iostat {
            interval,
            count,
            json,
        } => {
            iostat::check(interval, count)?;
            let sample = || -> Result<serde_json::Value> {
                ask(h, &Request::Iostat)?
                    .report
                    .ok_or_else(|| Error::failed("the daemon sent no counters"))
            };
            let mut earlier: Option<serde_json::Value> = None;
            let mut printed = 0u64;
            loop {
                let now = sample()?;
                let r = iostat::report(&now, earlier.as_ref());
                if json {
                    outln!("{r}");
                } else {
                    if printed > 0 {
                        outln!();
                    }
                    out!("{}", iostat::table(&r));
                }
                printed += 1;
                let (Some(every), true) = (interval, count.is_none_or(|c| printed < c)) else {
                    return Ok(());
                };
                earlier = Some(now);
                std::thread::sleep(std::time::Duration::from_secs_f64(every));
            }
        }
        Command::History { json } => {
            let r = ask(h, &Request::History)?;
            print_report(json, r.report, r.text);
            return Ok(());
        }
        Command::Status {
            json,
            test,
            problems,
        } => {
            let r = ask(h, &Request::Status)?;
            let report = r.status.ok_or_else(|| {
                Error::failed(format!("{} answered without a status", h.describe()))
            })?;
            return show_status(report, r.text.unwrap_or_default(), json, test, problems);
        }
        Command::Scrub {
            name,
            repair,
            rate,
            json,
        } => {
            let r = ask(h, &Request::Scrub { name, repair, rate })?;
            print_report(json, r.report, r.text);
            return Ok(());
        }
        Command::Fail { path, force, .. } => Request::Fail {
            path: absolute(path),
            force,
        },
        Command::SetDisk {
            path,
            write_mostly,
            write_behind,
            timeout,
            ..
        } => Request::SetDisk {
            set: disk_settings(&path, write_mostly, write_behind, timeout)?,
            path: absolute(path),
        },
        Command::Reactivate { path, .. } => Request::Reactivate {
            path: absolute(path),
        },
        Command::Create {
            name,
            size,
            mirror,
            copies,
            disk,
            ..
        } => {
            let copies = if mirror { copies.unwrap_or(2) } else { 1 };
            if mirror && copies < 2 {
                return Err(Error::refused(format!(
                    "mirror {name} needs at least 2 copies, not {copies}"
                )));
            }
            Request::Create {
                name,
                size,
                copies,
                disks: disk.into_iter().map(absolute).collect(),
            }
        }
        Command::AddMirror { name, disk, .. } => Request::AddMirror {
            name,
            disk: disk.map(absolute),
        },
        Command::RemoveMirror { name, disk, .. } => Request::RemoveMirror {
            name,
            disk: absolute(disk),
        },
        Command::Break {
            name,
            disk,
            new_name,
            nokeep,
            ..
        } => Request::Break {
            name,
            disk: absolute(disk),
            new_name,
            nokeep,
        },
        Command::Repair { name, disk, .. } => Request::Repair {
            name,
            disk: disk.map(absolute),
        },
        Command::Extend { name, size, .. } => Request::Extend { name, size },
        Command::Delete { name, force, .. } => Request::Delete { name, force },
        Command::Copy { src, dst, rate, .. } => Request::Copy {
            src: absolute_endpoint(src),
            dst: absolute_endpoint(dst),
            rate,
        },
        Command::RemoveDisk { path, .. } => Request::RemoveDisk {
            path: absolute(path),
        },
        Command::Replace {
            path, new, cancel, ..
        } => Request::Replace {
            path: absolute(path),
            new: new.map(absolute),
            cancel,
        },
        Command::Resync {
            name,
            pause,
            resume,
            cancel,
            rate,
            ..
        } => Request::Resync {
            name,
            action: match (pause, resume, cancel) {
                (true, _, _) => Some("pause".into()),
                (_, true, _) => Some("resume".into()),
                (_, _, true) => Some("cancel".into()),
                _ => None,
            },
            rate,
        },
        Command::ResolveSplitBrain { keep, .. } => Request::ResolveSplitBrain {
            keep: absolute(keep),
        },
        Command::Init {
            paths,
            style,
            controller,
            group,
            force,
            region_size,
            spare,
            restore,
            ..
        } => {
            if restore {
                return Err(Error::refused(format!(
                    "init --restore rewrites a member's label from the group's config and needs the group at rest, but {} serves it; stop it first",
                    h.short()
                )));
            }
            if region_size.is_some() {
                return Err(Error::refused(
                    "--region-size applies to a new group only; the disks join the group mirrorvol serve holds",
                ));
            }
            Request::Init {
                paths: paths.into_iter().map(absolute).collect(),
                style,
                controller,
                group,
                force,
                spare,
            }
        }
        Command::TestMirrors { name, .. } => {
            return Err(Error::refused(format!(
                "test-mirrors reads each plex of {name} alone and needs the volume quiet, but {} serves it; stop it first, or compare the plexes while serving with `mirrorvol scrub {name}`",
                h.short()
            )));
        }
        other => {
            let name = command_name(&other);
            let group = ask(h, &Request::Status)
                .ok()
                .and_then(|r| Some(r.status?["group"]["name"].as_str()?.to_string()))
                .unwrap_or_else(|| h.group.to_string());
            return Err(Error::refused(format!(
                "{name} is not available while {} holds group {group}; stop it first",
                h.short()
            )));
        }
    };
    // A copy shows its progress bar, as offline, from the daemon's status.
    let copied = match &request {
        Request::Copy { src, dst, .. } => dst.strip_prefix("vol:").or(src.strip_prefix("vol:")),
        _ => None,
    };
    let done = match copied {
        Some(volume) if std::io::stderr().is_terminal() => {
            with_copy_bar(h, volume, &Bar::new(), || ask(h, &request))
        }
        _ => ask(h, &request),
    };
    print_done(done?);
    if let Some((names, rate)) = paced {
        for name in names {
            ask(
                h,
                &Request::Resync {
                    name,
                    action: None,
                    rate: Some(rate),
                },
            )?;
        }
    }
    Ok(())
}

/// Runs `call` (a copy through the daemon) while `bar` shows the copy of
/// `volume` that the daemon's status reports, polled a few times a second.
fn with_copy_bar<T>(
    h: &holder::Holder,
    volume: &str,
    bar: &(dyn crate::group::Progress + Sync),
    call: impl FnOnce() -> T,
) -> T {
    let (stop, wake) = (Mutex::new(false), std::sync::Condvar::new());
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut shown = false;
            let mut stopped = stop.lock().unwrap_or_else(|e| e.into_inner());
            while !*stopped {
                drop(stopped);
                let copy = ask(h, &control::Request::Status)
                    .ok()
                    .and_then(|r| r.status)
                    .and_then(|s| {
                        let list = s["volumes"].as_array()?;
                        let v = list.iter().find(|v| v["name"] == volume)?;
                        Some(v["copy"].clone()).filter(|c| c.is_object())
                    });
                if let Some(c) = copy {
                    if !shown {
                        let what = format!(
                            "copy {} to {}",
                            c["from"].as_str().unwrap_or("?"),
                            c["to"].as_str().unwrap_or("?")
                        );
                        bar.start(&what, c["total"].as_u64().unwrap_or(0));
                        shown = true;
                    }
                    bar.set(c["done"].as_u64().unwrap_or(0));
                }
                stopped = stop.lock().unwrap_or_else(|e| e.into_inner());
                if !*stopped {
                    stopped = wake
                        .wait_timeout(stopped, std::time::Duration::from_millis(200))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            if shown {
                bar.finish();
            }
        });
        let out = call();
        *stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        wake.notify_all();
        out
    })
}

fn execute(cli: Cli) -> Result<()> {
    let bar = Bar::new();
    let disks = Disks::new(
        cli.disks.clone(),
        (cli.io_timeout, cli.remote_io_timeout),
        cli.io_engine,
        crate::group::claim::ClaimOptions {
            force: cli.force_claim,
            command: command_name(&cli.command).to_string(),
            interval: crate::group::claim::DEFAULT_INTERVAL,
            // A volume copied out to a file, a scrub that repairs nothing.
            silent: Vec::new(),
            reads_only: match &cli.command {
                Command::Copy { dst, .. } => !dst.starts_with("vol:"),
                Command::Scrub { repair, .. } => !repair,
                _ => false,
            },
            eager: false,
        },
    );
    // `serve` checks its listen addresses first, then meets the disks'
    // locks, whose refusal names the daemon holding them.
    let needs_group = !matches!(
        cli.command,
        Command::Examine { .. }
            | Command::Demo { .. }
            | Command::Serve { .. }
            | Command::Completions { .. }
            | Command::Manpage
    ) && !cli.disks.is_empty();
    if needs_group && let Some(h) = find_daemon(&disks) {
        return execute_online(&h, cli.command);
    }
    match cli.command {
        Command::Init {
            paths,
            restore: true,
            ..
        } => {
            if cli.disks.is_empty() {
                return Err(Error::refused(
                    "init --restore needs the group's other disks: name them with --disks or MIRRORVOL_DISKS",
                ));
            }
            let g = assemble_claimed(&disks, true)?;
            for (path, uuid) in paths.iter().zip(ops::restore_labels(&g, &paths)?) {
                outln!(
                    "restored the label of disk {uuid} of group {} at {}; `mirrorvol reactivate {}` puts it back in service",
                    g.config.name,
                    path.display(),
                    path.display()
                );
            }
        }
        Command::Init {
            paths,
            style,
            controller,
            group,
            force,
            region_size,
            spare,
            restore: _,
            ..
        } => {
            if let Some(r) = region_size
                && (r < 4096 || !r.is_power_of_two())
            {
                return Err(Error::refused(format!(
                    "region size {r} is not a power of two of at least 4096 bytes"
                )));
            }
            let existing = if cli.disks.is_empty() {
                None
            } else {
                // Looked at first: no group there is a new group.
                let found = Group::assemble(&disks.set()?, Lookup::Optional)?.is_some();
                match found {
                    true => Some(assemble_claimed(&disks, true)?),
                    false => None,
                }
            };
            let opts = InitOptions {
                style,
                controller,
                group,
                force,
                region_size: region_size.unwrap_or(0),
                spare,
            };
            let joined = existing.is_some();
            let open = crate::group::DiskOpen {
                timeout: disks.timeout,
                remote_timeout: disks.remote_timeout,
                engine: disks.engine,
                ..Default::default()
            };
            let mut g = ops::init_with(existing, &paths, &opts, open)?;
            flush_warnings(&mut g);
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            outln!(
                "initialized {} as {style} {}{} of {} group {}",
                names.join(", "),
                if spare { "hot spare" } else { "disk" },
                if names.len() > 1 { "s" } else { "" },
                if joined { "existing" } else { "new" },
                g.config.name
            );
        }
        Command::Create {
            name,
            size,
            mirror,
            copies,
            disk,
            ..
        } => {
            let copies = if mirror { copies.unwrap_or(2) } else { 1 };
            if mirror && copies < 2 {
                return Err(Error::refused(format!(
                    "mirror {name} needs at least 2 copies, not {copies}"
                )));
            }
            let done = through_controller(&disks, |live| {
                live.create_volume(&name, size, copies, &disk)
            })?;
            print_offline(done);
        }
        Command::AddMirror {
            name, disk, rate, ..
        } => {
            let (done, resynced) = through_controller(&disks, |live| {
                let done = live.add_mirror(&name, disk.as_deref())?;
                Ok((done, live.resync_in_foreground(&bar, rate)?))
            })?;
            outln!("added a mirror to volume {name}; it is in sync");
            print_resyncs(&resynced);
            warn(&done.warnings);
        }
        Command::RemoveMirror { name, disk, .. } => {
            let done = through_controller(&disks, |live| live.remove_mirror(&name, &disk))?;
            print_offline(done);
        }
        Command::Break {
            name,
            disk,
            new_name,
            nokeep,
            ..
        } => {
            let (_, done) = through_controller(&disks, |live| {
                live.break_mirror(&name, &disk, new_name.as_deref(), nokeep)
            })?;
            print_offline(done);
        }
        Command::Repair {
            name, disk, rate, ..
        } => {
            let (done, resynced, state) = through_controller(&disks, |live| {
                let done = live.repair(&name, disk.as_deref())?;
                let resynced = live.resync_in_foreground(&bar, rate)?;
                let n = name.clone();
                let state = live.with_group(move |g| g.volume(&n).map(|v| g.volume_state(v)))??;
                Ok((done, resynced, state))
            })?;
            outln!("repaired volume {name}: {state}");
            print_resyncs(&resynced);
            warn(&done.warnings);
        }
        Command::Reactivate { path, rate, .. } => {
            let (done, resynced) = through_controller(&disks, |live| {
                let done = live.reactivate_by_path(&path)?;
                Ok((done, live.resync_in_foreground(&bar, rate)?))
            })?;
            outln!("reactivated disk {}", path.display());
            print_resyncs(&resynced);
            warn(&done.warnings);
        }
        Command::ResolveSplitBrain { keep, rate, .. } => {
            let mut g = assemble_claimed(&disks, false)?;
            g.keep_split_side(&keep)?;
            let group = g.config.name.clone();
            let resynced = through_group(g, |live| live.resync_in_foreground(&bar, rate))?;
            let copied: u64 = resynced.iter().map(|r| r.bytes).sum();
            outln!(
                "resolved the split brain of group {group}: kept the side of {}; copied {copied} bytes ({}) onto the other side",
                keep.display(),
                human(copied)
            );
            print_resyncs(&resynced);
        }
        Command::Extend { name, size, .. } => {
            let done = through_controller(&disks, |live| live.extend(&name, size))?;
            print_offline(done);
        }
        Command::Delete { name, force: _, .. } => {
            let done = through_controller(&disks, |live| live.delete_volume(&name))?;
            print_offline(done);
        }
        Command::RemoveDisk { path, .. } => {
            let done = through_controller(&disks, |live| live.remove_disk(&path))?;
            print_offline(done);
        }
        Command::Iostat {
            interval, count, ..
        } => {
            iostat::check(interval, count)?;
            return Err(Error::refused(
                "iostat reads the counters of mirrorvol serve, and no serve holds the group of --disks",
            ));
        }
        Command::History { json } => {
            let g = assemble_shared(&disks)?;
            let h = &g.config.history;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(h).expect("the history serializes")
                );
            } else {
                out!("{}", crate::group::history::text(h));
            }
        }
        Command::Replace {
            path, cancel: true, ..
        } => {
            let done = through_controller(&disks, |live| live.cancel_replace(&path))?;
            print_offline(done);
        }
        Command::Replace {
            path, new, rate, ..
        } => {
            let new =
                new.ok_or_else(|| Error::refused("replace needs the disk to replace by: NEW"))?;
            let (done, resynced, left) = through_controller(&disks, |live| {
                let done = live.replace(&path, &new)?;
                let resynced = live.resync_in_foreground(&bar, rate)?;
                // The last resync's worker may have finished it already.
                live.finish_replacements();
                let old = path.clone();
                let left = live.with_group(move |g| g.resolve_disk(&old).is_err())?;
                Ok((done, resynced, left))
            })?;
            print_resyncs(&resynced);
            if left {
                outln!(
                    "replaced disk {} by {}: it left the group",
                    path.display(),
                    new.display()
                );
            } else {
                outln!("{}", done.message);
            }
            warn(&done.warnings);
        }
        Command::Resync { name, .. } => {
            return Err(Error::refused(format!(
                "no mirrorvol serve holds the group of volume {name}: resyncs run in the background only under serve (offline commands copy in the foreground, and one interrupted resumes from its checkpoint the next time)"
            )));
        }
        Command::Fail { path, force, .. } => {
            let done = through_controller(&disks, |live| live.fail_disk_by_path(&path, force))?;
            print_offline(done);
        }
        Command::SetDisk {
            path,
            write_mostly,
            write_behind,
            timeout,
            ..
        } => {
            let set = disk_settings(&path, write_mostly, write_behind, timeout)?;
            let done = through_controller(&disks, |live| live.set_disk_by_path(&path, set))?;
            print_offline(done);
        }
        Command::Copy { src, dst, rate, .. } => {
            let (s, d) = (Endpoint::parse(&src), Endpoint::parse(&dst));
            let n = through_controller(&disks, |live| live.copy(&s, &d, rate, &|| false, &bar))?;
            outln!("copied {} from {src} to {dst}", human(n));
        }
        Command::Status {
            json,
            test,
            problems,
        } => {
            let g = assemble_shared(&disks)?;
            let mut report = g.status();
            if let Some(h) = g.held_by_on_disks() {
                report.group.held_by = Some(h.who);
                report.group.holder_progress = h
                    .doing
                    .as_ref()
                    .map(|a| crate::group::status::HolderProgress::of(a, h.late));
            }
            let text = crate::group::show::status_text(&report);
            let report = serde_json::to_value(&report).expect("status serializes");
            show_status(report, text, json, test, problems)?;
        }
        Command::Examine { path, json } => examine::examine(&path, json)?,
        Command::Scrub {
            name,
            repair,
            rate,
            json,
        } => {
            let report = through_controller(&disks, |live| live.scrub(&name, repair, rate, &bar))?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&crate::group::scrub::scrub_json(&report))
                        .expect("scrub report serializes")
                );
            } else {
                out!("{}", crate::group::scrub::scrub_text(&report));
            }
        }
        Command::TestMirrors { name, exec, json } => {
            test_mirrors::run(&disks, &name, exec.as_deref(), json, &bar)?
        }
        Command::Serve {
            listen,
            cache,
            disk_threads,
            resync_min_rate,
            resync_max_rate,
            scrub_interval,
            scrub_rate,
            control,
            on_event,
            on_event_timeout,
            metrics,
            http,
            http_actions,
            http_token_file,
            http_allow,
            hot_spares,
            remote_return,
            remote_spare_delay,
            max_connections,
            handshake_timeout,
            client_timeout,
            max_in_flight,
            tls_certs,
            tls,
            tls_verify_peer,
            insecure_listen,
        } => crate::daemon::serve(
            &cli.disks,
            &crate::daemon::ServeOptions {
                force_claim: cli.force_claim,
                listen,
                direct: cache == "none",
                disk_threads: disk_threads.into(),
                io_timeout: cli.io_timeout,
                remote_io_timeout: cli.remote_io_timeout,
                io_engine: cli.io_engine,
                resync: crate::volume::resync::ResyncOptions {
                    min_rate: resync_min_rate,
                    max_rate: resync_max_rate,
                    ..Default::default()
                },
                scrub_interval: (scrub_interval > 0)
                    .then(|| std::time::Duration::from_secs(scrub_interval)),
                scrub_rate,
                control,
                on_event,
                on_event_timeout: Some(std::time::Duration::from_secs(on_event_timeout)),
                metrics,
                http: http.map(|addr| crate::daemon::HttpOptions {
                    addr,
                    actions: http_actions,
                    token_file: http_token_file,
                    allow: http_allow,
                }),
                hot_spares: hot_spares == "auto",
                remote_return: if remote_return == "auto" {
                    crate::group::live::RemoteReturn::Auto
                } else {
                    crate::group::live::RemoteReturn::Manual
                },
                remote_spare_delay: std::time::Duration::from_secs(remote_spare_delay),
                limits: crate::nbd::server::Limits {
                    max_connections: max_connections as usize,
                    handshake_timeout: std::time::Duration::from_secs(handshake_timeout),
                    reply_timeout: std::time::Duration::from_secs(client_timeout),
                    total_bytes: max_in_flight.max(1),
                    loops: crate::nbd::server::loops_for(cli.io_engine),
                },
                tls: crate::daemon::TlsOptions {
                    certs: tls_certs,
                    mode: tls,
                    verify_peer: tls_verify_peer == "yes",
                },
                insecure_listen,
            },
        )?,
        Command::Demo { dir } => demo::demo(dir)?,
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "mirrorvol",
                &mut script,
            );
            out!("{}", String::from_utf8_lossy(&script));
        }
        Command::Manpage => {
            let page = manpage::render().map_err(|e| Error::io("render the manual page", e))?;
            out!("{}", String::from_utf8_lossy(&page));
        }
    }
    Ok(())
}

/// `set-disk`'s settings; refused when none is given.
fn disk_settings(
    path: &std::path::Path,
    write_mostly: Option<String>,
    write_behind: Option<u32>,
    timeout: Option<std::time::Duration>,
) -> Result<crate::group::live::DiskSettings> {
    if write_mostly.is_none() && write_behind.is_none() && timeout.is_none() {
        return Err(Error::refused(format!(
            "set-disk {} names no setting to change (--write-mostly on|off, --write-behind N, --timeout DURATION)",
            path.display()
        )));
    }
    let timeout_ms = match timeout {
        Some(t) if !t.is_zero() && t < std::time::Duration::from_millis(100) => {
            return Err(Error::refused(format!(
                "a deadline of {} ms for disk {} is too short to tell a slow disk from a dead one: give 100 ms or more, or 0 for the group's",
                t.as_millis(),
                path.display()
            )));
        }
        Some(t) => Some(t.as_millis().min(u64::MAX as u128) as u64),
        None => None,
    };
    Ok(crate::group::live::DiskSettings {
        write_mostly: write_mostly.map(|v| v == "on"),
        write_behind,
        timeout_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("3KiB"), Ok(3 << 10));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-5M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
