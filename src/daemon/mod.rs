//! `serve`: puts the group in service and exports every volume over NBD.
//!
//! The daemon holds the group exclusively (the `flock` on every disk) while
//! it runs: it assembles the group, starts the engine ([`LiveGroup`]),
//! binds every listener, and serves until SIGINT or SIGTERM. Then it stops
//! accepting, stops reading requests, answers every request in flight,
//! flushes every volume, stops the disk queues and returns.
//!
//! Plexes left resyncing (a resync interrupted, `add-mirror` stopped) or
//! stale are resynced in the background while clients do I/O, from their
//! checkpoints ([`LiveGroup::start_resyncs`]).
//!
//! A disk that fails while serving is handled by the engine: its plexes are
//! failed in the config on the surviving disks, and the volumes go on.
//!
//! Other processes reach the group through the control socket
//! ([`control`]; by default `<run dir>/<group-uuid>.sock`), and find it
//! through the pid file `serve` writes next to it ([`crate::group::holder`]).
//! Both go when `serve` stops.
//!
//! With `--metrics HOST:PORT`, Prometheus scrapes the group's states and the
//! disks' I/O statistics at `http://HOST:PORT/metrics` ([`metrics`]).

pub mod control;
pub mod metrics;
pub mod web;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::disk::AlignedBuf;
use crate::group::events::{self, Events};
use crate::group::holder;
use crate::group::live::LiveGroup;
use crate::group::{DiskSet, Group, Lookup};
use crate::nbd::server::{self, Done, Export, Listen, Server};
use crate::nbd::tls::{Tls, TlsMode};
use crate::volume::engine::{EngineOptions, MirrorVolume, Mode, Run};
use crate::volume::resync::ResyncOptions;
use crate::{Error, Result};

/// How long a region must stay idle before its write-intent bit is cleared
/// (between one and two periods; md's bitmap daemon sleeps 5 s too).
pub const BITMAP_CLEAR_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// The address `serve` listens on when none is given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// A volume of the running engine as an NBD export.
struct VolumeExport {
    volume: Arc<MirrorVolume>,
    /// Block status and CACHE ask the plexes' files directly (`lseek`,
    /// `posix_fadvise`), outside the disk queues: they run on this
    /// export's own thread, so a disk slow to answer them holds up those
    /// requests only, never the NBD loop that serves other clients.
    aside: crossbeam_channel::Sender<Box<dyn FnOnce() + Send>>,
}

impl VolumeExport {
    fn new(volume: Arc<MirrorVolume>) -> VolumeExport {
        let (aside, jobs) = crossbeam_channel::unbounded::<Box<dyn FnOnce() + Send>>();
        let name = format!("nbd-aside-{}", volume.name);
        // Ends when the export goes (its sender with it).
        let spawned = std::thread::Builder::new()
            .name(name)
            .spawn(move || jobs.iter().for_each(|job| job()));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread for block status; it runs where it is asked");
        }
        VolumeExport { volume, aside }
    }

    /// Runs `job` on the export's own thread (or here, if it has none).
    fn aside(&self, job: impl FnOnce() + Send + 'static) {
        if let Err(e) = self.aside.send(Box::new(job)) {
            (e.into_inner())();
        }
    }
}

/// The NBD export `serve` makes of a volume of the running engine.
pub fn volume_export(volume: Arc<MirrorVolume>) -> Arc<dyn Export> {
    Arc::new(VolumeExport::new(volume))
}

impl Export for VolumeExport {
    fn name(&self) -> &str {
        &self.volume.name
    }

    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn read(&self, offset: u64, len: usize, done: Done<AlignedBuf>) {
        self.volume.submit_read(offset, len, Run::Queued, done);
    }

    fn write(&self, offset: u64, data: AlignedBuf, fua: bool, done: Done<()>) {
        self.volume
            .submit_write(offset, Arc::new(data), fua, Run::Queued, done);
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, keep: bool, done: Done<()>) {
        self.volume
            .submit_write_zeroes(offset, len, fua, keep, Run::Queued, done);
    }

    fn flush(&self, done: Done<()>) {
        self.volume.submit_client_flush(Run::Queued, done);
    }

    fn fast_zero(&self, keep: bool) -> bool {
        self.volume.zeroes_cheaply(keep)
    }

    fn cache(&self, offset: u64, len: u64, done: Done<()>) {
        let volume = self.volume.clone();
        self.aside(move || done(volume.will_need(offset, len)));
    }

    fn contexts(&self) -> &[&'static str] {
        &[SYNC_CONTEXT]
    }

    fn block_status(&self, which: usize, offset: u64, len: u64, done: Done<Vec<(u64, u32)>>) {
        let volume = self.volume.clone();
        self.aside(move || done(extents(&volume, which, offset, len)));
    }
}

/// The extents of `which` context over a range of `volume`.
fn extents(
    volume: &MirrorVolume,
    which: usize,
    offset: u64,
    len: u64,
) -> std::io::Result<Vec<(u64, u32)>> {
    use crate::nbd::proto::{STATE_HOLE, STATE_ZERO};
    if which == 0 {
        volume.allocation(offset, len).map(|e| {
            e.into_iter()
                .map(|(n, hole)| (n, if hole { STATE_HOLE | STATE_ZERO } else { 0 }))
                .collect()
        })
    } else {
        volume.sync_state(offset, len).map(|(e, degraded)| {
            let all = if degraded { SYNC_DEGRADED } else { 0 };
            e.into_iter()
                .map(|(n, dirty)| (n, all | if dirty { SYNC_DIRTY } else { 0 }))
                .collect()
        })
    }
}

/// The metadata context of mirrorvol's own, besides `base:allocation`:
/// for each extent, [`SYNC_DIRTY`] and [`SYNC_DEGRADED`].
pub const SYNC_CONTEXT: &str = "mirrorvol:dirty";
/// Bit 0 of `mirrorvol:dirty`: a write-intent bit covers the extent (a
/// write went there lately, or a copy still lacks it): a crash or a resync
/// would copy it between the plexes.
pub const SYNC_DIRTY: u32 = 1 << 0;
/// Bit 1 of `mirrorvol:dirty`: the volume has a plex that is not in sync
/// (being rebuilt, or out of service), so the extent may not be on every
/// copy.
pub const SYNC_DEGRADED: u32 = 1 << 1;

/// How `serve` runs.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Claim the group with fewer than a majority of its disks here.
    pub force_claim: bool,
    /// `unix:PATH`, `HOST:PORT` or `PORT`; empty: [`DEFAULT_LISTEN`].
    pub listen: Vec<String>,
    /// Open the disks `O_DIRECT` (where the filesystem allows it).
    pub direct: bool,
    /// Requests each disk serves at once.
    pub disk_threads: usize,
    /// How long any request to a disk may take before the disk is failed.
    pub io_timeout: std::time::Duration,
    /// The same for disks that are NBD exports.
    pub remote_io_timeout: std::time::Duration,
    /// What runs the disks' data requests.
    pub io_engine: crate::volume::queue::IoEngine,
    /// Pacing of the background resyncs.
    pub resync: ResyncOptions,
    /// Scrub every mirror this often, in the background (None: never).
    pub scrub_interval: Option<std::time::Duration>,
    /// Bytes per second a background scrub compares at most.
    pub scrub_rate: u64,
    /// The control socket; None: `<run dir>/<group-uuid>.sock`.
    pub control: Option<PathBuf>,
    /// Run with `sh -c` for every event ([`crate::group::events`]).
    pub on_event: Option<String>,
    /// How long one run of the event hook may take; None: 30 s.
    pub on_event_timeout: Option<std::time::Duration>,
    /// `HOST:PORT` of the Prometheus metrics endpoint; None: no endpoint.
    pub metrics: Option<String>,
    /// The web view; None: none.
    pub http: Option<HttpOptions>,
    /// Rebuild failed plexes onto hot spares without waiting for `repair`.
    pub hot_spares: bool,
    /// What becomes of a remote disk whose connection returns.
    pub remote_return: crate::group::live::RemoteReturn,
    /// How long a remote disk being reconnected keeps its plexes before a
    /// hot spare takes them over.
    pub remote_spare_delay: std::time::Duration,
    /// What NBD clients may take: connections, time, memory.
    pub limits: crate::nbd::server::Limits,
    /// TLS for NBD clients.
    pub tls: TlsOptions,
    /// Listen beyond loopback without requiring TLS.
    pub insecure_listen: bool,
}

/// `serve --http`, `--http-actions`, `--http-token-file` and `--http-allow`.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    /// `HOST:PORT` or `PORT`.
    pub addr: String,
    pub actions: bool,
    /// None: `<run dir>/<group uuid>.http-token`.
    pub token_file: Option<PathBuf>,
    pub allow: Vec<String>,
}

/// `serve --tls-certs`, `--tls` and `--tls-verify-peer`.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// The directory of ca-cert.pem, server-cert.pem and server-key.pem.
    pub certs: Option<PathBuf>,
    /// require, allow or off; None: require with certificates, else off.
    pub mode: Option<String>,
    /// Clients must show a certificate the CA signed.
    pub verify_peer: bool,
}

/// Loads the TLS set-up `options` asks for (None: no TLS), refusing what
/// does not go together.
fn load_tls(options: &TlsOptions) -> Result<Option<Tls>> {
    let mode = match options.mode.as_deref() {
        Some(m) => m.parse::<TlsMode>().map_err(Error::refused)?,
        None if options.certs.is_some() => TlsMode::Require,
        None => TlsMode::Off,
    };
    match (&options.certs, mode) {
        (_, TlsMode::Off) => Ok(None),
        (None, _) => Err(Error::refused(
            "--tls require and --tls allow need the certificates: --tls-certs DIR",
        )),
        (Some(dir), mode) => Tls::load(dir, mode, options.verify_peer)
            .map(Some)
            .map_err(Error::refused),
    }
}

/// Whether every address `l` listens on is loopback (or a Unix socket):
/// nobody on the network reaches it.
fn local_only(l: &Listen) -> bool {
    match l {
        Listen::Unix(_) => true,
        Listen::Tcp(addr) => std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
            .map(|mut a| a.all(|a| a.ip().is_loopback()))
            .unwrap_or(false),
    }
}

/// How long `serve` waits at its stop for the event hook to run the events
/// still queued.
pub const EVENT_HOOK_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The variable naming what a command (`serve` above all) logs to stderr: a tracing env-filter
/// (`info`, `warn`, `mirrorvol=debug`). Unset, nothing is logged.
pub const LOG_ENV: &str = "MIRRORVOL_LOG";

/// Sends the log (events included) to stderr, if [`LOG_ENV`] asks for it.
pub fn start_log() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env(LOG_ENV) {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Runs `serve` until SIGINT or SIGTERM.
pub fn serve(disks: &[PathBuf], options: &ServeOptions) -> Result<()> {
    start_log();
    // Fault points named in FAILPOINTS (built with the feature only).
    #[cfg(feature = "failpoints")]
    let _fault_points = fail::FailScenario::setup();
    let (listen, direct, disk_threads) = (&options.listen, options.direct, options.disk_threads);
    let resync = options.resync.clone();
    let listen: Vec<Listen> = if listen.is_empty() {
        vec![Listen::parse(DEFAULT_LISTEN).expect("the default parses")]
    } else {
        listen
            .iter()
            .map(|s| Listen::parse(s).map_err(Error::refused))
            .collect::<Result<_>>()?
    };
    if disks.is_empty() {
        return Err(Error::refused(
            "no disks given: name the group's disks with --disks or MIRRORVOL_DISKS",
        ));
    }
    let tls = load_tls(&options.tls)?;
    let tls_required = tls.as_ref().is_some_and(|t| t.required());
    if let Some(open) = listen.iter().find(|l| !local_only(l)) {
        if !tls_required && !options.insecure_listen {
            return Err(Error::refused(format!(
                "listening on {open} would let anyone on the network read and write every volume: require TLS (--tls-certs DIR) or say --insecure-listen"
            )));
        }
        if !tls_required {
            eprintln!(
                "warning: listening on {open} without requiring TLS: anyone who reaches it can read and write every volume"
            );
        }
    }
    let hook_timeout = options
        .on_event_timeout
        .unwrap_or(events::DEFAULT_HOOK_TIMEOUT);
    let events = Events::start(options.on_event.clone().map(|command| events::Hook {
        command,
        timeout: hook_timeout,
    }));
    // Signals first, so a SIGTERM during start-up still shuts down cleanly.
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| Error::io("cannot install signal handlers", e))?;

    // Bind before assembling: a taken address is refused before any disk
    // is opened.
    let mut bound = Vec::new();
    for l in &listen {
        match server::bind(l) {
            Ok(b) => bound.push(b),
            Err(e) => {
                cleanup(&bound);
                return Err(match e {
                    server::BindError::InUse(_) => Error::refused(e.to_string()),
                    server::BindError::Other(_, _) => Error::failed(e.to_string()),
                });
            }
        }
    }
    let metrics_listener = match options.metrics.as_deref().map(metrics::bind).transpose() {
        Ok(l) => l,
        Err(e) => {
            cleanup(&bound);
            return Err(e);
        }
    };
    let web_listener = match options
        .http
        .as_ref()
        .map(|h| bind_web(&h.addr, options.insecure_listen))
        .transpose()
    {
        Ok(l) => l,
        Err(e) => {
            cleanup(&bound);
            return Err(e);
        }
    };

    // Set when the claim fences itself: serve stops, and says why.
    let fenced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let assembled = (|| -> Result<Group> {
        let set = DiskSet::expand(
            disks,
            crate::group::DiskOpen {
                direct,
                // --cache decides, for devices as for files.
                devices_direct: false,
                threads: disk_threads,
                timeout: options.io_timeout,
                remote_timeout: options.remote_io_timeout,
                engine: options.io_engine,
                shared: false,
            },
        )?;
        let mut group = crate::group::claim::claim_assembled(
            || {
                let group = Group::assemble(&set, Lookup::Required)?.expect("required");
                // A split group is not served at all: which side's data a
                // client would see is the admin's choice
                // (`resolve-split-brain`).
                if let Err(e) = group.refuse_split() {
                    if let Some(event) = events::split_brain_event(&group, &e.to_string()) {
                        events.emit(event);
                    }
                    return Err(e);
                }
                Ok(group)
            },
            &crate::group::claim::ClaimOptions {
                force: options.force_claim,
                command: "serve".into(),
                interval: crate::group::claim::DEFAULT_INTERVAL,
                reads_only: false,
                eager: true,
                silent: Vec::new(),
            },
        )?;
        if let Some(claim) = &group.claim {
            let fenced = fenced.clone();
            claim.on_fence(Box::new(move || {
                fenced.store(true, std::sync::atomic::Ordering::SeqCst);
                // SAFETY: kill(2) with our own pid and a signal that the
                // handler installed above turns into a clean stop.
                unsafe {
                    libc::kill(libc::getpid(), SIGTERM);
                }
            }));
        }
        group.record_absent_plexes()?;
        // Regions an unclean stop left dirty are resynced before the first
        // client connects.
        group.start_bitmaps()?;
        for w in group.warnings.split_off(0) {
            eprintln!("warning: {w}");
        }
        Ok(group)
    })();
    let group = match assembled {
        Ok(g) => g,
        Err(e) => {
            cleanup(&bound);
            // The hook learns why (split-brain) before serve exits.
            events.shutdown(hook_timeout + std::time::Duration::from_secs(1));
            return Err(e);
        }
    };

    let live = LiveGroup::start(group, EngineOptions::default());
    live.set_events(events.clone());
    live.start_bitmap_clearing(BITMAP_CLEAR_PERIOD);
    // Plexes left resyncing or stale are resynced while clients do I/O.
    live.start_resyncs(resync);
    // A replacement whose copies were all in sync when serve last stopped.
    for line in live.finish_replacements() {
        eprintln!("{line}");
    }
    // Remote disks to reconnect are known before spares are looked for:
    // those get a grace first.
    live.set_remote_return(options.remote_return);
    if options.hot_spares {
        live.enable_hot_spares(options.remote_spare_delay);
    }
    if let Some(every) = options.scrub_interval {
        live.start_scrubs(every, options.scrub_rate);
    }
    let names = live.volume_names();
    let exports: Vec<Arc<dyn Export>> = names.iter().filter_map(|n| export(&live, n)).collect();
    let server = Arc::new(Server::with_tls(exports, options.limits, tls));
    let handler = control_handler(&live, &server);
    let control = match start_control(&live, handler.clone(), options) {
        Ok(c) => c,
        Err(e) => {
            cleanup(&bound);
            live.stop();
            return Err(e);
        }
    };
    let metrics = match metrics_listener
        .map(|l| metrics::MetricsEndpoint::start(l, metrics::scrape(&live, &server)))
        .transpose()
    {
        Ok(m) => m,
        Err(e) => {
            cleanup(&bound);
            live.stop();
            return Err(e);
        }
    };
    if let Some(m) = &metrics {
        eprintln!("metrics on http://{}/metrics", m.addr());
    }
    let web = match (web_listener, &options.http) {
        (Some(l), Some(h)) => match start_web(&live, l, handler, events.clone(), h) {
            Ok(w) => Some(w),
            Err(e) => {
                cleanup(&bound);
                drop(control);
                drop(metrics);
                live.stop();
                return Err(e);
            }
        },
        _ => None,
    };
    let count = names.len();
    for b in bound {
        let addr = b.describe();
        server.serve(b);
        eprintln!(
            "serving {count} volume{} ({}) on {addr}",
            if count == 1 { "" } else { "s" },
            names.join(", ")
        );
    }

    // SIGINT or SIGTERM: stop.
    let _ = signals.forever().next();

    eprintln!("stopping: finishing the requests in flight");
    // No operation starts once the socket is gone.
    drop(control);
    drop(metrics);
    drop(web);
    server.shutdown();
    // Resyncs stop after recording their checkpoints; the next start resumes.
    live.stop_resyncs();
    let mut failed = Vec::new();
    for n in &live.volume_names() {
        let Some(v) = live.volume(n) else { continue };
        // A failed volume has no copy left to flush; its failure was
        // reported when it happened, and is no failure of the stop.
        if v.plexes().iter().all(|p| p.mode() == Mode::Out) {
            eprintln!("warning: volume {n} is failed: nothing of it to flush");
            continue;
        }
        // Writes still behind (answered, on their way to a write-behind
        // plex) land first, so the flush covers them and the stop is
        // clean; each within its disk's deadline.
        v.wait_idle();
        if let Err(e) = v.flush() {
            failed.push(format!("{n}: {e}"));
        }
    }
    if failed.is_empty() {
        // A clean stop leaves no dirty region where the plexes are in sync.
        live.clear_bitmaps(true);
    }
    live.stop();
    events.shutdown(EVENT_HOOK_STOP_WAIT);
    if fenced.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Error::failed(
            "the group's claim could not be renewed on a majority of its disks: serve fenced itself and stopped (another host may hold the group now)",
        ));
    }
    if !failed.is_empty() {
        return Err(Error::io(
            format!(
                "flushing volumes on shutdown failed ({})",
                failed.join("; ")
            ),
            io::Error::other("flush failed"),
        ));
    }
    eprintln!("stopped; every volume is flushed");
    Ok(())
}

/// Binds the control socket and records the daemon in the run directory.
/// Without `--control`, a run directory that cannot be written (no root)
/// costs only the socket, with a warning.
fn start_control(
    live: &Arc<LiveGroup>,
    handler: control::Handler,
    options: &ServeOptions,
) -> Result<Option<control::ControlSocket>> {
    let group = live.with_group(|g| g.config.uuid)?;
    let path = options
        .control
        .clone()
        .unwrap_or_else(|| holder::default_socket(group));
    let mut sock = match control::ControlSocket::bind(&path, handler) {
        Ok(s) => s,
        Err(e) if options.control.is_none() && !matches!(e, Error::Refused(_)) => {
            eprintln!("warning: no control socket ({e}); online commands are unavailable");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let pid_file = holder::pid_file(group);
    let text = holder::pid_file_text(std::process::id(), &path);
    let written = pid_file
        .parent()
        .map_or(Ok(()), |d| {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
        })
        .and_then(|()| std::fs::write(&pid_file, text));
    match written {
        Ok(()) => sock.remove_with(pid_file),
        Err(e) => eprintln!(
            "warning: cannot write {} ({e}); other processes will not find the control socket unless it is at its default path",
            pid_file.display()
        ),
    }
    eprintln!("control socket on {}", path.display());
    Ok(Some(sock))
}

/// `resync NAME [--pause|--resume|--cancel] [--rate RATE]`: the rate first,
/// so a resume starts at the new rate.
fn resync_control(
    live: &LiveGroup,
    name: &str,
    action: Option<String>,
    rate: Option<u64>,
) -> Result<control::Response> {
    use crate::group::live::ResyncControl;
    let ask = match action.as_deref() {
        None => None,
        Some("pause") => Some(ResyncControl::Pause),
        Some("resume") => Some(ResyncControl::Resume),
        Some("cancel") => Some(ResyncControl::Cancel),
        Some(other) => {
            return Err(Error::refused(format!(
                "there is no resync action {other}: pause, resume or cancel"
            )));
        }
    };
    if ask.is_none() && rate.is_none() {
        return Err(Error::refused(format!(
            "say what to do with the resync of volume {name}: --pause, --resume, --cancel or --rate RATE"
        )));
    }
    // The action first: when it is refused, no rate is left behind (a
    // resync it resumes takes the rate at its next chunk).
    let mut said = Vec::new();
    if let Some(a) = ask {
        said.push(live.control_resync(name, a)?);
    }
    if let Some(r) = rate {
        said.push(live.control_resync(name, ResyncControl::Rate(r))?);
    }
    Ok(control::Response::message(said.join("\n")))
}

/// What answers the control socket's requests (and the web view's).
fn control_handler(live: &Arc<LiveGroup>, server: &Arc<Server>) -> control::Handler {
    let me = Arc::downgrade(live);
    let server = Arc::downgrade(server);
    Arc::new(
        move |request, caller| match (me.upgrade(), server.upgrade()) {
            (Some(live), Some(server)) => handle(&live, &server, request, caller),
            _ => control::Response::from_error(&Error::refused("mirrorvol serve is stopping")),
        },
    )
}

/// Binds the web view's address: loopback unless `insecure` (the page
/// shows the group's layout and, with actions, changes it).
fn bind_web(addr: &str, insecure: bool) -> Result<std::net::TcpListener> {
    let listener = metrics::bind_http(addr, "the web view")?;
    let ip = listener.local_addr().map(|a| a.ip());
    if !insecure && !ip.is_ok_and(|ip| ip.is_loopback()) {
        return Err(Error::refused(format!(
            "serving the web view on {addr} would show the group to anyone on the network: keep it on the loopback and put a proxy with authentication in front (see the README), or say --insecure-listen"
        )));
    }
    Ok(listener)
}

/// Starts the web view, with its token file next to the control socket
/// unless named.
fn start_web(
    live: &Arc<LiveGroup>,
    listener: std::net::TcpListener,
    handler: control::Handler,
    events: Events,
    options: &HttpOptions,
) -> Result<web::WebView> {
    let group = live.with_group(|g| g.config.uuid)?;
    let token_file = options
        .token_file
        .clone()
        .unwrap_or_else(|| holder::run_dir().join(format!("{group}.http-token")));
    let view = web::WebView::start(
        listener,
        handler,
        events,
        &web::WebOptions {
            actions: options.actions,
            token_file: token_file.clone(),
            allow: options.allow.clone(),
            io_timeout: None,
        },
    )?;
    eprintln!("web view on http://{}/", view.addr());
    if options.actions {
        eprintln!(
            "web view actions: open http://{}/?token=TOKEN with the token in {} (mode 0600)",
            view.addr(),
            token_file.display()
        );
    }
    Ok(view)
}

/// The NBD export of a volume in service.
fn export(live: &LiveGroup, name: &str) -> Option<Arc<dyn Export>> {
    live.volume(name)
        .map(|v| Arc::new(VolumeExport::new(v)) as Arc<dyn Export>)
}

/// Exports a volume that came into service while serving.
fn add_export(live: &LiveGroup, server: &Server, name: &str) {
    if let Some(e) = export(live, name) {
        server.add_export(e);
        eprintln!("exporting volume {name}");
    }
}

/// An operation's answer: its message and warnings.
fn done(d: crate::group::live::Done) -> control::Response {
    control::Response {
        warnings: d.warnings,
        ..control::Response::message(d.message)
    }
}

/// Refuses to write onto a volume NBD clients are using.
fn refuse_clients(server: &Server, name: &str, doing: &str) -> Result<()> {
    match server.clients(name) {
        0 => Ok(()),
        n => Err(Error::refused(format!(
            "volume {name} has {n} NBD client{} connected; disconnect {} before {doing}",
            if n == 1 { "" } else { "s" },
            if n == 1 { "it" } else { "them" }
        ))),
    }
}

/// Runs one control request on the live group.
fn handle(
    live: &Arc<LiveGroup>,
    server: &Server,
    request: control::Request,
    caller: &control::Caller,
) -> control::Response {
    let Some(line) = request.command_line() else {
        return handle_request(live, server, request, caller);
    };
    let response = handle_request(live, server, request, caller);
    // Done: recorded in the history (a refused request is not).
    if response.ok {
        let actor =
            crate::group::history::Actor::peer(format!("{line} ({})", caller.via), caller.uid);
        live.record_history(actor);
    }
    response
}

fn handle_request(
    live: &Arc<LiveGroup>,
    server: &Server,
    request: control::Request,
    caller: &control::Caller,
) -> control::Response {
    use control::{Request, Response};
    let result = match request {
        Request::Iostat => Ok(Response {
            ok: true,
            report: Some(metrics::iostat(live)),
            ..Response::default()
        }),
        Request::History => live.with_group(|g| g.config.history.clone()).map(|h| Response {
            ok: true,
            report: Some(serde_json::to_value(&h).expect("the history serializes")),
            text: Some(crate::group::history::text(&h)),
            ..Response::default()
        }),
        Request::Status => {
            let mut report = match live.status() {
                Ok(r) => r,
                Err(e) => return Response::from_error(&e),
            };
            for v in &mut report.volumes {
                v.clients = Some(server.clients(&v.name));
            }
            Ok(Response {
                ok: true,
                status: Some(serde_json::to_value(&report).expect("status serializes")),
                text: Some(crate::group::show::status_text(&report)),
                ..Response::default()
            })
        }
        Request::Fail { path, force } => live.fail_disk_by_path(&path, force).map(done),
        Request::Reactivate { path } => live.reactivate_by_path(&path).map(done),
        Request::SetDisk { path, set } => live.set_disk_by_path(&path, set).map(done),
        Request::Create {
            name,
            size,
            copies,
            disks,
        } => live.create_volume(&name, size, copies, &disks).map(|d| {
            add_export(live, server, &name);
            done(d)
        }),
        Request::AddMirror { name, disk } => live.add_mirror(&name, disk.as_deref()).map(done),
        Request::RemoveMirror { name, disk } => live.remove_mirror(&name, &disk).map(done),
        Request::RemoveDisk { path } => live.remove_disk(&path).map(done),
        Request::Replace {
            path,
            cancel: true,
            ..
        } => live.cancel_replace(&path).map(done),
        Request::Replace {
            path,
            new: Some(new),
            ..
        } => live.replace(&path, &new).map(done),
        Request::Replace { path, .. } => Err(Error::refused(format!(
            "say what to replace disk {} by (NEW), or --cancel",
            path.display()
        ))),
        Request::Break {
            name,
            disk,
            new_name,
            nokeep,
        } => live
            .break_mirror(&name, &disk, new_name.as_deref(), nokeep)
            .map(|(kept, d)| {
                if let Some(n) = kept {
                    add_export(live, server, &n);
                }
                done(d)
            }),
        Request::Repair { name, disk } => live.repair(&name, disk.as_deref()).map(done),
        Request::Extend { name, size } => live
            .extend(&name, size)
            .map(|mut d| {
                // NBD fixes the size at the handshake.
                d.message
                    .push_str("; connected clients see the new size when they reconnect");
                d
            })
            .map(done),
        Request::Delete { name, force } => delete(live, server, &name, force),
        Request::Copy { src, dst, rate } => {
            use crate::group::ops::{Endpoint, human};
            let (s, d) = (Endpoint::parse(&src), Endpoint::parse(&dst));
            match &d {
                Endpoint::Volume(n) => refuse_clients(server, n, "copying onto it"),
                Endpoint::Path(_) => Ok(()),
            }
            .and_then(|()| live.copy(&s, &d, rate, &|| caller.gone(), &crate::group::NoProgress))
            .map(|n| Response::message(format!("copied {} from {src} to {dst}", human(n))))
        }
        Request::Resync { name, action, rate } => resync_control(live, &name, action, rate),
        Request::Scrub { name, repair, rate } => {
            live.scrub(&name, repair, rate, &crate::group::NoProgress).map(|r| Response {
                ok: true,
                report: Some(crate::group::scrub::scrub_json(&r)),
                text: Some(crate::group::scrub::scrub_text(&r)),
                ..Response::default()
            })
        }
        Request::Init {
            paths,
            style,
            controller,
            group,
            force,
            spare,
        } => live
            .join(
                &paths,
                &crate::group::ops::InitOptions {
                    style,
                    controller,
                    group,
                    force,
                    region_size: 0,
                    spare,
                },
            )
            .map(done),
        Request::ResolveSplitBrain { keep } => {
            live.with_group(|g| g.config.name.clone()).and_then(|name| {
                Err(Error::refused(format!(
                    "group {name} is not in split brain: mirrorvol serve runs only a group whose disks agree, so there is no side of {} to keep",
                    keep.display()
                )))
            })
        }
    };
    result.unwrap_or_else(|e| Response::from_error(&e))
}

/// `delete` while serving: refused while NBD clients use the volume, unless
/// `force`, which disconnects them (their requests in flight are answered
/// first). The export goes before the volume, so no client connects in
/// between; if the delete fails, the export is back.
fn delete(
    live: &Arc<LiveGroup>,
    server: &Server,
    name: &str,
    force: bool,
) -> Result<control::Response> {
    let n = name.to_string();
    live.with_group(move |g| g.volume(&n).map(|_| ()))??;
    // Removed first: a client negotiating meanwhile is either counted here
    // or turned away (see the server's handshake).
    let removed = server.remove_export(name);
    let clients = server.clients(name);
    if clients > 0 {
        if !force {
            if let Some(x) = removed.clone() {
                server.add_export(x);
            }
            refuse_clients(
                server,
                name,
                "deleting it, or use --force to disconnect them",
            )?;
        }
        server.disconnect(name);
    }
    match live.delete_volume(name) {
        Ok(mut d) => {
            eprintln!("stopped exporting volume {name}");
            if clients > 0 {
                d.message.push_str(&format!(
                    "; disconnected {clients} NBD client{}",
                    if clients == 1 { "" } else { "s" }
                ));
            }
            Ok(done(d))
        }
        Err(e) => {
            if let Some(x) = removed {
                server.add_export(x);
            }
            Err(e)
        }
    }
}

/// Removes the socket files of listeners bound before a failure.
fn cleanup(bound: &[server::Bound]) {
    for b in bound {
        if let server::Bound::Unix(_, p) = b {
            let _ = std::fs::remove_file(p);
        }
    }
}
