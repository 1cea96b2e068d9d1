//! `test-mirrors NAME [--exec CMD] [--json]`: proves that each plex of a
//! mirror, alone, holds a usable copy of the volume (the seed's "test that
//! the system starts from each mirror").
//!
//! The group is assembled read-only, as for `status`. Each in-sync plex is
//! exported alone, read-only, by the project's NBD server on its own Unix
//! socket in a temporary directory (`nbd+unix:///NAME?socket=.../plex-N.sock`).
//! The export only reads the plex's extent, through the disk the group
//! opened, and the server refuses every write (`NBD_FLAG_READ_ONLY`,
//! `EPERM`): nothing this command does can change a disk.
//!
//! - With `--exec CMD`, CMD runs under `sh -c` with `{uri}` replaced by the
//!   plex's URI (quoted for the shell where it stands) and `MIRRORVOL_URI`,
//!   `MIRRORVOL_DISK`, `MIRRORVOL_VOLUME` in its environment; the plex passes
//!   when CMD exits 0. CMD's output goes to stderr, each line prefixed with
//!   the plex it belongs to.
//! - Without it, every plex is exported at once (each on its own socket) and
//!   every byte of the volume is read from each over a real NBD connection
//!   ([`crate::nbd::client`]), one chunk from all plexes at a time, compared
//!   per 512-byte sector right away: that gives the mismatching byte ranges
//!   and, with three or more plexes, the plex the majority outvotes.
//!
//! Plexes not in sync (stale, resyncing, failed, missing) are skipped with
//! the reason. Exit status: 0 when every tested plex passed, 1 when one
//! failed, 2 for a refusal (unknown or simple volume, no in-sync plex, an
//! `--exec` command that names neither `{uri}` nor `$MIRRORVOL_URI`).

use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::disk::buf::IO_ALIGN;
use crate::disk::{AlignedBuf, Disk};
use crate::group::ops::human;
use crate::group::{Group, Progress};
use crate::nbd::client::Client;
use crate::nbd::server::{self, Done, Export, Listen, Server};
use crate::{Error, Result};

/// The placeholder `--exec` commands name the plex's URI with.
pub const URI_PLACEHOLDER: &str = "{uri}";
/// Bytes read at once from each plex when comparing them (as `scrub` reads).
const CHUNK: usize = crate::volume::scrub::SCRUB_CHUNK;
/// Mismatches are located to this many bytes (as `scrub` does).
const SECTOR: usize = crate::volume::scrub::SCRUB_SECTOR;
/// How long one NBD read may take before the plex fails the test.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// One plex of the volume: where its copy lies and how users name it.
struct Plex {
    /// 1-based position in the volume's plex list (names the socket).
    index: usize,
    /// The disk as users see it (the path given with --disks).
    disk: String,
    /// The disk as the group opened it (locked; the exports only read it).
    io: Arc<dyn Disk>,
    /// Absolute offset of the plex's extent on its disk.
    base: u64,
    /// The disk's bitmap (read only: its block checksums and written map),
    /// and the plex's offset in its data area.
    map: Option<(Arc<crate::volume::bitmap::DiskBitmap>, u64)>,
}

impl Plex {
    /// Whether the 4 KiB block at volume offset `at`, as read (`block`),
    /// matches the plex's checksum (`None`: not known).
    fn check(&self, at: u64, block: &[u8]) -> Option<bool> {
        use crate::format::checksum::{UNKNOWN, sum};
        let (map, offset) = self.map.as_ref()?;
        let e = map.sums_of(offset + at, 1)[0];
        (e != UNKNOWN).then(|| sum(block) == e)
    }
}

/// What happened to one plex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    Skipped(String),
}

/// A byte range where the tested plexes differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub offset: u64,
    pub length: u64,
    /// Every plex compared here, by disk.
    pub plexes: Vec<String>,
    /// The plexes whose copy agrees, when a strict majority does.
    pub majority: Vec<String>,
    /// The plexes the majority outvotes (empty when there is none).
    pub outvoted: Vec<String>,
    /// `majority` holds the copy that matches its block checksums (not a
    /// count of votes).
    pub checksum: bool,
}

/// What `test-mirrors` found.
#[derive(Debug, Clone)]
pub struct Report {
    pub volume: String,
    pub command: Option<String>,
    /// (disk, state, outcome), in the volume's plex order.
    pub plexes: Vec<(String, String, Outcome)>,
    pub mismatches: Vec<Mismatch>,
}

impl Report {
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.plexes.iter().filter(|(_, _, o)| f(o)).count()
    }

    pub fn failed(&self) -> Vec<&str> {
        self.plexes
            .iter()
            .filter(|(_, _, o)| matches!(o, Outcome::Fail(_)))
            .map(|(d, _, _)| d.as_str())
            .collect()
    }
}

/// One plex's extent as a read-only NBD export.
struct PlexExport {
    name: String,
    size: u64,
    base: u64,
    disk: Arc<dyn Disk>,
    /// The disk's written map, and the plex's offset in its data area: a
    /// region never written reads as zeroes, as the volume serves it.
    map: Option<(Arc<crate::volume::bitmap::DiskBitmap>, u64)>,
}

impl Export for PlexExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: usize, done: Done<AlignedBuf>) {
        let mut buf = AlignedBuf::new(len, IO_ALIGN);
        let r = self.disk.read_at(&mut buf, self.base + offset);
        if r.is_ok()
            && let Some((map, at)) = &self.map
        {
            // Zeroes wherever the map says the volume never wrote.
            let start = at + offset;
            let mut pos = start;
            for w in map.written_ranges(start, start + len as u64) {
                buf[(pos - start) as usize..(w.start - start) as usize].fill(0);
                pos = w.end;
            }
            buf[(pos - start) as usize..].fill(0);
        }
        done(r.map(|_| buf))
    }

    // The server refuses writes to a read-only export before they get
    // here.
    fn write(&self, _: u64, _: AlignedBuf, _: bool, done: Done<()>) {
        done(Err(io::Error::from_raw_os_error(libc::EROFS)));
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool, done: Done<()>) {
        done(Err(io::Error::from_raw_os_error(libc::EROFS)));
    }

    fn flush(&self, done: Done<()>) {
        done(Ok(()));
    }

    fn read_only(&self) -> bool {
        true
    }
}

/// A plex exported alone while the guard lives.
struct Exported {
    server: Server,
    sock: PathBuf,
    uri: String,
}

impl Drop for Exported {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

fn export_plex(dir: &Path, volume: &str, size: u64, p: &Plex) -> Result<Exported> {
    let export = PlexExport {
        name: volume.to_string(),
        size,
        base: p.base,
        disk: p.io.clone(),
        map: p.map.clone(),
    };
    let sock = dir.join(format!("plex-{}.sock", p.index));
    let bound = server::bind(&Listen::Unix(sock.clone()))
        .map_err(|e| Error::failed(format!("the plex on {} cannot be exported: {e}", p.disk)))?;
    let server = Server::new(vec![Arc::new(export)]);
    server.serve(bound);
    Ok(Exported {
        server,
        uri: nbd_unix_uri(volume, &sock),
        sock,
    })
}

/// Percent-encodes everything but RFC 3986's unreserved characters (and
/// `/` where `keep_slash`).
fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `nbd+unix:///EXPORT?socket=PATH`, as libnbd and qemu read it.
pub fn nbd_unix_uri(export: &str, socket: &Path) -> String {
    format!(
        "nbd+unix:///{}?socket={}",
        percent_encode(export, false),
        percent_encode(&socket.display().to_string(), true)
    )
}

/// `value` as one shell word: bare when it is made of safe characters,
/// single-quoted otherwise.
pub fn sh_quote(value: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !value.is_empty() && value.chars().all(safe) {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

/// Replaces every [`URI_PLACEHOLDER`] in a shell command with `value`,
/// quoted for where the placeholder stands: a single-quoted word outside
/// quotes, escaped inside single or double quotes. So `nbdcopy {uri} x`,
/// `nbdcopy '{uri}' x` and `nbdcopy "{uri}" x` all pass the URI as one
/// argument, never glob-expanded (it holds a `?`). A backslash-escaped
/// `\{uri}` stays as written.
pub fn substitute_uri(cmd: &str, value: &str) -> String {
    #[derive(Clone, Copy, PartialEq)]
    enum Quote {
        None,
        Single,
        Double,
    }
    let mut out = String::with_capacity(cmd.len() + value.len());
    let mut quote = Quote::None;
    let mut rest = cmd;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix(URI_PLACEHOLDER) {
            match quote {
                Quote::None => out.push_str(&sh_quote(value)),
                Quote::Single => out.push_str(&value.replace('\'', r"'\''")),
                Quote::Double => {
                    for v in value.chars() {
                        if matches!(v, '\\' | '"' | '$' | '`') {
                            out.push('\\');
                        }
                        out.push(v);
                    }
                }
            }
            rest = after;
            continue;
        }
        rest = &rest[c.len_utf8()..];
        out.push(c);
        match (quote, c) {
            (Quote::None | Quote::Double, '\\') => {
                if let Some(next) = rest.chars().next() {
                    out.push(next);
                    rest = &rest[next.len_utf8()..];
                }
            }
            (Quote::None, '\'') => quote = Quote::Single,
            (Quote::Single, '\'') => quote = Quote::None,
            (Quote::None, '"') => quote = Quote::Double,
            (Quote::Double, '"') => quote = Quote::None,
            _ => {}
        }
    }
    out
}

/// Refuses an `--exec` command that would not look at the plex.
pub fn check_exec(cmd: &str) -> Result<()> {
    if !cmd.contains(URI_PLACEHOLDER) && !cmd.contains("MIRRORVOL_URI") {
        return Err(Error::refused(format!(
            "the --exec command {cmd:?} names neither {URI_PLACEHOLDER} nor $MIRRORVOL_URI, so it would not test the plexes"
        )));
    }
    Ok(())
}

/// Why a plex in `state` is not tested.
fn skip_reason(state: &str) -> String {
    match state {
        "stale" => "stale: it missed writes and waits for a resync".into(),
        "resyncing" => "resyncing: its copy is not complete yet".into(),
        "failed" => "failed: it holds no copy to trust".into(),
        "missing" => "missing: its disk is not here".into(),
        other => format!("{other}: it is not in sync"),
    }
}

/// `test-mirrors NAME`: assembles the group of `disks` read-only (no
/// bitmaps loaded, nothing committed), tests, prints the report, and fails
/// (exit 1) when a tested plex failed.
pub fn run(
    disks: &super::Disks,
    name: &str,
    exec: Option<&str>,
    json: bool,
    progress: &dyn Progress,
) -> Result<()> {
    if let Some(cmd) = exec {
        check_exec(cmd)?;
    }
    let mut group = super::assemble(disks)?;
    group.refuse_split()?;
    let report = test_mirrors(&group, name, exec, progress)?;
    super::flush_warnings(&mut group);
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report_json(&report)).expect("report serializes")
        );
    } else {
        out!("{}", report_text(&report));
    }
    let failed = report.failed();
    if !failed.is_empty() {
        return Err(Error::failed(format!(
            "volume {name}: the {} on {} failed the test",
            if failed.len() == 1 { "plex" } else { "plexes" },
            crate::group::show::and_list(&failed.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        )));
    }
    Ok(())
}

/// Runs the test of `name`: the caller assembled `group` read-only and
/// checked `exec`.
fn test_mirrors(
    group: &Group,
    name: &str,
    exec: Option<&str>,
    progress: &dyn Progress,
) -> Result<Report> {
    let v = group.volume(name)?;
    if !v.is_mirror() {
        return Err(Error::refused(format!(
            "volume {name} is simple: it has no mirrors to test"
        )));
    }
    let mut plexes = Vec::new();
    // (disk, state, outcome) of every plex; a tested one's outcome comes
    // from the test, at the position `tested` records.
    let mut outcomes = Vec::new();
    let mut tested = Vec::new();
    for (i, p) in v.plexes.iter().enumerate() {
        let state = group.plex_state(p.disk, p.state);
        let disk = group.disk_path(p.disk);
        match group.members.get(&p.disk) {
            Some(m) if state == "in-sync" => {
                // Read only: loading writes nothing. A disk before format
                // 5 has no checksums to go by (its written map, if any,
                // still counts).
                let map = crate::volume::bitmap::DiskBitmap::load(
                    m.disk.clone(),
                    &m.label.layout,
                    group.config.region_size,
                    group.config.seqno,
                )
                .ok()
                .map(|(b, _)| {
                    if m.label.version < 5 {
                        b.sums.distrust();
                    }
                    (Arc::new(b), p.offset)
                });
                plexes.push(Plex {
                    index: i + 1,
                    disk: disk.clone(),
                    io: m.disk.clone(),
                    base: m.label.layout.data_offset() + p.offset,
                    map,
                });
                tested.push(i);
                outcomes.push((disk, state.to_string(), Outcome::Pass));
            }
            _ => outcomes.push((
                disk,
                state.to_string(),
                Outcome::Skipped(skip_reason(state)),
            )),
        }
    }
    if plexes.is_empty() {
        return Err(Error::refused(format!(
            "volume {name} has no in-sync plex to test"
        )));
    }
    let dir = tempfile::Builder::new()
        .prefix("mirrorvol-test-mirrors-")
        .tempdir()
        .map_err(|e| Error::io("cannot make a temporary directory for the plex exports", e))?;
    let (results, mismatches) = match exec {
        Some(cmd) => (
            plexes
                .iter()
                .map(|p| run_exec(dir.path(), name, v.size, p, cmd))
                .collect::<Result<Vec<_>>>()?,
            Vec::new(),
        ),
        None => compare(dir.path(), name, v.size, &plexes, progress)?,
    };
    for (i, result) in tested.into_iter().zip(results) {
        outcomes[i].2 = result;
    }
    Ok(Report {
        volume: name.to_string(),
        command: exec.map(str::to_string),
        plexes: outcomes,
        mismatches,
    })
}

/// Exports `p` alone and runs `cmd` against it.
fn run_exec(dir: &Path, volume: &str, size: u64, p: &Plex, cmd: &str) -> Result<Outcome> {
    let exported = export_plex(dir, volume, size, p)?;
    let line = substitute_uri(cmd, &exported.uri);
    let tag = format!("[plex on {}]", p.disk);
    eprintln!("{tag} testing {} with: {line}", exported.uri);
    let child = Command::new("sh")
        .arg("-c")
        .arg(&line)
        .env("MIRRORVOL_URI", &exported.uri)
        .env("MIRRORVOL_DISK", &p.disk)
        .env("MIRRORVOL_VOLUME", volume)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return Ok(Outcome::Fail(format!(
                "the command could not be started: {e}"
            )));
        }
    };
    let forward = |pipe: Box<dyn io::Read + Send>| {
        let tag = tag.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n') {
                let Ok(line) = line else { break };
                let mut err = io::stderr().lock();
                let _ = writeln!(err, "{tag} {}", String::from_utf8_lossy(&line));
            }
        })
    };
    let out = forward(Box::new(child.stdout.take().expect("piped")));
    let err = forward(Box::new(child.stderr.take().expect("piped")));
    let status = child
        .wait()
        .map_err(|e| Error::io("cannot wait for the --exec command", e))?;
    let _ = out.join();
    let _ = err.join();
    drop(exported);
    let outcome = exit_outcome(status);
    match &outcome {
        Outcome::Pass => eprintln!("{tag} the command exited 0"),
        Outcome::Fail(why) | Outcome::Skipped(why) => eprintln!("{tag} {why}"),
    }
    Ok(outcome)
}

fn exit_outcome(status: ExitStatus) -> Outcome {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => Outcome::Pass,
        (Some(code), _) => Outcome::Fail(format!("the command exited with status {code}")),
        (None, Some(sig)) => Outcome::Fail(format!("the command was killed by signal {sig}")),
        (None, None) => Outcome::Fail("the command ended abnormally".into()),
    }
}

/// Opens one plex's export over NBD and checks what it advertises.
fn connect(exported: &Exported, volume: &str, size: u64) -> std::result::Result<Client, String> {
    let c = Client::connect_unix(&exported.sock, volume, READ_TIMEOUT)
        .map_err(|e| format!("its export could not be opened: {e}"))?;
    if c.size() != size {
        return Err(format!(
            "its export is {} bytes, not the volume's {size}",
            c.size()
        ));
    }
    if !c.read_only() {
        return Err("its export is not read-only".into());
    }
    Ok(c)
}

/// Groups the plexes of one block by content.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    /// The compared plexes (by index), one group per distinct content.
    groups: Vec<Vec<usize>>,
    /// The group holding a strict majority, if any; or, with `checksum`,
    /// the group whose copy matches its block checksums.
    majority: Option<usize>,
    /// Decided by the block checksums, not by votes.
    checksum: bool,
}

impl Verdict {
    /// The same verdict with position `i` renamed `ids[i]` (`ids`
    /// ascending, so the groups keep their order).
    fn relabel(self, ids: &[usize]) -> Verdict {
        Verdict {
            groups: self
                .groups
                .into_iter()
                .map(|g| g.into_iter().map(|i| ids[i]).collect())
                .collect(),
            majority: self.majority,
            checksum: self.checksum,
        }
    }

    /// The verdict with the block checksums deciding where a copy matches
    /// its own: `ok[i]` for position `i` (`None`: not known). A copy known
    /// bad never holds the majority.
    fn by_checksums(mut self, ok: &[Option<bool>]) -> Verdict {
        let good = self
            .groups
            .iter()
            .position(|g| g.iter().any(|&i| ok[i] == Some(true)));
        match good {
            Some(g) => {
                self.majority = Some(g);
                self.checksum = true;
            }
            None => {
                if let Some(m) = self.majority
                    && self.groups[m].iter().any(|&i| ok[i] == Some(false))
                {
                    self.majority = None;
                }
            }
        }
        self
    }

    /// The verdict over the same plexes but `k`, as [`verdict`] would
    /// give it: `None` when the others agree.
    fn without(&self, k: usize) -> Option<Verdict> {
        let mut groups: Vec<Vec<usize>> = self
            .groups
            .iter()
            .map(|g| g.iter().copied().filter(|x| *x != k).collect::<Vec<_>>())
            .filter(|g| !g.is_empty())
            .collect();
        if groups.len() < 2 {
            return None;
        }
        groups.sort_by_key(|g| g[0]);
        let total: usize = groups.iter().map(Vec::len).sum();
        let majority = groups.iter().position(|g| g.len() * 2 > total);
        Some(Verdict {
            groups,
            majority,
            checksum: self.checksum,
        })
    }
}

/// `None` when every plex agrees.
fn verdict<K: PartialEq>(keys: &[K]) -> Option<Verdict> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        match groups.iter_mut().find(|g| keys[g[0]] == *k) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    if groups.len() < 2 {
        return None;
    }
    let majority = groups.iter().position(|g| g.len() * 2 > keys.len());
    Some(Verdict {
        groups,
        majority,
        checksum: false,
    })
}

/// Builds mismatching ranges from consecutive blocks and their verdicts.
#[derive(Default)]
struct Ranges {
    done: Vec<(u64, u64, Verdict)>,
    open: Option<(u64, u64, Verdict)>,
}

impl Ranges {
    fn block(&mut self, start: u64, end: u64, v: Option<Verdict>) {
        match (&mut self.open, v) {
            (Some((_, e, ov)), Some(v)) if *e == start && *ov == v => *e = end,
            (_, v) => {
                if let Some(o) = self.open.take() {
                    self.done.push(o);
                }
                self.open = v.map(|v| (start, end, v));
            }
        }
    }

    /// Takes plex `k` out of every range found so far, as if it had never
    /// been compared: ranges where only it differed vanish, the others'
    /// majorities are recounted, and neighbours left equal merge.
    fn drop_plex(&mut self, k: usize) {
        let old = std::mem::take(self).finish();
        for (start, end, v) in old {
            self.block(start, end, v.without(k));
        }
    }

    fn finish(mut self) -> Vec<(u64, u64, Verdict)> {
        if let Some(o) = self.open.take() {
            self.done.push(o);
        }
        self.done
    }
}

/// A range a plex loses: outvoted, or differing where no majority decides.
struct Loss {
    /// Index in the tested plexes.
    plex: usize,
    offset: u64,
    length: u64,
    /// A majority outvoted it (false: no majority).
    decided: bool,
    /// The block checksums did (its copy does not match them).
    checksum: bool,
    /// The other plexes that differ here.
    others: Vec<String>,
}

/// Exports every plex at once, each alone on its own socket, reads them
/// over NBD chunk by chunk in lockstep and compares each chunk per sector.
fn compare(
    dir: &Path,
    volume: &str,
    size: u64,
    plexes: &[Plex],
    progress: &dyn Progress,
) -> Result<(Vec<Outcome>, Vec<Mismatch>)> {
    let chunks = size.div_ceil(CHUNK as u64);
    let mut outcomes = vec![Outcome::Pass; plexes.len()];
    let exports = plexes
        .iter()
        .map(|p| export_plex(dir, volume, size, p))
        .collect::<Result<Vec<_>>>()?;
    // The plexes still read so far: (index in `plexes`, client, chunk).
    let mut alive: Vec<(usize, Client, Vec<u8>)> = Vec::new();
    for (k, exported) in exports.iter().enumerate() {
        match connect(exported, volume, size) {
            Ok(c) => alive.push((k, c, vec![0u8; CHUNK])),
            Err(why) => outcomes[k] = Outcome::Fail(why),
        }
    }
    let disks: Vec<String> = plexes.iter().map(|p| p.disk.clone()).collect();
    progress.start(
        &format!(
            "reading the {} on {}",
            if disks.len() == 1 { "plex" } else { "plexes" },
            crate::group::show::and_list(&disks)
        ),
        size,
    );
    // Verdicts name plexes by their index in `plexes`.
    let mut ranges = Ranges::default();
    for i in 0..chunks {
        let start = i * CHUNK as u64;
        let end = (start + CHUNK as u64).min(size);
        let len = (end - start) as usize;
        // Only the plexes read whole are compared: one whose read fails
        // leaves the comparison, also where it was read before.
        alive.retain_mut(|(k, c, buf)| match c.read(start, &mut buf[..len]) {
            Ok(()) => true,
            Err(e) => {
                outcomes[*k] =
                    Outcome::Fail(format!("reading {len} bytes at offset {start} failed: {e}"));
                ranges.drop_plex(*k);
                false
            }
        });
        let ids: Vec<usize> = alive.iter().map(|(k, _, _)| *k).collect();
        let data = |a: usize, b: usize| -> Vec<&[u8]> {
            alive.iter().map(|(_, _, buf)| &buf[a..b]).collect()
        };
        let all_equal = |keys: &[&[u8]]| keys.iter().all(|x| *x == keys[0]);
        if alive.len() < 2 || all_equal(&data(0, len)) {
            ranges.block(start, end, None);
        } else {
            const BLOCK: usize = crate::format::checksum::DATA_BLOCK as usize;
            for a in (0..len).step_by(SECTOR) {
                let b = (a + SECTOR).min(len);
                let keys = data(a, b);
                let v = if all_equal(&keys) {
                    None
                } else {
                    // The block checksums of the 4 KiB block around it.
                    let blk = a / BLOCK * BLOCK;
                    let ok: Vec<Option<bool>> = alive
                        .iter()
                        .map(|(k, _, buf)| {
                            (blk + BLOCK <= len)
                                .then(|| {
                                    plexes[*k].check(start + blk as u64, &buf[blk..blk + BLOCK])
                                })
                                .flatten()
                        })
                        .collect();
                    verdict(&keys).map(|v| v.by_checksums(&ok).relabel(&ids))
                };
                ranges.block(start + a as u64, start + b as u64, v);
            }
        }
        progress.set(end);
    }
    progress.finish();
    let compared: Vec<usize> = alive.iter().map(|(k, _, _)| *k).collect();
    for (_, c, _) in alive {
        c.disconnect();
    }
    drop(exports);
    let name = |k: usize| plexes[k].disk.clone();
    let mut mismatches = Vec::new();
    let mut lost: Vec<Loss> = Vec::new();
    for (start, end, v) in ranges.finish() {
        let all: Vec<usize> = v.groups.iter().flatten().copied().collect();
        let majority: Vec<usize> = v.majority.map(|m| v.groups[m].clone()).unwrap_or_default();
        let losers: Vec<usize> = all
            .iter()
            .copied()
            .filter(|k| !majority.contains(k))
            .collect();
        for &k in &losers {
            let others = all.iter().filter(|o| **o != k).map(|o| name(*o)).collect();
            lost.push(Loss {
                plex: k,
                offset: start,
                length: end - start,
                decided: v.majority.is_some(),
                checksum: v.checksum,
                others,
            });
        }
        let mut plexes_here: Vec<usize> = all.clone();
        plexes_here.sort();
        mismatches.push(Mismatch {
            offset: start,
            length: end - start,
            plexes: plexes_here.into_iter().map(name).collect(),
            majority: majority.iter().map(|k| name(*k)).collect(),
            outvoted: if v.majority.is_some() {
                losers.iter().map(|k| name(*k)).collect()
            } else {
                Vec::new()
            },
            checksum: v.checksum,
        });
    }
    for &plex in &compared {
        let mine: Vec<&Loss> = lost.iter().filter(|l| l.plex == plex).collect();
        let Some(first) = mine.first() else {
            continue;
        };
        let bytes: u64 = mine.iter().map(|l| l.length).sum();
        let n = mine.len();
        let summary = format!(
            "{n} range{} ({}), first at offset {}",
            if n == 1 { "" } else { "s" },
            human(bytes),
            first.offset
        );
        outcomes[plex] = if mine.iter().all(|l| l.decided && l.checksum) {
            Outcome::Fail(format!(
                "its copy does not match the block checksums in {summary}"
            ))
        } else if mine.iter().all(|l| l.decided) {
            Outcome::Fail(format!(
                "outvoted by the majority of the plexes in {summary}"
            ))
        } else {
            let mut others: Vec<String> = mine
                .iter()
                .filter(|l| !l.decided)
                .flat_map(|l| l.others.clone())
                .collect();
            others.sort();
            others.dedup();
            Outcome::Fail(format!(
                "its copy differs from the {} on {} in {summary}, and no majority says which copy is right",
                if others.len() == 1 { "plex" } else { "plexes" },
                crate::group::show::and_list(&others)
            ))
        };
    }
    Ok((outcomes, mismatches))
}

/// The text report: one line per plex, the mismatches, a summary.
pub fn report_text(r: &Report) -> String {
    let mut out = String::new();
    for (disk, _, o) in &r.plexes {
        match o {
            Outcome::Pass => out.push_str(&format!("plex on {disk}: pass\n")),
            Outcome::Fail(why) => out.push_str(&format!("plex on {disk}: FAIL ({why})\n")),
            Outcome::Skipped(why) => out.push_str(&format!("plex on {disk}: skipped ({why})\n")),
        }
    }
    for m in &r.mismatches {
        out.push_str(&format!(
            "mismatch at offset {}, {} bytes: ",
            m.offset, m.length
        ));
        if m.outvoted.is_empty() {
            out.push_str(&format!(
                "the plexes on {} differ and no majority decides\n",
                crate::group::show::and_list(&m.plexes)
            ));
        } else if m.checksum {
            out.push_str(&format!(
                "the copy on {} does not match the block checksums; the copy on {} does\n",
                crate::group::show::and_list(&m.outvoted),
                crate::group::show::and_list(&m.majority),
            ));
        } else {
            out.push_str(&format!(
                "the {} on {} {} outvoted by the {} on {}\n",
                if m.outvoted.len() == 1 {
                    "plex"
                } else {
                    "plexes"
                },
                crate::group::show::and_list(&m.outvoted),
                if m.outvoted.len() == 1 { "is" } else { "are" },
                if m.majority.len() == 1 {
                    "plex"
                } else {
                    "plexes"
                },
                crate::group::show::and_list(&m.majority),
            ));
        }
    }
    let passed = r.count(|o| *o == Outcome::Pass);
    let failed = r.count(|o| matches!(o, Outcome::Fail(_)));
    let skipped = r.count(|o| matches!(o, Outcome::Skipped(_)));
    out.push_str(&format!(
        "test-mirrors of volume {}: {passed} passed, {failed} failed, {skipped} skipped",
        r.volume
    ));
    let tested = passed + failed;
    if r.command.is_none() && tested == 1 {
        out.push_str("; one plex alone was tested: there was no other copy to compare it with");
    }
    out.push('\n');
    out
}

/// `{"volume", "plexes": [{"disk", "state", "result", "reason"}]}`, with
/// the command run, or the mismatches found, besides.
pub fn report_json(r: &Report) -> Value {
    let plexes: Vec<Value> = r
        .plexes
        .iter()
        .map(|(disk, state, o)| {
            let (result, reason) = match o {
                Outcome::Pass => ("pass", None),
                Outcome::Fail(why) => ("fail", Some(why)),
                Outcome::Skipped(why) => ("skipped", Some(why)),
            };
            json!({"disk": disk, "state": state, "result": result, "reason": reason})
        })
        .collect();
    let mut v = json!({"volume": r.volume, "plexes": plexes});
    match &r.command {
        Some(cmd) => v["command"] = json!(cmd),
        None => {
            v["mismatches"] = r
                .mismatches
                .iter()
                .map(|m| {
                    json!({
                        "offset": m.offset,
                        "length": m.length,
                        "plexes": m.plexes,
                        "majority": m.majority,
                        "outvoted": m.outvoted,
                        "verdict": if m.checksum {
                            "checksum"
                        } else if m.outvoted.is_empty() {
                            "none"
                        } else {
                            "majority"
                        },
                    })
                })
                .collect()
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(cmd: &str) -> String {
        let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        assert!(o.status.success(), "{cmd}: {o:?}");
        String::from_utf8(o.stdout).unwrap()
    }

    #[test]
    fn uri_names_the_export_and_the_socket() {
        assert_eq!(
            nbd_unix_uri("data", Path::new("/tmp/x/plex-1.sock")),
            "nbd+unix:///data?socket=/tmp/x/plex-1.sock"
        );
        assert_eq!(
            nbd_unix_uri("a b", Path::new("/tmp/my dir/p&q.sock")),
            "nbd+unix:///a%20b?socket=/tmp/my%20dir/p%26q.sock"
        );
    }

    #[test]
    fn placeholder_becomes_one_shell_word_wherever_it_stands() {
        let uri = "nbd+unix:///data?socket=/tmp/x/plex-1.sock";
        assert_eq!(
            substitute_uri("nbdinfo {uri}", uri),
            format!("nbdinfo '{uri}'")
        );
        assert_eq!(substitute_uri("a {uri} && b {uri}", "v"), "a v && b v");
        assert_eq!(substitute_uri(r"echo \{uri}", "v"), r"echo \{uri}");
        // Whatever quotes surround it, the shell sees exactly the value.
        for value in [uri, "it's", r#"a "b" $c `d` \e"#, "*?"] {
            for cmd in [
                "printf %s {uri}",
                "printf %s '{uri}'",
                "printf %s \"{uri}\"",
                "printf %s x{uri}y",
            ] {
                let want = if cmd.contains('x') {
                    format!("x{value}y")
                } else {
                    value.to_string()
                };
                assert_eq!(sh(&substitute_uri(cmd, value)), want, "{cmd} with {value}");
            }
        }
    }

    #[test]
    fn exec_must_name_the_uri() {
        assert!(check_exec("nbdinfo {uri}").is_ok());
        assert!(check_exec("nbdinfo \"$MIRRORVOL_URI\"").is_ok());
        assert_eq!(check_exec("true").unwrap_err().exit_code(), 2);
        assert_eq!(check_exec("").unwrap_err().exit_code(), 2);
    }

    #[test]
    fn verdicts_find_the_majority() {
        assert_eq!(verdict(&[1, 1, 1]), None);
        assert_eq!(
            verdict(&[1, 2, 1]),
            Some(Verdict {
                groups: vec![vec![0, 2], vec![1]],
                majority: Some(0),
                checksum: false,
            })
        );
        assert_eq!(verdict(&[1, 2]).unwrap().majority, None);
        assert_eq!(verdict(&[1, 2, 3]).unwrap().majority, None);
    }

    #[test]
    fn checksums_decide_over_votes_and_a_copy_known_bad_never_wins() {
        // Two plexes: the second matches its checksum, the first fails it.
        let v = verdict(&[1, 2])
            .unwrap()
            .by_checksums(&[Some(false), Some(true)]);
        assert_eq!((v.majority, v.checksum), (Some(1), true));
        // Three: the majority fails its checksum, nothing is known good.
        let v = verdict(&[1, 1, 2])
            .unwrap()
            .by_checksums(&[Some(false), None, None]);
        assert_eq!((v.majority, v.checksum), (None, false));
        // Nothing known: the votes stand.
        let v = verdict(&[1, 1, 2])
            .unwrap()
            .by_checksums(&[None, None, None]);
        assert_eq!((v.majority, v.checksum), (Some(0), false));
    }

    #[test]
    fn equal_neighbouring_verdicts_merge_into_one_range() {
        let v = verdict(&[1, 2, 1]);
        let mut r = Ranges::default();
        r.block(0, 512, None);
        r.block(512, 1024, v.clone());
        r.block(1024, 1536, v.clone());
        r.block(1536, 2048, None);
        r.block(2048, 2560, v.clone());
        r.block(2560, 3072, verdict(&[1, 1, 2]));
        let got: Vec<(u64, u64)> = r.finish().iter().map(|x| (x.0, x.1)).collect();
        assert_eq!(got, vec![(512, 1536), (2048, 2560), (2560, 3072)]);
    }

    #[test]
    fn a_dropped_plex_leaves_the_ranges_as_if_never_compared() {
        // Plexes 0..4; content per block, then the same without plex 3.
        let blocks: [[u8; 4]; 5] = [
            [1, 1, 2, 2],
            [1, 1, 1, 2],
            [1, 2, 1, 1],
            [1, 2, 1, 2],
            [3, 1, 2, 3],
        ];
        let mut r = Ranges::default();
        let mut want = Ranges::default();
        for (i, b) in blocks.iter().enumerate() {
            let (s, e) = (i as u64 * 512, (i as u64 + 1) * 512);
            r.block(s, e, verdict(b));
            want.block(s, e, verdict(&b[..3]));
        }
        r.drop_plex(3);
        let (got, want) = (r.finish(), want.finish());
        assert_eq!(got, want);
        assert_eq!(
            got.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
            vec![(0, 512), (1024, 2048), (2048, 2560)]
        );
        assert_eq!(
            verdict(&[1, 2, 3]).unwrap().relabel(&[0, 2, 5]).groups,
            vec![vec![0], vec![2], vec![5]]
        );
    }
}
