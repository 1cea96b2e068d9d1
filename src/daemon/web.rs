//! `serve --http HOST:PORT`: a Disk-Management-style web view of the group.
//!
//! One page: a row per disk with its volumes' plexes drawn as bars at their
//! offsets and sizes, a table of the volumes, the resyncs and scrubs under
//! way with their progress, rate and time left, the daemon's recent events,
//! and alerts. It is drawn on the server from the document `status --json`
//! prints, fetched through the control socket's own handler, so it works
//! with JavaScript off and can never disagree with `status`. With
//! JavaScript on, the page opens a stream of server-sent events (`/live`)
//! on which the server sends the view again whenever it changes (checked
//! every second, and at once on every event).
//!
//! With `--http-actions`, the page also offers break, add mirror, remove
//! mirror, repair, reactivate, fail and scrub. They are POSTs to `/action`
//! carrying a token made at start and kept in a 0600 file; each is first
//! answered with a confirmation naming what it will do, and only the
//! confirmed POST runs it, through the same handler as the CLI's online
//! commands (so it is refused with the CLI's sentence). Loopback is no
//! security boundary: every request whose `Host` (or `Origin`, when sent)
//! is not this server's own is refused, which stops cross-site requests and
//! DNS rebinding; `--http-allow` names a reverse proxy's host.
//!
//! The HTTP side is tiny_http: a few handler threads for pages and actions,
//! and a thread per live stream (at most [`MAX_LIVE`]).

pub mod render;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use self::render::{Offer, esc};
use super::control::{Caller, Handler, Request, Response};
use super::metrics::header;
use crate::group::events::Events;
use crate::{Error, Result};

/// Live streams open at once at most; more are answered 503.
pub const MAX_LIVE: usize = 16;
/// How long a client may take to send a request (or a form) and to take
/// what is sent to it: past it the connection is closed, so a client that
/// stalls holds a handler thread (or a live stream's) that long at most,
/// and `serve` stops within it.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Threads answering pages and actions.
const HANDLERS: usize = 4;
/// A live stream looks for a change this often.
const LIVE_TICK: Duration = Duration::from_secs(1);
/// A live stream with nothing new sends a comment this often, so a client
/// that went away is noticed (and its slot freed) soon.
const KEEP_ALIVE: Duration = Duration::from_secs(3);
/// The largest action form accepted.
const MAX_FORM: usize = 16 << 10;

const STYLE: &str = include_str!("web/style.css");
const SCRIPT: &str = include_str!("web/live.js");

/// How `serve` runs the web view.
#[derive(Debug, Clone, Default)]
pub struct WebOptions {
    /// Offer actions (with the token).
    pub actions: bool,
    /// Where the token is written (mode 0600); removed at stop.
    pub token_file: PathBuf,
    /// More `Host` values (and their `http://`/`https://` origins) to
    /// accept: a reverse proxy's name.
    pub allow: Vec<String>,
    /// None: [`DEFAULT_IO_TIMEOUT`].
    pub io_timeout: Option<Duration>,
}

/// Sets the receive and send timeouts of `listener`'s socket; Linux gives
/// every connection it accepts the same.
fn set_timeouts(listener: &TcpListener, timeout: Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: the descriptor is the listener's, open for the call; the
        // option value is a timeval of the size passed.
        let r = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What every request handler shares.
struct Shared {
    handler: Handler,
    events: Events,
    /// Some when actions are on.
    token: Option<String>,
    /// `Host` values accepted, lower case.
    hosts: Vec<String>,
    /// `Origin` values accepted, lower case.
    origins: Vec<String>,
    stop: AtomicBool,
    live: AtomicUsize,
    /// A live stream with nothing new sends a comment this often.
    keep_alive: Duration,
}

/// The running web view; dropping it stops it and removes the token file.
pub struct WebView {
    http: Arc<tiny_http::Server>,
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Keeps accept(2) waiting (see [`keep_accepting`]); dropping the
    /// sender stops it.
    wake: Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>,
    token_file: Option<PathBuf>,
}

/// tiny_http's accept thread ends at its first error, and the listener's
/// receive timeout (set there so that every accepted connection inherits
/// it) bounds accept(2) too: after that long without a connection, accept
/// fails with EAGAIN and the view would never answer again. A connection
/// to itself every quarter of the timeout keeps accept waiting; tiny_http
/// reads nothing from it and closes it.
fn keep_accepting(addr: SocketAddr, every: Duration, stop: std::sync::mpsc::Receiver<()>) {
    let mut to = addr;
    if addr.ip().is_unspecified() {
        to.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
        if let Err(e) = std::net::TcpStream::connect_timeout(&to, every) {
            tracing::warn!(%to, error = %e, "the web view cannot reach itself");
        }
    }
}

/// A token no one can guess: 256 random bits (two v4 UUIDs, from the
/// operating system's random source), in hex.
fn new_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Writes the token readable by its owner only, over whatever was there.
fn write_token(path: &Path, token: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| {
        Error::failed(format!(
            "cannot write the web view's token to {}: {e}",
            path.display()
        ))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(fail)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    f.write_all(format!("{token}\n").as_bytes()).map_err(fail)
}

/// The `Host` values a browser sends for `addr`: the address itself, and
/// `localhost` for a loopback one; and `allow`.
fn hosts_for(addr: SocketAddr, allow: &[String]) -> Vec<String> {
    let mut hosts = Vec::new();
    if !addr.ip().is_unspecified() {
        hosts.push(addr.to_string());
    }
    if addr.ip().is_loopback() {
        hosts.push(format!("localhost:{}", addr.port()));
    }
    hosts.extend(allow.iter().map(|h| h.to_ascii_lowercase()));
    // Browsers leave out the default port.
    if addr.port() == 80 {
        let bare: Vec<String> = hosts
            .iter()
            .filter_map(|h| h.strip_suffix(":80").map(str::to_string))
            .collect();
        hosts.extend(bare);
    }
    hosts
}

impl WebView {
    /// Serves the view on `listener`; `handler` answers as the control
    /// socket does.
    pub fn start(
        listener: TcpListener,
        handler: Handler,
        events: Events,
        options: &WebOptions,
    ) -> Result<WebView> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("cannot read the web view's address", e))?;
        if addr.ip().is_unspecified() && options.allow.is_empty() {
            return Err(Error::refused(format!(
                "the web view on {addr} cannot tell its own requests from a rebound name's: name the hosts browsers reach it by with --http-allow"
            )));
        }
        let io_timeout = options.io_timeout.unwrap_or(DEFAULT_IO_TIMEOUT);
        set_timeouts(&listener, io_timeout)
            .map_err(|e| Error::io("cannot set the web view's timeouts", e))?;
        let token = options.actions.then(new_token);
        if let Some(t) = &token {
            write_token(&options.token_file, t)?;
        }
        let hosts = hosts_for(addr, &options.allow);
        let origins = hosts
            .iter()
            .flat_map(|h| [format!("http://{h}"), format!("https://{h}")])
            .collect();
        let http = tiny_http::Server::from_listener(listener, None)
            .map(Arc::new)
            .map_err(|e| Error::failed(format!("cannot serve the web view on {addr}: {e}")))?;
        let shared = Arc::new(Shared {
            handler,
            events,
            token,
            hosts,
            origins,
            stop: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            keep_alive: KEEP_ALIVE.min(io_timeout),
        });
        let threads = (0..HANDLERS)
            .map(|i| {
                let (http, shared) = (http.clone(), shared.clone());
                std::thread::Builder::new()
                    .name(format!("web-{i}"))
                    .spawn(move || loop {
                        let request = http.recv();
                        if shared.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        match request {
                            Ok(request) => answer(request, &shared),
                            Err(e) => {
                                tracing::error!(error = %e, "the web view stopped accepting connections");
                                return;
                            }
                        }
                    })
                    .map_err(|e| Error::io("cannot start the web view's threads", e))
            })
            .collect::<Result<Vec<_>>>()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let every = io_timeout / 4;
        let waker = std::thread::Builder::new()
            .name("web-wake".into())
            .spawn(move || keep_accepting(addr, every, rx))
            .map_err(|e| Error::io("cannot start the web view's threads", e))?;
        Ok(WebView {
            http,
            addr,
            shared,
            threads,
            wake: Some((tx, waker)),
            token_file: options.actions.then(|| options.token_file.clone()),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for WebView {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some((tx, waker)) = self.wake.take() {
            drop(tx);
            let _ = waker.join();
        }
        for _ in &self.threads {
            self.http.unblock();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(f) = &self.token_file {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// The headers every answer carries: nothing from elsewhere runs or loads
/// in the page, no page embeds it, and the token in a URL never leaves in
/// a Referer to another site (`same-origin`, not `no-referrer`: with that,
/// browsers send `Origin: null` on the page's own forms).
const SECURITY: [(&str, &str); 5] = [
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
    ("X-Frame-Options", "DENY"),
];

fn respond(request: tiny_http::Request, code: u16, kind: &str, body: String) {
    let mut response = tiny_http::Response::from_string(body)
        .with_status_code(code)
        .with_header(header("Content-Type", kind));
    for (n, v) in SECURITY {
        response.add_header(header(n, v));
    }
    let _ = request.respond(response);
}

const HTML: &str = "text/html; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// The first value of header `name`.
fn header_value<'a>(request: &'a tiny_http::Request, name: &'static str) -> Option<&'a str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

impl Shared {
    /// Refuses a request that names another host, or comes from a page of
    /// another origin.
    fn check(&self, request: &tiny_http::Request) -> std::result::Result<(), String> {
        let hosts = request
            .headers()
            .iter()
            .filter(|h| h.field.equiv("Host"))
            .count();
        if hosts > 1 {
            return Err("refused: the request names more than one host".into());
        }
        let host = header_value(request, "Host")
            .unwrap_or("")
            .to_ascii_lowercase();
        if !self.hosts.contains(&host) {
            return Err(format!(
                "refused: the request is for host \"{host}\", not this server ({}); name a reverse proxy's host with --http-allow",
                self.hosts.join(", ")
            ));
        }
        if let Some(origin) = header_value(request, "Origin") {
            let origin = origin.to_ascii_lowercase();
            if !self.origins.contains(&origin) {
                return Err(format!(
                    "refused: the request comes from a page of {origin}, not of this server"
                ));
            }
        }
        Ok(())
    }

    /// What a request carrying `token` may see.
    fn offer(&self, token: Option<&str>) -> Offer<'_> {
        match (&self.token, token) {
            (None, _) => Offer::Off,
            (Some(t), Some(given)) if same(t, given) => Offer::Actions(t),
            (Some(_), _) => Offer::Locked,
        }
    }

    /// The group's status, as `status --json` prints it.
    fn status(&self) -> std::result::Result<Value, String> {
        let r = (self.handler)(Request::Status, &Caller::web());
        match (r.ok, r.status) {
            (true, Some(s)) => Ok(s),
            _ => Err(r
                .error
                .unwrap_or_else(|| "the group's status is not available".into())),
        }
    }

    /// The recent events, as the hook's JSON lines have them.
    fn events(&self) -> Vec<Value> {
        self.events
            .recent()
            .iter()
            .filter_map(|e| serde_json::from_str(&e.json_line()).ok())
            .collect()
    }

    /// The view (or why there is none).
    fn view(&self, offer: Offer) -> String {
        match self.status() {
            Ok(s) => render::view(&s, &self.events(), offer),
            Err(e) => format!(
                "<section id=\"alerts\"><p class=\"alert bad\">{}</p></section>",
                esc(&e)
            ),
        }
    }

    /// A whole page: the view, with a banner above it.
    fn page(&self, banner: Option<(&str, &str)>, offer: Offer) -> String {
        render::page("mirrorvol", banner, &self.view(offer), offer)
    }
}

/// A URL's path and its decoded query.
fn split_url(url: &str) -> (&str, Vec<(String, String)>) {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let params = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    (path, params)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn answer(mut request: tiny_http::Request, shared: &Arc<Shared>) {
    use tiny_http::Method;
    if let Err(why) = shared.check(&request) {
        return respond(request, 403, TEXT, format!("{why}\n"));
    }
    let url = request.url().to_string();
    let (path, params) = split_url(&url);
    let token = param(&params, "token");
    match (request.method(), path) {
        (Method::Get, "/") => {
            let offer = shared.offer(token);
            let banner = match (offer, token) {
                (Offer::Locked, Some(_)) => Some((
                    "bad",
                    "That token is not this server's: the page stays read-only.",
                )),
                _ => None,
            };
            let page = shared.page(banner, offer);
            respond(request, 200, HTML, page)
        }
        (Method::Get, "/api/status") => match shared.status() {
            Ok(s) => respond(request, 200, JSON, format!("{s:#}\n")),
            Err(e) => respond(request, 503, TEXT, format!("{e}\n")),
        },
        (Method::Get, "/api/events") => {
            let events = Value::Array(shared.events());
            respond(request, 200, JSON, format!("{events:#}\n"))
        }
        (Method::Get, "/static/style.css") => respond(request, 200, "text/css", STYLE.into()),
        (Method::Get, "/static/live.js") => respond(request, 200, "text/javascript", SCRIPT.into()),
        (Method::Get, "/live") => live(request, shared, token.map(str::to_string)),
        (Method::Post, "/unlock") => {
            let form = match read_form(&mut request) {
                Ok(f) => f,
                Err(why) => return respond(request, 400, TEXT, format!("{why}\n")),
            };
            let offer = shared.offer(param(&form, "token"));
            let (code, banner) = match offer {
                Offer::Actions(_) => (200, None),
                Offer::Off => (
                    403,
                    Some((
                        "bad",
                        "Actions are off: serve was started without --http-actions.",
                    )),
                ),
                Offer::Locked => (
                    403,
                    Some((
                        "bad",
                        "That token is not this server's: the page stays read-only.",
                    )),
                ),
            };
            let page = shared.page(banner, offer);
            respond(request, code, HTML, page)
        }
        (Method::Post, "/action") => {
            let form = match read_form(&mut request) {
                Ok(f) => f,
                Err(why) => return respond(request, 400, TEXT, format!("{why}\n")),
            };
            let (code, page) = act(shared, &form);
            respond(request, code, HTML, page)
        }
        (_, "/" | "/api/status" | "/api/events" | "/live" | "/action" | "/unlock") => {
            let why = format!("{} is not allowed on {path}\n", request.method());
            respond(request, 405, TEXT, why)
        }
        _ => respond(request, 404, TEXT, format!("there is no page {path}\n")),
    }
}

/// An action form's fields.
fn read_form(
    request: &mut tiny_http::Request,
) -> std::result::Result<Vec<(String, String)>, String> {
    if request.body_length().is_some_and(|n| n > MAX_FORM) {
        return Err(format!(
            "refused: an action form is at most {MAX_FORM} bytes"
        ));
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_FORM as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("the action form could not be read: {e}"))?;
    if body.len() > MAX_FORM {
        return Err(format!(
            "refused: an action form is at most {MAX_FORM} bytes"
        ));
    }
    Ok(form_urlencoded::parse(&body).into_owned().collect())
}

/// An action the page offers: the control request and the sentence its
/// confirmation shows.
struct Action {
    request: Request,
    /// What it will do, in one sentence.
    what: String,
    /// The confirming button's label.
    label: &'static str,
}

/// The action a form asks for, or why it is malformed.
fn action(form: &[(String, String)]) -> std::result::Result<Action, String> {
    let op = param(form, "op").unwrap_or("");
    let need = |name: &str| {
        param(form, name)
            .map(str::to_string)
            .ok_or_else(|| format!("the action {op} needs a {name}"))
    };
    Ok(match op {
        "break" => {
            let (name, disk) = (need("volume")?, need("disk")?);
            Action {
                what: format!(
                    "Break mirror {name}: its copy on {disk} becomes a simple volume of its own, and {name} keeps its other copies."
                ),
                label: "Break mirror",
                request: Request::Break {
                    name,
                    disk: disk.into(),
                    new_name: param(form, "new_name").map(str::to_string),
                    nokeep: false,
                },
            }
        }
        "add-mirror" => {
            let name = need("volume")?;
            let disk = param(form, "disk").map(str::to_string);
            Action {
                what: format!(
                    "Add a mirror to volume {name} on {}, and copy the volume onto it in the background.",
                    disk.as_deref()
                        .unwrap_or("a disk with room that holds no copy of it")
                ),
                label: "Add mirror",
                request: Request::AddMirror {
                    name,
                    disk: disk.map(Into::into),
                },
            }
        }
        "remove-mirror" => {
            let (name, disk) = (need("volume")?, need("disk")?);
            Action {
                what: format!(
                    "Remove the copy of volume {name} on {disk} and free its space: the data on that copy is gone."
                ),
                label: "Remove mirror",
                request: Request::RemoveMirror {
                    name,
                    disk: disk.into(),
                },
            }
        }
        "repair" => {
            let name = need("volume")?;
            Action {
                what: format!(
                    "Repair volume {name}: its failed or missing copies are rebuilt on new space and its stale copies resynced."
                ),
                label: "Repair volume",
                request: Request::Repair { name, disk: None },
            }
        }
        "reactivate" => {
            let disk = need("disk")?;
            Action {
                what: format!(
                    "Reactivate disk {disk}: it comes back into service and its stale copies are resynced."
                ),
                label: "Reactivate disk",
                request: Request::Reactivate { path: disk.into() },
            }
        }
        "fail" => {
            let disk = need("disk")?;
            Action {
                what: format!(
                    "Fail disk {disk}: its copies leave service and their volumes go on without them until it is reactivated."
                ),
                label: "Fail disk",
                request: Request::Fail {
                    path: disk.into(),
                    force: false,
                },
            }
        }
        "scrub" => {
            let name = need("volume")?;
            Action {
                what: format!(
                    "Scrub volume {name}: compare its copies in the background and report where they differ (nothing is changed)."
                ),
                label: "Scrub volume",
                request: Request::Scrub {
                    name,
                    repair: false,
                    rate: None,
                },
            }
        }
        "" => return Err("the form names no action".into()),
        other => return Err(format!("there is no action {other}")),
    })
}

/// Answers an action form: refused without the token, confirmed first,
/// then run. Returns the HTTP status and the page.
fn act(shared: &Arc<Shared>, form: &[(String, String)]) -> (u16, String) {
    let token = param(form, "token");
    let offer = shared.offer(token);
    let Offer::Actions(valid) = offer else {
        let why = if shared.token.is_none() {
            "Refused: actions are off (serve was started without --http-actions)."
        } else {
            "Refused: the action carries no valid token (open the page with ?token= and the token from the file serve named at its start)."
        };
        return (403, shared.page(Some(("bad", why)), offer));
    };
    let action = match action(form) {
        Ok(a) => a,
        Err(why) => {
            return (
                400,
                shared.page(Some(("bad", &format!("Refused: {why}."))), offer),
            );
        }
    };
    if param(form, "confirm") != Some("yes") {
        return (200, confirmation(&action, form, valid));
    }
    let r: Response = match &action.request {
        Request::Scrub { name, .. } => match scrub(shared, name, action.request.clone()) {
            Some(r) => r,
            None => {
                let banner = format!("Started a scrub of volume {name}; its progress shows below.");
                return (200, shared.page(Some(("ok", &banner)), offer));
            }
        },
        _ => (shared.handler)(action.request, &Caller::web()),
    };
    if r.ok {
        let mut text = r.message.or(r.text).unwrap_or_else(|| "Done.".into());
        for w in &r.warnings {
            text.push_str(&format!(" Warning: {w}"));
        }
        (200, shared.page(Some(("ok", &text)), offer))
    } else {
        let text = format!(
            "Refused: {}",
            r.error
                .unwrap_or_else(|| "the daemon refused the action".into())
        );
        let code = if r.code == Some(2) { 409 } else { 500 };
        (code, shared.page(Some(("bad", &text)), offer))
    }
}

/// Starts a scrub, which runs to its end on a thread of its own: its
/// answer when it ends (or is refused) at once, None once it shows in the
/// status as under way.
fn scrub(shared: &Arc<Shared>, name: &str, request: Request) -> Option<Response> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let runner = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("web-scrub".into())
        .spawn(move || {
            let r = (runner.handler)(request, &Caller::web());
            if let Err(crossbeam_channel::SendError(r)) = tx.send(r)
                && let Some(e) = r.error
            {
                tracing::warn!("the scrub asked for on the web view stopped: {e}");
            }
        });
    if let Err(e) = spawned {
        return Some(Response::from_error(&Error::failed(format!(
            "the scrub of volume {name} could not start: {e}"
        ))));
    }
    let started = Instant::now();
    loop {
        if let Ok(r) = rx.recv_timeout(Duration::from_millis(100)) {
            return Some(r);
        }
        let running = shared.status().ok().is_some_and(|s| {
            s["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v["name"] == name && v["scrub"].is_object())
        });
        if running || started.elapsed() > Duration::from_secs(5) {
            // The answer goes to the log when it comes.
            drop(rx);
            return None;
        }
    }
}

/// The page that asks before an action runs: what it will do, and a form
/// that posts the same fields with `confirm=yes`.
fn confirmation(action: &Action, form: &[(String, String)], token: &str) -> String {
    let mut body = format!(
        "<section id=\"confirm\"><h2>Confirm</h2><p class=\"what\">{}</p><form method=\"post\" action=\"/action\">",
        esc(&action.what)
    );
    for (k, v) in form.iter().filter(|(k, _)| k != "confirm") {
        body.push_str(&format!(
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            esc(k),
            esc(v)
        ));
    }
    let back: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
    body.push_str(&format!(
        "<input type=\"hidden\" name=\"confirm\" value=\"yes\"><button type=\"submit\" id=\"confirm-button\">{}</button> <a href=\"/?token={back}\">Cancel</a></form></section>",
        esc(action.label)
    ));
    render::page("mirrorvol: confirm", None, &body, Offer::Actions(token))
}

/// A stream of server-sent events: `view` with the view's HTML whenever it
/// changes. Runs on a thread of its own until the client goes or the view
/// stops.
fn live(request: tiny_http::Request, shared: &Arc<Shared>, token: Option<String>) {
    if shared.live.fetch_add(1, Ordering::SeqCst) >= MAX_LIVE {
        shared.live.fetch_sub(1, Ordering::SeqCst);
        return respond(
            request,
            503,
            TEXT,
            format!("refused: {MAX_LIVE} live pages are open already\n"),
        );
    }
    let shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("web-live".into())
        .spawn(move || {
            stream(request, &shared, token.as_deref());
            shared.live.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread for a live page");
    }
}

fn stream(request: tiny_http::Request, shared: &Shared, token: Option<&str>) {
    let offer = shared.offer(token);
    let watch = shared.events.watch();
    let mut out = request.into_writer();
    let mut head =
        String::from("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n");
    for (n, v) in SECURITY {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\nretry: 2000\n\n");
    if out
        .write_all(head.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        return;
    }
    let mut last = String::new();
    let mut sent = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        let view = shared.view(offer);
        let message = if view != last {
            let mut m = String::from("event: view\n");
            // A carriage return would end an event's line early.
            for line in view.replace('\r', " ").lines() {
                m.push_str("data: ");
                m.push_str(line);
                m.push('\n');
            }
            m.push('\n');
            last = view;
            Some(m)
        } else if sent.elapsed() >= shared.keep_alive {
            Some(": still here\n\n".to_string())
        } else {
            None
        };
        if let Some(m) = message {
            if out
                .write_all(m.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
            {
                return;
            }
            sent = Instant::now();
        }
        match watch.events.recv_timeout(LIVE_TICK) {
            Ok(_) => while watch.events.try_recv().is_ok() {},
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// The web view's threads, for tests that count them.
#[cfg(test)]
fn live_count(view: &WebView) -> usize {
    view.shared.live.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn hosts_are_the_bound_address_and_localhost_on_loopback() {
        let a: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            hosts_for(a, &["Mirrors.Example.com".into()]),
            ["127.0.0.1:8080", "localhost:8080", "mirrors.example.com"]
        );
        let b: SocketAddr = "[::1]:81".parse().unwrap();
        assert_eq!(hosts_for(b, &[]), ["[::1]:81", "localhost:81"]);
        let c: SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert_eq!(hosts_for(c, &[]), ["10.0.0.1:80", "10.0.0.1"]);
        let d: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(hosts_for(d, &["nas:8080".into()]), ["nas:8080"]);
    }

    #[test]
    fn tokens_are_long_random_and_compared_whole() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(same(&a, &a.clone()));
        assert!(!same(&a, &b));
        assert!(!same(&a, &a[..63]));
    }

    #[test]
    fn the_token_file_is_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/t");
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        std::fs::write(&path, "old").unwrap();
        write_token(&path, "abc").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "abc\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn actions_are_read_from_forms_and_malformed_ones_refused() {
        let form = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let a = action(&form(&[
            ("op", "break"),
            ("volume", "data"),
            ("disk", "/d/b"),
        ]))
        .unwrap();
        assert_eq!(
            a.request,
            Request::Break {
                name: "data".into(),
                disk: "/d/b".into(),
                new_name: None,
                nokeep: false
            }
        );
        assert!(a.what.contains("/d/b") && a.what.contains("data"));
        let a = action(&form(&[
            ("op", "add-mirror"),
            ("volume", "data"),
            ("disk", ""),
        ]))
        .unwrap();
        assert_eq!(
            a.request,
            Request::AddMirror {
                name: "data".into(),
                disk: None
            }
        );
        assert_eq!(
            action(&form(&[("op", "break"), ("volume", "data")]))
                .err()
                .unwrap(),
            "the action break needs a disk"
        );
        assert_eq!(
            action(&form(&[("op", "format-c")])).err().unwrap(),
            "there is no action format-c"
        );
        assert_eq!(
            action(&form(&[])).err().unwrap(),
            "the form names no action"
        );
    }

    #[test]
    fn a_url_splits_into_path_and_decoded_query() {
        let (path, params) = split_url("/live?token=a%2Bb&x=");
        assert_eq!(path, "/live");
        assert_eq!(param(&params, "token"), Some("a+b"));
        assert_eq!(param(&params, "x"), None);
        assert_eq!(split_url("/").0, "/");
    }

    /// A view over a handler that reports a fixed status, on a loopback
    /// port, with actions on.
    fn running(actions: bool) -> (WebView, tempfile::TempDir, Arc<Mutex<Vec<Request>>>) {
        let dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let handler: Handler = Arc::new(move |r: Request, _: &Caller| {
            log.lock().unwrap().push(r.clone());
            match r {
                Request::Status => Response {
                    ok: true,
                    status: Some(serde_json::json!({
                        "group": {"name": "g", "uuid": "u", "seqno": 1},
                        "disks": [], "volumes": []
                    })),
                    ..Response::default()
                },
                Request::Fail { path, .. } => Response::from_error(&Error::refused(format!(
                    "disk {} is not in the group",
                    path.display()
                ))),
                _ => Response::message("done it"),
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let view = WebView::start(
            listener,
            handler,
            Events::start(None),
            &WebOptions {
                actions,
                token_file: dir.path().join("token"),
                allow: Vec::new(),
                io_timeout: Some(Duration::from_millis(500)),
            },
        )
        .unwrap();
        (view, dir, seen)
    }

    /// One HTTP/1.0 exchange: the status code and the body.
    fn http(addr: SocketAddr, request: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let code = answer[9..12].parse().unwrap();
        let body = answer.split_once("\r\n\r\n").unwrap().1.to_string();
        (code, body)
    }

    fn post(addr: SocketAddr, host: &str, origin: &str, body: &str) -> (u16, String) {
        http(
            addr,
            &format!(
                "POST /action HTTP/1.0\r\nHost: {host}\r\nOrigin: {origin}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
    }

    #[test]
    fn other_hosts_and_origins_are_refused_and_actions_need_the_token() {
        let (view, dir, seen) = running(true);
        let addr = view.addr();
        let me = addr.to_string();
        let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
        let token = token.trim();
        let (code, body) = http(addr, &format!("GET / HTTP/1.0\r\nHost: {me}\r\n\r\n"));
        assert_eq!(code, 200);
        assert!(
            body.contains("Read-only") && !body.contains("form class=\"act\""),
            "{body}"
        );
        // The unlock form: the token in a post, not in the address.
        let unlock = |t: &str| {
            let form = format!("token={t}");
            http(
                addr,
                &format!(
                    "POST /unlock HTTP/1.0\r\nHost: {me}\r\nContent-Length: {}\r\n\r\n{form}",
                    form.len()
                ),
            )
        };
        let (code, body) = unlock(token);
        assert_eq!(code, 200);
        assert!(body.contains(&format!("data-token=\"{token}\"")), "{body}");
        let (code, body) = unlock("nope");
        assert_eq!(code, 403);
        assert!(body.contains("not this server") && !body.contains("data-token"));
        // DNS rebinding: a name that resolves here, but is not this server.
        let (code, body) = http(addr, "GET / HTTP/1.0\r\nHost: evil.example:80\r\n\r\n");
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("evil.example"));
        let fail = format!("token={token}&op=fail&disk=%2Fd%2Fa&confirm=yes");
        // A cross-site form: another origin, even with the token.
        let (code, _) = post(addr, &me, "http://evil.example", &fail);
        assert_eq!(code, 403);
        // No token, or a wrong one.
        let (code, body) = post(
            addr,
            &me,
            &format!("http://{me}"),
            "op=fail&disk=x&confirm=yes",
        );
        assert_eq!(code, 403);
        assert!(body.contains("no valid token"));
        let (code, _) = post(
            addr,
            &me,
            &format!("http://{me}"),
            "token=00&op=fail&disk=x&confirm=yes",
        );
        assert_eq!(code, 403);
        assert_eq!(
            seen.lock()
                .unwrap()
                .iter()
                .filter(|r| **r != Request::Status)
                .count(),
            0
        );
        // Unconfirmed: the confirmation, and nothing done.
        let ask = format!("token={token}&op=break&volume=data&disk=%2Fd%2Fb");
        let (code, body) = post(
            addr,
            &me,
            &format!("http://localhost:{}", addr.port()),
            &ask,
        );
        assert_eq!(code, 200);
        assert!(
            body.contains("Break mirror data: its copy on /d/b becomes"),
            "{body}"
        );
        assert!(body.contains("name=\"confirm\" value=\"yes\""));
        assert_eq!(
            seen.lock()
                .unwrap()
                .iter()
                .filter(|r| **r != Request::Status)
                .count(),
            0
        );
        // Confirmed: run, and the handler's refusal shown as it is.
        let (code, body) = post(
            addr,
            &me,
            &format!("http://{me}"),
            &format!("{ask}&confirm=yes"),
        );
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("done it"));
        let (code, body) = post(addr, &me, &format!("http://{me}"), &fail);
        assert_eq!(code, 409);
        assert!(
            body.contains("Refused: disk /d/a is not in the group"),
            "{body}"
        );
        let acted: Vec<Request> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| **r != Request::Status)
            .cloned()
            .collect();
        assert_eq!(acted.len(), 2, "{acted:?}");
        drop(view);
        assert!(
            !dir.path().join("token").exists(),
            "the token goes with the view"
        );
    }

    /// With nobody connecting for longer than the I/O timeout (which also
    /// bounds accept), the view still answers: it died there once.
    #[test]
    fn the_view_answers_after_a_quiet_spell_longer_than_its_timeout() {
        let (view, _dir, _) = running(false);
        let addr = view.addr();
        let me = addr.to_string();
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(1300));
            let (code, _) = http(
                addr,
                &format!("GET /api/status HTTP/1.0\r\nHost: {me}\r\n\r\n"),
            );
            assert_eq!(code, 200);
        }
    }

    #[test]
    fn without_actions_there_is_no_token_and_posts_are_refused() {
        let (view, dir, seen) = running(false);
        let addr = view.addr();
        assert!(!dir.path().join("token").exists());
        let me = addr.to_string();
        let (code, body) = post(
            addr,
            &me,
            &format!("http://{me}"),
            "token=&op=repair&volume=v&confirm=yes",
        );
        assert_eq!(code, 403);
        assert!(body.contains("actions are off"));
        assert!(seen.lock().unwrap().iter().all(|r| *r == Request::Status));
        let (code, body) = http(
            addr,
            &format!("GET /api/status HTTP/1.0\r\nHost: {me}\r\n\r\n"),
        );
        assert_eq!(code, 200);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["group"]["name"],
            "g"
        );
        let (code, _) = http(
            addr,
            &format!("GET /nothing HTTP/1.0\r\nHost: {me}\r\n\r\n"),
        );
        assert_eq!(code, 404);
        let (code, _) = http(addr, &format!("DELETE / HTTP/1.0\r\nHost: {me}\r\n\r\n"));
        assert_eq!(code, 405);
    }

    #[test]
    fn a_live_stream_sends_the_view_and_ends_with_its_client() {
        let (view, _dir, _) = running(false);
        let addr = view.addr();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET /live HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("</section>\n\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "the stream ended early: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("Content-Type: text/event-stream"), "{text}");
        assert!(
            text.contains("event: view\ndata: <p class=\"group\">Group <b>g</b>"),
            "{text}"
        );
        assert_eq!(live_count(&view), 1);
        assert_eq!(view.shared.events.watchers(), 1);
        drop(s);
        // The stream notices its client gone at a keep-alive's write, and
        // gives back its slot and its watch of the events.
        let start = Instant::now();
        while live_count(&view) > 0 || view.shared.events.watchers() > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the stream outlived its client"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn clients_that_stall_do_not_hold_the_view() {
        let (view, _dir, _) = running(true);
        let addr = view.addr();
        // A stalled body for each handler thread, and a stalled request.
        let stalled: Vec<std::net::TcpStream> = (0..HANDLERS + 1)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                write!(
                    s,
                    "POST /action HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 5000\r\n\r\nop="
                )
                .unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        // Answered once the stalled ones time out (500 ms here).
        let start = Instant::now();
        let (code, _) = http(addr, &format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n"));
        assert_eq!(code, 200);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        // And the view stops without waiting for them.
        let start = Instant::now();
        drop(view);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        drop(stalled);
    }

    #[test]
    fn a_wildcard_address_needs_the_hosts_named_and_two_hosts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let handler: Handler = Arc::new(|_, _| Response::message("x"));
        let options = |allow: Vec<String>| WebOptions {
            actions: false,
            token_file: dir.path().join("t"),
            allow,
            io_timeout: Some(Duration::from_millis(500)),
        };
        let any = TcpListener::bind("0.0.0.0:0").unwrap();
        let e = WebView::start(any, handler.clone(), Events::start(None), &options(vec![]))
            .err()
            .unwrap();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--http-allow"), "{e}");
        let (view, _dir, _) = running(false);
        let addr = view.addr();
        let (code, body) = http(
            addr,
            &format!("GET / HTTP/1.0\r\nHost: {addr}\r\nHost: evil.example\r\n\r\n"),
        );
        assert_eq!(code, 403);
        assert!(body.contains("more than one host"));
    }
}
