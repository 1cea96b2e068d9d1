//! A plex on another machine, with a real network between: a network
//! namespace joined to this one by a veth pair (both made by the test and
//! removed after it), qemu-nbd serving the remote disk inside it over TCP,
//! and `serve` here mirroring a local file with that export. The link is
//! cut by setting the far end of the veth down (packets vanish: the remote
//! deadline fails the disk) and put back; fio verifies through it all.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::ext4::{Cleanup, checksums, loop_on_nbdfuse, make_tree, sh};
use common::serve::{ok, qemu_io, run, wait_status_on};
use common::{Sandbox, have_tool, skip_or_fail};

/// A network namespace with one end of a veth pair; this namespace holds
/// the other. Both go when dropped.
struct Link {
    ns: String,
    near: String,
    far: String,
    /// The address inside the namespace.
    remote: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl Link {
    fn new() -> Result<Link, String> {
        // Names and a /30 of this process's own, so that tests running at
        // once do not meet.
        let pid = std::process::id();
        let (a, b) = (pid % 200 + 20, (pid / 200) % 60 * 4);
        let link = Link {
            ns: format!("mvt-{pid}"),
            near: format!("mvn{pid}"),
            far: format!("mvf{pid}"),
            remote: format!("10.{a}.{b}.2"),
        };
        let local = format!("10.{a}.{b}.1/30");
        ip(&["netns", "add", &link.ns])?;
        ip(&[
            "link", "add", &link.near, "type", "veth", "peer", "name", &link.far,
        ])?;
        ip(&["link", "set", &link.far, "netns", &link.ns])?;
        ip(&["addr", "add", &local, "dev", &link.near])?;
        ip(&["link", "set", &link.near, "up"])?;
        let remote = format!("{}/30", link.remote);
        link.inside(&["addr", "add", &remote, "dev", &link.far])?;
        link.inside(&["link", "set", &link.far, "up"])?;
        link.inside(&["link", "set", "lo", "up"])?;
        Ok(link)
    }

    fn inside(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.ns, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// The far end down: what is sent is lost, nothing answers.
    fn cut(&self) {
        self.inside(&["link", "set", &self.far, "down"]).unwrap();
    }

    fn mend(&self) {
        self.inside(&["link", "set", &self.far, "up"]).unwrap();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.near]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// A child killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// qemu-nbd serving `file` as export "disk" inside the namespace, over
/// TCP; with the export's URI, once it answers.
fn remote_server(link: &Link, file: &Path) -> (Killed, String) {
    // Several clients: the connections cut off are still open on its side
    // when the new ones come.
    let server = Killed(
        Command::new("ip")
            .args(["netns", "exec", &link.ns, "qemu-nbd"])
            .args([
                "--format=raw",
                "--persistent",
                "--shared=16",
                "--export-name=disk",
                "--cache=none",
                "--bind",
                &link.remote,
                "--port",
                "10809",
            ])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let uri = format!("nbd://{}:10809/disk", link.remote);
    let start = Instant::now();
    while !Command::new("nbdinfo")
        .arg(&uri)
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "qemu-nbd did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (server, uri)
}

/// `serve` of the group on `disks`, on SANDBOX/vol.sock, its log in
/// SANDBOX/serve.log; once it answers.
fn serve(sb: &Sandbox, disks: &str) -> (Killed, std::path::PathBuf, std::path::PathBuf) {
    let vol = sb.path("vol.sock");
    let log = sb.path("serve.log");
    let serve = Killed(
        Command::new(common::bin())
            .env("MIRRORVOL_DISKS", disks)
            .env("MIRRORVOL_RUN_DIR", sb.path("run"))
            .env("MIRRORVOL_HOST_ID_FILE", sb.path("host-id"))
            .env("MIRRORVOL_LOG", "warn")
            .args(["serve", "--listen"])
            .arg(format!("unix:{}", vol.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_status_on(sb, disks, 20, "serve starts", |st| {
        st["volumes"]
            .as_array()
            .is_some_and(|v| v.iter().all(|v| v["clients"].is_number()))
    });
    (serve, vol, log)
}

fn resyncs_onto(log: &Path, volume: &str, disk: &str) -> Vec<(u64, bool)> {
    common::resyncs_in_log(&std::fs::read_to_string(log).unwrap(), volume, disk)
}

/// fio writes and verifies 16 MiB of a mirror whose second plex is across
/// the veth while the link is cut for 8 s and put back: no error reaches
/// fio, the remote disk is failed on the remote deadline, reconnected by
/// itself once the link is back, and resynced from the bitmaps; then a cut
/// while 2 MiB of another volume are written costs a resync of those 2 MiB
/// of it, not of its 32 MiB.
#[test]
fn fio_verifies_through_a_link_cut_and_the_remote_plex_comes_back_by_its_bitmaps() {
    for tool in ["ip", "qemu-nbd", "nbdinfo", "fio", "qemu-io"] {
        if !have_tool(tool) {
            return skip_or_fail(&format!("{tool} is not installed"));
        }
    }
    let link = match Link::new() {
        Ok(l) => l,
        Err(e) => return skip_or_fail(&format!("cannot make a network namespace: {e}")),
    };
    let sb = Sandbox::new();
    let local = sb.image("a.img", 128);
    let remote_file = sb.path("remote.img");
    std::fs::File::create(&remote_file)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let (_server, uri) = remote_server(&link, &remote_file);
    let disks = format!("{local},{uri}");
    sb.mv_on(&disks, &["init", &local, &uri, "--style", "raw"])
        .ok();
    sb.mv_on(&disks, &["create", "data", "--size", "64M", "--mirror"])
        .ok();
    sb.mv_on(&disks, &["create", "logs", "--size", "32M", "--mirror"])
        .ok();

    let (mut serve, vol, log) = serve(&sb, &disks);
    let served = format!("nbd+unix:///data?socket={}", vol.display());

    // 16 MiB of 4 KiB writes at 400/s (about 10 s), then read back and
    // verified, while the link is cut from 2 s to 10 s.
    let fio = common::serve::fio_verify_command(&served, 16, 8, 400)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    link.cut();
    let st = wait_status_on(&sb, &disks, 30, "the remote disk is failed", |st| {
        common::disk(st, &uri)["state"] == "failed"
    });
    let why = common::disk(&st, &uri)["link"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(why.starts_with("lost "), "{why}");
    std::thread::sleep(Duration::from_secs(2));
    link.mend();
    let out = fio.wait_with_output().unwrap();
    let (text, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "fio:\n{text}\n{err}");
    assert!(
        text.contains("err= 0") && !text.contains("verify") && !err.contains("verify"),
        "fio saw errors:\n{text}\n{err}"
    );
    let healthy = |st: &serde_json::Value| {
        ["data", "logs"]
            .iter()
            .all(|v| common::volume(st, v)["state"] == "healthy")
    };
    wait_status_on(
        &sb,
        &disks,
        90,
        "the remote plexes are back in sync",
        healthy,
    );
    let first = resyncs_onto(&log, "data", &uri);
    assert_eq!(first.len(), 1, "{}", std::fs::read_to_string(&log).unwrap());
    assert!(first[0].1, "resynced from the bitmaps: {first:?}");
    assert!(first[0].0 <= 16 << 20, "at most what fio wrote: {first:?}");
    assert_eq!(
        resyncs_onto(&log, "logs", &uri),
        [(0, true)],
        "nothing of logs was written"
    );

    // Away while 2 MiB of logs are written.
    link.cut();
    let logs = format!("nbd+unix:///logs?socket={}", vol.display());
    qemu_io(&logs, &["write -P 0x61 8M 2M"]);
    wait_status_on(&sb, &disks, 30, "the remote disk is failed again", |st| {
        common::disk(st, &uri)["state"] == "failed"
    });
    link.mend();
    wait_status_on(&sb, &disks, 90, "back in sync again", healthy);
    let second = resyncs_onto(&log, "logs", &uri);
    eprintln!(
        "resynced onto the remote disk: data {first:?}, then logs {:?}",
        second[1]
    );
    assert_eq!(
        second[1],
        (2 << 20, true),
        "the 2 MiB written while away, from the bitmaps: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(serve.0.id() as i32, libc::SIGTERM) };
    assert!(serve.0.wait().unwrap().success());
    // The remote plex alone holds what was written.
    let copy = sb.p("remote-only.bin");
    sb.mv_on(&uri, &["copy", "vol:logs", &copy]).ok();
    let got = std::fs::read(&copy).unwrap();
    assert!(got[8 << 20..10 << 20].iter().all(|&b| b == 0x61));
    assert!(
        got[..8 << 20]
            .iter()
            .chain(&got[10 << 20..])
            .all(|&b| b == 0)
    );
}

/// A local file and a remote export across the veth, each with a copy of
/// `data` (64 MiB); `serve` running. Returns what the test holds.
struct Rig {
    link: Link,
    sb: Sandbox,
    local: String,
    remote_file: std::path::PathBuf,
    server: Option<Killed>,
    uri: String,
    disks: String,
    serve: Killed,
    vol: std::path::PathBuf,
    log: std::path::PathBuf,
}

fn rig(link: Link) -> Rig {
    let sb = Sandbox::new();
    let local = sb.image("a.img", 128);
    let remote_file = sb.path("remote.img");
    std::fs::File::create(&remote_file)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let (server, uri) = remote_server(&link, &remote_file);
    let disks = format!("{local},{uri}");
    sb.mv_on(&disks, &["init", &local, &uri, "--style", "raw"])
        .ok();
    sb.mv_on(&disks, &["create", "data", "--size", "64M", "--mirror"])
        .ok();
    let (serve, vol, log) = serve(&sb, &disks);
    Rig {
        link,
        sb,
        local,
        remote_file,
        server: Some(server),
        uri,
        disks,
        serve,
        vol,
        log,
    }
}

impl Rig {
    fn wait_state(&self, secs: u64, what: &str, state: &str) {
        wait_status_on(&self.sb, &self.disks, secs, what, |st| {
            common::disk(st, &self.uri)["state"] == state
                && (state != "online" || common::volume(st, "data")["state"] == "healthy")
        });
    }

    /// serve stopped (exit 0).
    fn stop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.serve.0.id() as i32, libc::SIGTERM) };
        assert!(self.serve.0.wait().unwrap().success());
    }

    /// What the plex on `disk` holds alone (the group opened from it only).
    fn plex_alone(&self, disk: &str, name: &str) -> Vec<u8> {
        let copy = self.sb.p(name);
        self.sb.mv_on(disk, &["copy", "vol:data", &copy]).ok();
        std::fs::read(&copy).unwrap()
    }
}

fn remote_tools() -> Option<Link> {
    for tool in ["ip", "qemu-nbd", "nbdinfo", "fio", "qemu-io"] {
        if !have_tool(tool) {
            skip_or_fail(&format!("{tool} is not installed"));
            return None;
        }
    }
    match Link::new() {
        Ok(l) => Some(l),
        Err(e) => {
            skip_or_fail(&format!("cannot make a network namespace: {e}"));
            None
        }
    }
}

/// The remote server killed with SIGKILL while fio writes and verifies,
/// and started again: fio sees no error, the disk is failed, reconnected
/// once the server is back and resynced from the bitmaps; the remote plex
/// alone then holds what the local one holds.
#[test]
fn fio_verifies_through_a_kill_of_the_remote_server_and_its_return() {
    let Some(link) = remote_tools() else { return };
    let mut r = rig(link);
    let served = format!("nbd+unix:///data?socket={}", r.vol.display());
    let fio = common::serve::fio_verify_command(&served, 16, 8, 400)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // Killed (SIGKILL) by the drop.
    drop(r.server.take());
    r.wait_state(30, "the remote disk is failed", "failed");
    std::thread::sleep(Duration::from_secs(1));
    r.server = Some(remote_server(&r.link, &r.remote_file).0);
    let out = fio.wait_with_output().unwrap();
    let (text, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "fio:\n{text}\n{err}");
    assert!(
        text.contains("err= 0") && !text.contains("verify") && !err.contains("verify"),
        "fio saw errors:\n{text}\n{err}"
    );
    r.wait_state(90, "the remote plex is back in sync", "online");
    let resyncs = resyncs_onto(&r.log, "data", &r.uri);
    assert_eq!(
        resyncs.len(),
        1,
        "{}",
        std::fs::read_to_string(&r.log).unwrap()
    );
    assert!(resyncs[0].1, "from the bitmaps: {resyncs:?}");
    assert!(
        resyncs[0].0 <= 16 << 20,
        "at most what fio wrote: {resyncs:?}"
    );
    r.stop();
    let local = r.local.clone();
    assert!(
        r.plex_alone(&r.uri, "remote-only.bin") == r.plex_alone(&local, "local-only.bin"),
        "the remote plex holds what the local one holds"
    );
}

/// ext4 on the mirror (nbdfuse, a loop device) while the link is cut: the
/// files written meanwhile reach the local plex, the remote disk comes
/// back by the bitmaps, and fsck finds the filesystem clean on the mirror
/// and on the remote plex alone, with every file as written.
#[test]
fn ext4_through_nbdfuse_goes_on_through_a_link_cut_and_the_remote_copy_is_clean() {
    if !common::serve::tools(&["nbdfuse", "losetup", "mkfs.ext4", "fsck.ext4"]) {
        return;
    }
    if !common::is_root() || !Path::new("/dev/fuse").exists() {
        return skip_or_fail("nbdfuse and loop devices need root and /dev/fuse");
    }
    let Some(link) = remote_tools() else { return };
    let mut r = rig(link);
    let served = format!("nbd+unix:///data?socket={}", r.vol.display());
    let mut cleanup = Cleanup::default();
    let lo = loop_on_nbdfuse(&served, &r.sb.path("fuse"), &mut cleanup);
    ok(&mut sh("mkfs.ext4", &["-q", "-F", &lo]));
    let mnt = r.sb.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mnt_s = mnt.display().to_string();
    ok(&mut sh("mount", &[&lo, &mnt_s]));
    {
        let mnt = mnt.clone();
        cleanup.push(move || {
            let _ = Command::new("umount").arg(&mnt).status();
        });
    }
    make_tree(&mnt.join("before"), 1);
    ok(&mut sh("sync", &[]));

    // Cut: the writes wait for the remote deadline once, then go on with
    // the local plex.
    r.link.cut();
    make_tree(&mnt.join("during"), 2);
    ok(&mut sh("sync", &[]));
    r.wait_state(30, "the remote disk is failed", "failed");
    r.link.mend();
    r.wait_state(90, "the remote plex is back in sync", "online");
    let resyncs = resyncs_onto(&r.log, "data", &r.uri);
    assert_eq!(
        resyncs.len(),
        1,
        "{}",
        std::fs::read_to_string(&r.log).unwrap()
    );
    // From the bitmaps; how much is the fio test's to check (mkfs wrote
    // across the whole volume less than a minute ago: the hot set keeps
    // those bits).
    assert!(resyncs[0].1, "from the bitmaps: {resyncs:?}");

    let want = checksums(&mnt);
    assert_eq!(want.len(), 144);
    ok(&mut sh("umount", &[&mnt_s]));
    let (code, out, err) = run(&mut sh("fsck.ext4", &["-fn", &lo]));
    assert_eq!(code, 0, "fsck on the mirror:\n{out}\n{err}");
    drop(cleanup);
    r.stop();

    // The remote plex alone: a clean filesystem with every file.
    let alone = r.sb.path("remote-only.img");
    std::fs::write(&alone, r.plex_alone(&r.uri, "remote-only.bin")).unwrap();
    let alone_s = alone.display().to_string();
    let (code, out, err) = run(&mut sh("fsck.ext4", &["-fn", &alone_s]));
    assert_eq!(code, 0, "fsck on the remote plex alone:\n{out}\n{err}");
    let mut cleanup = Cleanup::default();
    let mnt2 = r.sb.path("mnt2");
    std::fs::create_dir_all(&mnt2).unwrap();
    let mnt2_s = mnt2.display().to_string();
    ok(&mut sh("mount", &["-o", "ro,loop", &alone_s, &mnt2_s]));
    {
        let mnt2 = mnt2.clone();
        cleanup.push(move || {
            let _ = Command::new("umount").arg(&mnt2).status();
        });
    }
    assert!(checksums(&mnt2) == want, "the remote plex holds every file");
}
