//! `serve --http`: the web view in a real browser. Headless Chromium,
//! driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
//! NUL-separated JSON on file descriptors 3 and 4), loads the page from a
//! running `serve` while a mirror resyncs, and a break is done from the
//! page, confirmed, and seen in `status`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use common::serve::{Served, mirror_group, ok};
use common::{Sandbox, have_tool, skip_or_fail, volume};
use serde_json::{Value, json};

/// Headless Chromium with one page, driven over the DevTools pipe.
struct Browser {
    child: Child,
    to: std::fs::File,
    from: Receiver<Value>,
    next: u64,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

/// A pipe's two ends.
fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    use std::os::fd::FromRawFd;
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

impl Browser {
    fn start() -> Browser {
        use std::os::fd::AsRawFd;
        let profile = tempfile::tempdir().unwrap();
        // Chromium reads commands on fd 3 and writes answers on fd 4.
        let (cmd_read, cmd_write) = pipe();
        let (out_read, out_write) = pipe();
        let (r, w) = (cmd_read.as_raw_fd(), out_write.as_raw_fd());
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--remote-debugging-pipe",
            "--window-size=1280,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: between fork and exec only dup2 runs, which is
        // async-signal-safe; the duplicates lose O_CLOEXEC, so exactly
        // these two descriptors reach Chromium as 3 and 4.
        unsafe {
            cmd.pre_exec(move || {
                let (a, b) = (libc::dup(r), libc::dup(w));
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start chromium");
        drop((cmd_read, out_write));
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(out_read);
            loop {
                let mut message = Vec::new();
                match reader.read_until(0, &mut message) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                message.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&message)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        let mut b = Browser {
            child,
            to: cmd_write,
            from: rx,
            next: 0,
            session: None,
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let target = target["targetId"]
            .as_str()
            .expect("a target id")
            .to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        b.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        b
    }

    /// Sends a command (to the page once attached) and waits for its answer.
    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next += 1;
        let id = self.next;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            message["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("chromium did not answer {method} in 30 s"));
            if m["id"] == json!(id) {
                return match m.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(m["result"].clone()),
                };
            }
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e}"))
    }

    /// The value of a JavaScript expression in the page (None while the
    /// page is being replaced).
    fn eval(&mut self, expr: &str) -> Option<Value> {
        let r = self
            .try_call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .ok()?;
        if r.get("exceptionDetails").is_some() {
            return None;
        }
        r["result"].get("value").cloned()
    }

    /// Waits until `expr` is true in the page.
    fn wait_for(&mut self, expr: &str, what: &str) {
        assert!(
            self.wait_until(expr, Duration::from_secs(30)),
            "{what}: not true after 30 s: {expr}\npage: {:?}",
            self.eval("document.body ? document.body.innerText : ''")
        );
    }

    /// Whether `expr` becomes true in the page within `limit`.
    fn wait_until(&mut self, expr: &str, limit: Duration) -> bool {
        let start = Instant::now();
        while self.eval(expr) != Some(json!(true)) {
            if start.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// Loads `url` and waits for it to be complete. A navigation Chromium
    /// gives up on (its `errorText`) or that does not finish is tried
    /// again, twice at most; what each try saw is in the failure message,
    /// with whether the server answers the same page to a plain request,
    /// which tells a browser's hiccup from a server that does not answer.
    fn open(&mut self, url: &str) {
        if let Err(e) = self.try_open(url) {
            panic!("{e}");
        }
    }

    /// [`Browser::open`], with what went wrong as the error.
    fn try_open(&mut self, url: &str) -> Result<(), String> {
        let want = serde_json::to_string(url).unwrap();
        let done = format!("document.readyState === 'complete' && location.href === {want}");
        let mut tries = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            let r = self.call("Page.navigate", json!({"url": url}));
            if let Some(e) = r.get("errorText").and_then(|e| e.as_str()) {
                tries.push(format!("navigation failed: {e}"));
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            if self.wait_until(&done, Duration::from_secs(20)) {
                if !tries.is_empty() {
                    eprintln!("{url} loaded after {tries:?}");
                }
                return Ok(());
            }
            tries.push(format!(
                "not loaded after {:?}: readyState {:?}, href {:?}",
                started.elapsed(),
                self.eval("document.readyState"),
                self.eval("location.href")
            ));
        }
        let direct = url
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
            .map(|(addr, path)| {
                let started = Instant::now();
                match std::net::TcpStream::connect(addr) {
                    Err(e) => format!("cannot connect: {e}"),
                    Ok(_) => {
                        let (code, body) = http(
                            addr,
                            &format!("GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
                        );
                        format!(
                            "HTTP {code}, {} bytes in {:?}",
                            body.len(),
                            started.elapsed()
                        )
                    }
                }
            });
        Err(format!(
            "{url} does not load: {tries:?}; a plain request: {direct:?}"
        ))
    }

    fn number(&mut self, expr: &str) -> f64 {
        self.eval(expr)
            .and_then(|v| v.as_f64())
            .unwrap_or_else(|| panic!("{expr} is no number"))
    }

    fn text(&mut self, expr: &str) -> String {
        match self.eval(expr) {
            Some(Value::String(s)) => s,
            other => panic!("{expr} is no string: {other:?}"),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.session = None;
        let _ = self.try_call("Browser.close", json!({}));
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The web view's address, from serve's start-up line.
fn web_addr(s: &Served) -> String {
    let log = s.stderr();
    log.lines()
        .find_map(|l| l.strip_prefix("web view on http://"))
        .map(|a| a.trim_end_matches('/').to_string())
        .unwrap_or_else(|| panic!("no web view line in:\n{log}"))
}

/// One raw HTTP/1.0 exchange: the status code and the body.
fn http(addr: &str, head: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let code = answer[9..12].parse().unwrap();
    (code, answer.split_once("\r\n\r\n").unwrap().1.to_string())
}

#[test]
fn a_browser_sees_the_disks_watches_a_resync_and_breaks_a_mirror() {
    if !have_tool("chromium") {
        return skip_or_fail("chromium is not installed");
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 128, 64);
    let c = sb.image("c.img", 128);
    sb.mv(&["init", &c, "--style", "raw", "--controller", "c1"])
        .ok();
    sb.mv(&["create", "logs", "--size", "16M", "--disk", &c])
        .ok();
    // Written whole: a resync reads (and is paced by) what was written.
    let (fill, _) = sb.data_file("fill.bin", 64 << 20, 3);
    sb.mv(&["copy", &fill, "vol:data"]).ok();
    let s = Served::start_args(
        &sb,
        &[
            "--http",
            "127.0.0.1:0",
            "--http-actions",
            "--resync-max-rate",
            "1M",
        ],
        &[],
    );
    let addr = web_addr(&s);
    let token_file = std::fs::read_dir(sb.path("run"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".http-token"))
        .expect("the token file is in the run directory");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the token is the operator's alone");
    }
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    // A copy onto c.img, resyncing at 1 MiB/s for a minute.
    sb.mv(&["add-mirror", "data", "--disk", &c]).ok();

    let mut b = Browser::start();

    // With JavaScript off the picture and the tables are all there.
    b.call(
        "Emulation.setScriptExecutionDisabled",
        json!({"value": true}),
    );
    if let Err(e) = b.try_open(&format!("http://{addr}/")) {
        panic!("{e}\nserve's log:\n{}", s.stderr());
    }
    assert_eq!(
        b.number("document.querySelectorAll('#disks .disk').length"),
        3.0
    );
    assert_eq!(
        b.number("document.querySelectorAll('#disks svg.plex[data-volume=data]').length"),
        3.0,
        "a bar per plex"
    );
    assert_eq!(
        b.text("document.querySelector('#live').textContent"),
        "Static view: reload to update."
    );
    assert_eq!(
        b.text("document.querySelector('tr.volume[data-volume=data]').dataset.state"),
        "resynching"
    );
    let state =
        b.text("document.querySelector('tr.volume[data-volume=data] td.state').textContent");
    assert!(state.starts_with("Resynching ("), "{state}");
    // The plex on c.img is drawn on the third disk, at its offset, labelled
    // with its progress.
    let on_c = b.text(
        "document.querySelector('.disk[data-disk$=\"/c.img\"] svg.plex[data-volume=data]').textContent",
    );
    assert!(
        on_c.contains("data") && on_c.contains("Resynching ("),
        "{on_c}"
    );
    assert!(
        b.eval("document.querySelector('form.act')")
            .is_none_or(|v| v.is_null()),
        "no actions without the token"
    );
    let first = b.number("document.querySelector('tr.job[data-volume=data] progress').value");
    // The copy moves 4 MiB at a time (4 s at 1 MiB/s): loaded again until
    // it shows.
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(1000));
        b.open(&format!("http://{addr}/"));
        let second = b.number("document.querySelector('tr.job[data-volume=data] progress').value");
        if second > first {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the resync did not move between loads: {first} -> {second}"
        );
    }
    let rate =
        b.text("document.querySelector('tr.job[data-volume=data] td:nth-child(5)').textContent");
    assert!(rate.ends_with("/s") || rate == "measuring", "{rate}");

    // With JavaScript on the page follows the resync without a reload.
    b.call(
        "Emulation.setScriptExecutionDisabled",
        json!({"value": false}),
    );
    // The token pasted into the unlock form, which keeps it out of the
    // address.
    b.open(&format!("http://{addr}/"));
    b.eval(&format!(
        "document.querySelector('form.unlock input').value = {}; document.querySelector('form.unlock').submit(); true",
        serde_json::to_string(&token).unwrap()
    ))
    .expect("the unlock form is there");
    b.wait_for(
        "!!document.querySelector('form.act') && location.pathname === '/'",
        "the page unlocks",
    );
    assert!(
        !b.text("location.href").contains(&token),
        "the token stays out of the address"
    );
    b.wait_for(
        "document.querySelector('#live').textContent === 'Live'",
        "the page goes live",
    );
    let before = b.number("document.querySelector('tr.job[data-volume=data] progress').value");
    b.wait_for(
        &format!("document.querySelector('tr.job[data-volume=data] progress').value > {before}"),
        "the progress moves on the live page",
    );

    // A screenshot, as a test artefact.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-view.png");
    let _ = std::fs::remove_file(&shot);
    ok(Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,1000",
        ])
        .arg(format!("--user-data-dir={}", sb.p("shot-profile")))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("http://{addr}/?token={token}")));
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let (w, h) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert_eq!((w, h), (1280, 1000));
    assert!(
        png.len() > 30_000,
        "a page drawn, not a blank one: {} bytes",
        png.len()
    );
    eprintln!("screenshot: {}", shot.display());

    // A break from the page: the button, the confirmation, the result.
    b.eval(
        "document.querySelector('form[data-op=break][data-volume=data][data-disk$=\"/b.img\"] button').click(); true",
    )
    .expect("the break button is there");
    b.wait_for(
        "!!document.querySelector('#confirm-button')",
        "the confirmation",
    );
    let what = b.text("document.querySelector('#confirm .what').textContent");
    assert!(
        what.starts_with("Break mirror data: its copy on ")
            && what.contains("/b.img becomes a simple volume"),
        "{what}"
    );
    assert_eq!(
        volume(&sb.status(), "data")["plexes"]
            .as_array()
            .unwrap()
            .len(),
        3,
        "nothing done before the confirmation"
    );
    b.eval("document.querySelector('#confirm-button').click(); true");
    b.wait_for("!!document.querySelector('#banner')", "the result");
    let banner = b.text("document.querySelector('#banner').textContent");
    assert!(
        banner.starts_with("broke volume data: the plex on "),
        "{banner}"
    );
    let st = sb.status();
    let broken = volume(&st, "data-broken");
    assert_eq!(broken["layout"], "simple");
    assert!(
        broken["plexes"][0]["disk"]
            .as_str()
            .unwrap()
            .ends_with("/b.img")
    );
    assert_eq!(volume(&st, "data")["plexes"].as_array().unwrap().len(), 2);
    // Reloading the answered page does not post again.
    b.wait_for("location.pathname === '/'", "the page leaves /action");

    // A refusal from the page is the CLI's sentence, and changes nothing:
    // c.img holds the only copy of logs.
    let a = c.clone();
    b.eval(&format!(
        "document.querySelector('.disk[data-disk={}] form[data-op=fail] button').click(); true",
        serde_json::to_string(&a).unwrap()
    ))
    .expect("the fail button is there");
    b.wait_for(
        "!!document.querySelector('#confirm-button')",
        "the confirmation",
    );
    b.eval("document.querySelector('#confirm-button').click(); true");
    b.wait_for("!!document.querySelector('#banner')", "the refusal");
    let refused = b.text("document.querySelector('#banner').textContent");
    let cli = sb.mv(&["fail", &a]);
    assert_eq!(cli.code, 2);
    assert_eq!(
        refused,
        format!(
            "Refused: {}",
            cli.stderr.trim().trim_start_matches("error: ")
        )
    );
    assert_eq!(common::disk(&sb.status(), "c.img")["state"], "online");

    // Another host (DNS rebinding) or a cross-site form is refused.
    let (code, _) = http(&addr, "GET / HTTP/1.0\r\nHost: rebound.example\r\n\r\n");
    assert_eq!(code, 403);
    let form = format!("token={token}&op=fail&disk={a}&confirm=yes");
    let (code, _) = http(
        &addr,
        &format!(
            "POST /action HTTP/1.0\r\nHost: {addr}\r\nOrigin: http://evil.example\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ),
    );
    assert_eq!(code, 403);

    drop(b);
    let (code, log) = s.stop();
    assert_eq!(code, 0, "{log}");
    assert!(!token_file.exists(), "the token goes when serve stops");
}

#[test]
fn a_background_scrub_shows_as_a_job_in_status_and_on_the_page() {
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 32);
    // Every second a scrub round, comparing 2 MiB/s: 16 s for the volume.
    let s = Served::start_args(
        &sb,
        &[
            "--http",
            "0",
            "--http-actions",
            "--scrub-interval",
            "1",
            "--scrub-rate",
            "2M",
        ],
        &[],
    );
    let addr = web_addr(&s);
    assert!(
        addr.starts_with("127.0.0.1:"),
        "a bare port is on the loopback: {addr}"
    );
    let start = Instant::now();
    let scrub = loop {
        let st = sb.status();
        let v = volume(&st, "data");
        if v["scrub"].is_object() && v["scrub"]["percent"].as_f64().unwrap() > 0.0 {
            break v["scrub"].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no scrub in status: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(scrub["background"], true);
    assert_eq!(scrub["repair"], false);
    let text = sb.mv(&["status"]).ok().stdout;
    assert!(text.contains("(scrub "), "{text}");
    let (code, page) = http(&addr, &format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n"));
    assert_eq!(code, 200);
    assert!(
        page.contains("data-job=\"scrub (background check)\""),
        "the page shows the scrub: {page}"
    );
    // The page's JSON is status --json's.
    let (code, json) = http(
        &addr,
        &format!("GET /api/status HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    );
    assert_eq!(code, 200);
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["group"]["uuid"], sb.status()["group"]["uuid"]);
    let plex = &volume(&json, "data")["plexes"][1];
    assert_eq!(plex["length"], 32u64 << 20);
    assert!(json["disks"][0]["data_size"].as_u64().unwrap() >= 32 << 20);

    // A scrub refused from the page says why, as the CLI does.
    let token = std::fs::read_dir(sb.path("run"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".http-token"))
        .map(|p| std::fs::read_to_string(p).unwrap().trim().to_string())
        .unwrap();
    let form = format!("token={token}&op=scrub&volume=nosuch&confirm=yes");
    let (code, page) = http(
        &addr,
        &format!(
            "POST /action HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ),
    );
    let cli = sb.mv(&["scrub", "nosuch"]);
    assert_eq!(cli.code, 2);
    let why = cli.stderr.trim().trim_start_matches("error: ");
    assert_eq!(code, 409, "{page}");
    assert!(page.contains(&format!("Refused: {why}")), "{why}\n{page}");

    // The background scrub makes way for the admin: a scrub and a break
    // run at once rather than being refused until it ends.
    sb.mv(&["scrub", "data"]).ok();
    let b = sb.p("disks/b.img");
    sb.mv(&["break", "data", "--disk", &b]).ok();
    assert_eq!(volume(&sb.status(), "data-broken")["layout"], "simple");
    let (code, _) = s.stop();
    assert_eq!(code, 0);
}
