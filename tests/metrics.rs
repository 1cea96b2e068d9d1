//! `serve --metrics`: the Prometheus endpoint scraped over real HTTP while
//! a real NBD client writes, and after a disk fails online.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::Sandbox;
use common::serve::{Served, mirror_group, ok, tools};

/// One sample line of the text exposition: `name{labels} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format: skips `#` lines and blank ones.
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number in {line:?}"));
            let Some((name, rest)) = series.split_once('{') else {
                return Sample {
                    name: series.to_string(),
                    labels: BTreeMap::new(),
                    value,
                };
            };
            let body = rest.strip_suffix('}').expect("labels end with }");
            let mut labels = BTreeMap::new();
            let mut chars = body.chars().peekable();
            while chars.peek().is_some() {
                let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                assert_eq!(chars.next(), Some('"'), "quoted value in {line:?}");
                let mut v = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => v.push(match chars.next() {
                            Some('n') => '\n',
                            Some(c) => c,
                            None => panic!("dangling escape in {line:?}"),
                        }),
                        '"' => break,
                        c => v.push(c),
                    }
                }
                labels.insert(key, v);
                if chars.peek() == Some(&',') {
                    chars.next();
                }
            }
            Sample {
                name: name.to_string(),
                labels,
                value,
            }
        })
        .collect()
}

/// The samples of `name` whose labels include every pair of `want`; a label
/// named `disk` matches on the file name at the end of the path.
fn find<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter().all(|(k, v)| match (s.labels.get(*k), *k) {
                (Some(got), "disk") => got.ends_with(&format!("/{v}")),
                (Some(got), _) => got == v,
                (None, _) => false,
            })
        })
        .collect()
}

/// The single sample of `name` with `want`.
#[track_caller]
fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    let found = find(samples, name, want);
    assert_eq!(found.len(), 1, "{name} {want:?}: {found:?}");
    found[0].value
}

/// GET over HTTP/1.0 with std's TcpStream; returns (status, headers, body).
fn get(addr: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    (code, head.to_string(), body.to_string())
}

/// Scrapes `/metrics`, checks the answer is Prometheus text, parses it.
fn scrape(addr: &str) -> Vec<Sample> {
    let (code, head, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    parse(&body)
}

/// The address `serve` printed for its metrics endpoint.
fn metrics_addr(s: &Served) -> String {
    let err = s.stderr();
    err.lines()
        .find_map(|l| l.strip_prefix("metrics on http://"))
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics line in:\n{err}"))
        .to_string()
}

/// Every latency histogram is whole: buckets never decrease, `+Inf` equals
/// `_count`, and `_sum` is there. Returns `_count` by (disk, op).
fn check_histograms(samples: &[Sample]) -> BTreeMap<(String, String), f64> {
    let mut counts = BTreeMap::new();
    for c in find(samples, "mirrorvol_disk_latency_seconds_count", &[]) {
        let (disk, op) = (&c.labels["disk"], &c.labels["op"]);
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.name == "mirrorvol_disk_latency_seconds_bucket")
            .filter(|s| &s.labels["disk"] == disk && &s.labels["op"] == op)
            .map(|s| {
                let le = match s.labels["le"].as_str() {
                    "+Inf" => f64::INFINITY,
                    x => x.parse().unwrap(),
                };
                (le, s.value)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(buckets.len() >= 10, "{disk} {op}: {buckets:?}");
        assert!(buckets[0].0 <= 100e-6 && buckets[buckets.len() - 2].0 >= 5.0);
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{disk} {op}: buckets decrease: {buckets:?}"
        );
        let inf = buckets.last().unwrap();
        assert_eq!(inf.0, f64::INFINITY);
        assert_eq!(inf.1, c.value, "{disk} {op}: +Inf bucket != _count");
        let sum = samples
            .iter()
            .find(|s| {
                s.name == "mirrorvol_disk_latency_seconds_sum"
                    && &s.labels["disk"] == disk
                    && &s.labels["op"] == op
            })
            .unwrap_or_else(|| panic!("no _sum for {disk} {op}"));
        assert!(sum.value >= 0.0 && (c.value > 0.0 || sum.value == 0.0));
        counts.insert((disk.clone(), op.clone()), c.value);
    }
    counts
}

#[test]
fn metrics_show_states_io_and_latency_and_follow_a_failed_disk() {
    if !tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 16);
    let s = Served::start_args(&sb, &["--metrics", "127.0.0.1:0"], &[]);
    let addr = metrics_addr(&s);

    // 3 MiB written through NBD, then read back.
    let written = 3u64 << 20;
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 2M",
        "-c",
        "write -f -P 0xcd 2M 1M",
        "-c",
        "flush",
        "-c",
        "read -P 0xab 0 2M",
        &s.uri("data"),
    ]));

    let m = scrape(&addr);
    let state = [("volume", "data"), ("state", "healthy")];
    assert_eq!(value(&m, "mirrorvol_volume_state", &state), 1.0);
    assert_eq!(
        find(&m, "mirrorvol_volume_state", &[("volume", "data")])
            .iter()
            .map(|s| s.value)
            .sum::<f64>(),
        1.0,
        "exactly one state is current"
    );
    assert_eq!(
        value(&m, "mirrorvol_volume_size_bytes", &[("volume", "data")]),
        (16u64 << 20) as f64
    );
    assert_eq!(
        value(&m, "mirrorvol_volume_plexes", &[("volume", "data")]),
        2.0
    );
    for d in ["a.img", "b.img"] {
        let plex = [("volume", "data"), ("disk", d), ("state", "in-sync")];
        assert_eq!(value(&m, "mirrorvol_plex_state", &plex), 1.0, "{d}");
        let at = [("volume", "data"), ("disk", d)];
        assert_eq!(value(&m, "mirrorvol_resync_progress_ratio", &at), 1.0);
        let online = [("disk", d), ("state", "online")];
        assert_eq!(value(&m, "mirrorvol_disk_state", &online), 1.0, "{d}");
        let disk = [("disk", d)];
        let w = value(&m, "mirrorvol_disk_written_bytes_total", &disk);
        assert!(w >= written as f64, "{d}: {w} bytes written < {written}");
        for op in ["write", "flush"] {
            let n = value(
                &m,
                "mirrorvol_disk_operations_total",
                &[("disk", d), ("op", op)],
            );
            assert!(n > 0.0, "{d}: no {op} counted");
        }
        assert_eq!(value(&m, "mirrorvol_disk_errors_total", &disk), 0.0);
    }
    // Reads go to one plex at a time; together they read all 2 MiB.
    let read: f64 = find(&m, "mirrorvol_disk_read_bytes_total", &[])
        .iter()
        .map(|s| s.value)
        .sum();
    assert!(read >= (2u64 << 20) as f64, "{read} bytes read");
    // No resync runs, so no rate.
    assert!(find(&m, "mirrorvol_resync_rate_bytes_per_second", &[]).is_empty());
    assert!(!find(&m, "mirrorvol_nbd_connections", &[]).is_empty());

    let counts = check_histograms(&m);
    assert_eq!(counts.len(), 2 * 4, "two disks, four kinds: {counts:?}");
    for ((disk, op), n) in &counts {
        let ops = find(
            &m,
            "mirrorvol_disk_operations_total",
            &[("op", op.as_str())],
        )
        .into_iter()
        .find(|s| &s.labels["disk"] == disk)
        .unwrap()
        .value;
        assert_eq!(*n, ops, "{disk} {op}: histogram _count != operations");
    }

    // Anything else is not found.
    let (code, _, _) = get(&addr, "/");
    assert_eq!(code, 404);

    // The CLI routes `fail` to the daemon; the next scrape shows it.
    sb.mv(&["fail", &sb.p("disks/b.img")]).ok();
    let m = scrape(&addr);
    let degraded = [("volume", "data"), ("state", "failed-redundancy")];
    assert_eq!(value(&m, "mirrorvol_volume_state", &degraded), 1.0);
    assert_eq!(value(&m, "mirrorvol_volume_state", &state), 0.0);
    let failed = [("disk", "b.img"), ("state", "failed")];
    assert_eq!(value(&m, "mirrorvol_disk_state", &failed), 1.0);
    let in_sync = [("volume", "data"), ("disk", "b.img"), ("state", "in-sync")];
    assert_eq!(value(&m, "mirrorvol_plex_state", &in_sync), 0.0);
    let online = [("disk", "a.img"), ("state", "online")];
    assert_eq!(value(&m, "mirrorvol_disk_state", &online), 1.0);

    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_taken_metrics_address_is_refused_before_the_disks_are_opened() {
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 16);
    let s = Served::start_args(&sb, &["--metrics", "127.0.0.1:0"], &[]);
    let addr = metrics_addr(&s);
    // The first serve holds the disks: had the second opened them first, it
    // would have been refused for the lock, not for the address.
    let other = format!("unix:{}", sb.p("other.sock"));
    sb.mv(&["serve", "--listen", &other, "--metrics", &addr])
        .refused(&format!(
            "cannot serve metrics on {addr}: the address is already in use"
        ));
    sb.mv(&["serve", "--listen", &other, "--metrics", "nonsense"])
        .refused("nonsense");
    assert!(!sb.path("other.sock").exists(), "the NBD socket is left");
    // The endpoint still answers.
    assert!(!scrape(&addr).is_empty());
    assert_eq!(s.stop().0, 0);
}

#[test]
fn a_resync_shows_its_progress_and_rate() {
    if !tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 16);
    // Slow enough to be scraped in the middle: 12 MiB at 1 MiB/s.
    let s = Served::start_args(
        &sb,
        &[
            "--metrics",
            "127.0.0.1:0",
            "--resync-min-rate",
            "512K",
            "--resync-max-rate",
            "1M",
        ],
        &[],
    );
    let addr = metrics_addr(&s);
    let b = sb.p("disks/b.img");
    sb.mv(&["fail", &b]).ok();
    // Written while b is out: its regions must be copied back.
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 12M", &s.uri("data")]));
    sb.mv(&["reactivate", &b]).ok();

    let at = [("volume", "data"), ("disk", "b.img")];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = scrape(&addr);
        // The rate is a moving average: 0 until the first chunks are timed.
        if find(&m, "mirrorvol_resync_rate_bytes_per_second", &at)
            .iter()
            .any(|s| s.value > 0.0)
        {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no resync rate after 20 s:\n{m:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // The volume shows what `status` shows: resynching while its stale plex
    // is resynced.
    let healthy = [("volume", "data"), ("state", "healthy")];
    assert_eq!(value(&m, "mirrorvol_volume_state", &healthy), 0.0);
    let resynching = [("volume", "data"), ("state", "resynching")];
    assert_eq!(value(&m, "mirrorvol_volume_state", &resynching), 1.0);
    let plex = [
        ("volume", "data"),
        ("disk", "b.img"),
        ("state", "resyncing"),
    ];
    assert_eq!(value(&m, "mirrorvol_plex_state", &plex), 1.0);
    let ratio = value(&m, "mirrorvol_resync_progress_ratio", &at);
    assert!((0.0..1.0).contains(&ratio), "progress {ratio}");
    let rate = value(&m, "mirrorvol_resync_rate_bytes_per_second", &at);
    assert!(rate > 0.0 && rate <= 4.0 * 1048576.0, "rate {rate}");
    // The in-sync plex has no resync, so no rate.
    let a = [("volume", "data"), ("disk", "a.img")];
    assert!(find(&m, "mirrorvol_resync_rate_bytes_per_second", &a).is_empty());
    assert_eq!(s.stop().0, 0);
}

#[test]
fn iostat_shows_each_disk_and_volume_from_the_daemons_counters() {
    if !tools(&["qemu-io"]) {
        return;
    }
    let sb = Sandbox::new();
    mirror_group(&sb, 64, 16);
    sb.mv(&["iostat"]).refused("no serve holds the group");
    let s = Served::start_args(&sb, &[], &[]);
    sb.mv(&["iostat", "--count", "2"])
        .refused("--count needs --interval");
    sb.mv(&["iostat", "--interval", "0"])
        .refused("out of range");
    ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 7 0 3M",
        "-c",
        "read -P 7 0 1M",
        &s.uri("data"),
    ]));
    let first: serde_json::Value =
        serde_json::from_str(sb.mv(&["iostat", "--json"]).ok().stdout.trim()).unwrap();
    assert!(first["interval"].is_null(), "totals first: {first:#}");
    let vol = &first["volumes"][0];
    assert_eq!(vol["name"], "data");
    assert_eq!(vol["written_bytes"], (3u64 << 20) as f64, "{first:#}");
    assert_eq!(vol["read_bytes"], (1u64 << 20) as f64);
    for d in first["disks"].as_array().unwrap() {
        assert!(
            d["written_bytes"].as_f64().unwrap() >= (3u64 << 20) as f64,
            "{d:#}"
        );
        assert!(d["writes"].as_f64().unwrap() >= 1.0);
    }
    // Rates over an interval, while a client writes 8 MiB in it.
    let out = sb.path("iostat.out");
    let mut iostat = Command::new(common::bin())
        .env("MIRRORVOL_DISKS", sb.disks_dir())
        .env("MIRRORVOL_RUN_DIR", sb.path("run"))
        .args(["iostat", "--interval", "2", "--count", "2", "--json"])
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 8 4M 8M", &s.uri("data")]));
    assert!(iostat.wait().unwrap().success());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let rates = &lines[1];
    let secs = rates["interval"].as_f64().unwrap();
    assert!((1.9..4.0).contains(&secs), "{rates:#}");
    let written = rates["volumes"][0]["written_bytes"].as_f64().unwrap() * secs;
    assert!(
        (written - (8u64 << 20) as f64).abs() < 1.0,
        "8 MiB in the interval: {rates:#}"
    );
    let text = sb.mv(&["iostat"]).ok().stdout;
    assert!(text.starts_with("since serve opened the disks:"), "{text}");
    assert!(
        text.contains("DISK") && text.contains("VOLUME") && text.contains("data"),
        "{text}"
    );
    drop(s);
}
