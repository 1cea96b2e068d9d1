//! `serve --metrics HOST:PORT`: the group's state and the disks' I/O
//! statistics over HTTP, in the Prometheus text exposition format, at
//! `GET /metrics`.
//!
//! Nothing is kept for the endpoint between scrapes: each scrape takes a
//! [`Snapshot`] (the same [`StatusReport`] `status --json` prints, and the
//! counters and latency histograms every disk queue keeps, see
//! [`DiskStats`]) and encodes it through a fresh registry. So the states can
//! never disagree with `status`, and a disk that leaves service leaves the
//! exposition with it.
//!
//! The HTTP side is tiny_http on one handler thread: a scrape is a lock of
//! the group and a few kilobytes of text, so requests are answered in turn.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::group::live::LiveGroup;
use crate::group::status::StatusReport;
use crate::nbd::server::{self, BindError, Bound, Listen, Server};
use crate::volume::queue::{DiskStats, OpKind};
use crate::{Error, Result};

/// Every metric name starts with this, and an underscore.
const PREFIX: &str = "mirrorvol";

/// The states each kind of object can be in (DESIGN.md §2). A state gauge
/// has one series per state, 1 for the current one and 0 for the others,
/// so a query never depends on a series that appears and vanishes.
const VOLUME_STATES: [&str; 5] = [
    "healthy",
    "resynching",
    "failed-redundancy",
    "failed-redundancy-at-risk",
    "failed",
];
const PLEX_STATES: [&str; 5] = ["in-sync", "stale", "resyncing", "failed", "missing"];
const DISK_STATES: [&str; 5] = ["online", "online-errors", "missing", "failed", "offline"];

/// Parses `HOST:PORT` (or `PORT`/`:PORT`, on the loopback) as `--listen`
/// does, and binds it with the NBD listeners' code. A taken address is
/// refused.
pub fn bind(addr: &str) -> Result<TcpListener> {
    bind_http(addr, "metrics")
}

/// Binds an HTTP endpoint (`what` names it in errors) as [`bind`] does.
pub fn bind_http(addr: &str, what: &str) -> Result<TcpListener> {
    let refused = |why: &str| Error::refused(format!("cannot serve {what} on {addr}: {why}"));
    let listen = Listen::parse(addr).map_err(|e| refused(&e))?;
    if let Listen::Unix(_) = listen {
        return Err(refused("it is served over HTTP: give HOST:PORT"));
    }
    match server::bind(&listen) {
        Ok(Bound::Tcp(l)) => Ok(l),
        Ok(Bound::Unix(..)) => unreachable!("a TCP address binds a TCP listener"),
        Err(BindError::InUse(_)) => Err(refused("the address is already in use")),
        Err(BindError::Other(_, e)) => {
            Err(Error::failed(format!("cannot serve {what} on {addr}: {e}")))
        }
    }
}

/// One disk queue's statistics, with the disk's name.
#[derive(Debug)]
pub struct DiskSample {
    pub path: String,
    pub stats: Arc<DiskStats>,
    /// Requests submitted and not completed.
    pub in_flight: usize,
}

/// What one scrape shows.
#[derive(Debug)]
pub struct Snapshot {
    pub status: StatusReport,
    pub disks: Vec<DiskSample>,
    /// Open NBD connections, when the server is known.
    pub nbd_connections: Option<usize>,
}

impl Snapshot {
    /// None when the group is out of service.
    pub fn take(live: &LiveGroup, server: Option<&Server>) -> Option<Snapshot> {
        let status = live.status().ok()?;
        let disks = live
            .disk_queues()
            .into_iter()
            .map(|(uuid, q)| DiskSample {
                // The name `status` gives the disk, so labels match.
                path: status
                    .disks
                    .iter()
                    .find(|d| d.uuid == uuid)
                    .map_or_else(|| q.name().to_string(), |d| d.path.clone()),
                stats: q.stats().clone(),
                in_flight: q.pending(),
            })
            .collect();
        Some(Snapshot {
            status,
            disks,
            nbd_connections: server.map(Server::connections),
        })
    }

    /// The Prometheus text exposition (format 0.0.4) of this snapshot.
    pub fn encode(self) -> String {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Encodes one family of series; nothing when it has none.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: Vec<(L, M)>,
) -> std::fmt::Result {
    let Some(kind) = series.first().map(|(_, m)| m.metric_type()) else {
        return Ok(());
    };
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in series {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes a gauge family.
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue + std::fmt::Debug>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: Vec<(L, V)>,
) -> std::fmt::Result {
    let series = series.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(enc, name, help, series.collect())
}

/// Encodes a counter family (the encoder adds `_total`).
fn counters<L: EncodeLabelSet, V: EncodeCounterValue + std::fmt::Debug>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: Vec<(L, V)>,
) -> std::fmt::Result {
    let series = series.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(enc, name, help, series.collect())
}

/// One series per known state (and the current one, should it be new).
fn state_series<'a>(known: &[&'static str], current: &'a str) -> Vec<(&'a str, u8)> {
    let mut out: Vec<(&str, u8)> = known
        .iter()
        .map(|s| (*s, u8::from(*s == current)))
        .collect();
    if !known.contains(&current) {
        out.push((current, 1));
    }
    out
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.status;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

        gauges(
            &mut enc,
            "volume_state",
            "The volume's state: 1 for the current one (the states of status --json).",
            s.volumes
                .iter()
                .flat_map(|v| {
                    state_series(&VOLUME_STATES, v.state)
                        .into_iter()
                        .map(|(st, x)| ([("volume", v.name.as_str()), ("state", st)], x as i64))
                })
                .collect(),
        )?;
        gauges(
            &mut enc,
            "volume_size_bytes",
            "The volume's size.",
            s.volumes
                .iter()
                .map(|v| ([("volume", v.name.as_str())], v.size))
                .collect(),
        )?;
        gauges(
            &mut enc,
            "volume_plexes",
            "The volume's plexes (copies), in whatever state.",
            s.volumes
                .iter()
                .map(|v| ([("volume", v.name.as_str())], v.plexes.len() as u64))
                .collect(),
        )?;
        gauges(
            &mut enc,
            "plex_state",
            "The plex's state: 1 for the current one.",
            s.volumes
                .iter()
                .flat_map(|v| {
                    v.plexes.iter().flat_map(|p| {
                        state_series(&PLEX_STATES, p.state)
                            .into_iter()
                            .map(|(st, x)| {
                                (
                                    [
                                        ("volume", v.name.as_str()),
                                        ("disk", p.disk.as_str()),
                                        ("state", st),
                                    ],
                                    x as i64,
                                )
                            })
                    })
                })
                .collect(),
        )?;
        gauges(
            &mut enc,
            "resync_progress_ratio",
            "How much of the plex is in sync: 1 in sync, 0 stale, the copy's progress while resyncing; absent for failed or missing plexes.",
            s.volumes
                .iter()
                .flat_map(|v| {
                    v.plexes.iter().filter_map(|p| {
                        let pct = p.resync_percent?;
                        Some((
                            [("volume", v.name.as_str()), ("disk", p.disk.as_str())],
                            (pct / 100.0).clamp(0.0, 1.0),
                        ))
                    })
                })
                .collect(),
        )?;
        gauges(
            &mut enc,
            "resync_rate_bytes_per_second",
            "The rate of the resync under way onto the plex (a moving average).",
            s.volumes
                .iter()
                .flat_map(|v| {
                    v.plexes.iter().filter_map(|p| {
                        Some((
                            [("volume", v.name.as_str()), ("disk", p.disk.as_str())],
                            p.resync_rate?,
                        ))
                    })
                })
                .collect(),
        )?;
        gauges(
            &mut enc,
            "disk_state",
            "The disk's state: 1 for the current one.",
            s.disks
                .iter()
                .flat_map(|d| {
                    state_series(&DISK_STATES, d.state)
                        .into_iter()
                        .map(|(st, x)| ([("disk", d.path.as_str()), ("state", st)], x as i64))
                })
                .collect(),
        )?;
        gauges(
            &mut enc,
            "disk_size_bytes",
            "The disk's size.",
            s.disks
                .iter()
                .map(|d| ([("disk", d.path.as_str())], d.size))
                .collect(),
        )?;
        gauges(
            &mut enc,
            "disk_free_bytes",
            "The disk's space not allocated to plexes.",
            s.disks
                .iter()
                .map(|d| ([("disk", d.path.as_str())], d.free))
                .collect(),
        )?;

        let per_disk = |f: &dyn Fn(&DiskSample) -> u64| -> Vec<([(&str, &str); 1], u64)> {
            self.disks
                .iter()
                .map(|d| ([("disk", d.path.as_str())], f(d)))
                .collect()
        };
        gauges(
            &mut enc,
            "disk_in_flight_requests",
            "Requests submitted to the disk's queue and not completed.",
            per_disk(&|d| d.in_flight as u64),
        )?;
        counters(
            &mut enc,
            "disk_read_bytes",
            "Bytes read from the disk.",
            per_disk(&|d| load(&d.stats.read_bytes)),
        )?;
        counters(
            &mut enc,
            "disk_written_bytes",
            "Bytes written to the disk (write-zeroes not included).",
            per_disk(&|d| load(&d.stats.written_bytes)),
        )?;
        counters(
            &mut enc,
            "disk_zeroed_bytes",
            "Bytes zeroed on the disk by write-zeroes (NBD WRITE_ZEROES and TRIM).",
            per_disk(&|d| load(&d.stats.zeroed_bytes)),
        )?;
        counters(
            &mut enc,
            "disk_operations",
            "Requests the disk completed, successful or not, by kind.",
            self.disks
                .iter()
                .flat_map(|d| {
                    OpKind::ALL.into_iter().map(|k| {
                        (
                            [("disk", d.path.as_str()), ("op", k.label())],
                            d.stats.ops(k),
                        )
                    })
                })
                .collect(),
        )?;
        counters(
            &mut enc,
            "disk_errors",
            "Requests the disk failed with an I/O error.",
            per_disk(&|d| load(&d.stats.errors)),
        )?;
        counters(
            &mut enc,
            "disk_timeouts",
            "Requests that did not complete within the I/O timeout.",
            per_disk(&|d| load(&d.stats.timeouts)),
        )?;
        if !self.disks.is_empty() {
            let mut m = enc.encode_descriptor(
                "disk_latency_seconds",
                "Time from submission to the disk's queue to completion, by kind.",
                None,
                MetricType::Histogram,
            )?;
            for d in &self.disks {
                for k in OpKind::ALL {
                    let labels = [("disk", d.path.as_str()), ("op", k.label())];
                    let l = &d.stats.latency[k as usize];
                    m.encode_family(&labels)?
                        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                            l.sum(),
                            l.count(),
                            &l.buckets(),
                            None,
                        )?;
                }
            }
        }
        if let Some(n) = self.nbd_connections {
            let m = enc.encode_descriptor(
                "nbd_connections",
                "NBD client connections open.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(n as u64).encode(m)?;
        }
        Ok(())
    }
}

/// Builds the exposition for one scrape; None once the group is gone.
pub type Scrape = Box<dyn Fn() -> Option<String> + Send>;

/// The scrape of a running `serve`.
pub fn scrape(live: &Arc<LiveGroup>, server: &Arc<Server>) -> Scrape {
    let (live, server): (Weak<LiveGroup>, Weak<Server>) =
        (Arc::downgrade(live), Arc::downgrade(server));
    Box::new(move || {
        let live = live.upgrade()?;
        let server = server.upgrade();
        Some(Snapshot::take(&live, server.as_deref())?.encode())
    })
}

/// The counters `iostat` reads: every disk's (as the metrics show them) and
/// every volume's, with the time they were read (Unix seconds).
pub fn iostat(live: &LiveGroup) -> serde_json::Value {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let status = live.status().ok();
    let path_of = |uuid: uuid::Uuid, q: &crate::volume::queue::DiskQueue| {
        status
            .as_ref()
            .and_then(|s| s.disks.iter().find(|d| d.uuid == uuid))
            .map_or_else(|| q.name().to_string(), |d| d.path.clone())
    };
    let mut queues = live.disk_queues();
    // In the order status lists the disks.
    let rank = |u: &uuid::Uuid| {
        status
            .as_ref()
            .and_then(|s| s.disks.iter().position(|d| d.uuid == *u))
            .unwrap_or(usize::MAX)
    };
    queues.sort_by_key(|(u, _)| rank(u));
    let disks: Vec<serde_json::Value> = queues
        .into_iter()
        .map(|(uuid, q)| {
            let s = q.stats();
            serde_json::json!({
                "path": path_of(uuid, &q),
                "reads": s.ops(OpKind::Read),
                "writes": s.ops(OpKind::Write),
                "flushes": s.ops(OpKind::Flush),
                "zeroes": s.ops(OpKind::Zeroes),
                "read_bytes": load(&s.read_bytes),
                "written_bytes": load(&s.written_bytes),
                "zeroed_bytes": load(&s.zeroed_bytes),
                "errors": load(&s.errors),
                "timeouts": load(&s.timeouts),
                "read_seconds": s.latency[OpKind::Read as usize].sum(),
                "write_seconds": s.latency[OpKind::Write as usize].sum(),
                "in_flight": q.pending(),
            })
        })
        .collect();
    let volumes: Vec<serde_json::Value> = live
        .volume_names()
        .into_iter()
        .filter_map(|n| live.volume(&n))
        .map(|v| {
            serde_json::json!({
                "name": v.name,
                "reads": load(&v.io.reads),
                "writes": load(&v.io.writes),
                "read_bytes": load(&v.io.read_bytes),
                "written_bytes": load(&v.io.written_bytes),
            })
        })
        .collect();
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    // Intervals are measured on the monotonic clock: a wall clock set
    // back or forward between two samples would make rates up.
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let monotonic = BASE
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64();
    serde_json::json!({"time": time, "monotonic": monotonic, "disks": disks, "volumes": volumes})
}

/// The HTTP endpoint; it stops when dropped.
pub struct MetricsEndpoint {
    http: Arc<tiny_http::Server>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl MetricsEndpoint {
    /// Serves `scrape` at `/metrics` on `listener`.
    pub fn start(listener: TcpListener, scrape: Scrape) -> Result<MetricsEndpoint> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("the metrics listener has no address", e))?;
        let http = tiny_http::Server::from_listener(listener, None)
            .map_err(|e| Error::failed(format!("cannot serve metrics on {addr}: {e}")))?;
        let http = Arc::new(http);
        let stopping = Arc::new(AtomicBool::new(false));
        let (h, stop) = (http.clone(), stopping.clone());
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // An error is a connection that failed to come in, or
                    // the wake-up of `unblock`: the flag tells which.
                    if let Ok(request) = h.recv() {
                        answer(request, &scrape);
                    }
                }
            })
            .map_err(|e| Error::io("cannot start the metrics thread", e))?;
        Ok(MetricsEndpoint {
            http,
            stopping,
            thread: Some(thread),
            addr,
        })
    }

    /// The address it listens on (the port chosen, for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.http.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An HTTP header of this crate's own making (always valid).
pub(super) fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("a valid header")
}

/// Answers one request: the exposition at `/metrics`, 404 elsewhere.
fn answer(request: tiny_http::Request, scrape: &Scrape) {
    let path = request.url().split('?').next().unwrap_or("");
    let method = request.method().clone();
    let text = |code: u16, body: String| {
        tiny_http::Response::from_string(body)
            .with_status_code(code)
            .with_header(header("Content-Type", "text/plain; charset=utf-8"))
    };
    let response = match (path, &method) {
        ("/metrics", tiny_http::Method::Get | tiny_http::Method::Head) => match scrape() {
            Some(body) => tiny_http::Response::from_string(body).with_header(header(
                "Content-Type",
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )),
            None => text(503, "mirrorvol serve is stopping\n".into()),
        },
        ("/metrics", _) => text(405, format!("{method} is not allowed on /metrics\n"))
            .with_header(header("Allow", "GET, HEAD")),
        _ => {
            let mut body = String::new();
            let _ = writeln!(body, "no such page: {path}; metrics are at /metrics");
            text(404, body)
        }
    };
    // A client that went away costs nothing but its answer.
    let _ = request.respond(response);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::status::{DiskStatus, GroupStatus, PlexStatus, VolumeStatus};

    fn report() -> StatusReport {
        let plex = |disk: &str, state, pct, rate| PlexStatus {
            disk: disk.into(),
            offset: 0,
            length: 16 << 20,
            state,
            resync_percent: pct,
            resync_reason: None,
            resync_rate: rate,
            resync_eta_seconds: None,
            resync_held: None,
        };
        let disk = |path: &str, state| DiskStatus {
            path: path.into(),
            uuid: uuid::Uuid::new_v4(),
            state,
            controller: "c0".into(),
            style: "raw".into(),
            size: 64 << 20,
            data_size: 62 << 20,
            checksums: Some(true),
            format: Some(5),
            free: 32 << 20,
            largest_free: 32 << 20,
            errors: 0,
            spare: false,
            write_mostly: false,
            write_behind: 0,
            timeout_ms: 30_000,
            own_timeout: false,
            replaced_by: None,
            generation: None,
            io_engine: Some("uring"),
            link: None,
        };
        StatusReport {
            unreadable: Vec::new(),
            group: GroupStatus {
                generation: None,
                held_by: None,
                holder_progress: None,
                name: "g".into(),
                uuid: uuid::Uuid::new_v4(),
                seqno: 7,
            },
            disks: vec![disk("/d/a", "online"), disk("/d/b", "online")],
            volumes: vec![VolumeStatus {
                name: "data".into(),
                uuid: uuid::Uuid::new_v4(),
                size: 16 << 20,
                layout: "mirror",
                state: "resynching",
                duplexed: false,
                plexes: vec![
                    plex("/d/a", "in-sync", Some(100.0), None),
                    plex("/d/b", "resyncing", Some(25.0), Some(1 << 20)),
                ],
                split_brain: false,
                clients: None,
                waiting_on: Vec::new(),
                scrub: None,
                copy: None,
                written: None,
            }],
            split_brain: Vec::new(),
        }
    }

    #[test]
    fn snapshot_encodes_states_counters_and_histograms_as_prometheus_text() {
        let stats = Arc::new(DiskStats::default());
        stats.written_bytes.store(8192, Ordering::Relaxed);
        stats.latency[OpKind::Write as usize].observe(std::time::Duration::from_micros(300));
        stats.latency[OpKind::Write as usize].observe(std::time::Duration::from_secs(20));
        let snap = Snapshot {
            status: report(),
            disks: vec![DiskSample {
                path: "/d/a".into(),
                stats,
                in_flight: 3,
            }],
            nbd_connections: Some(1),
        };
        let text = snap.encode();
        for line in [
            "# TYPE mirrorvol_volume_state gauge",
            r#"mirrorvol_volume_state{volume="data",state="resynching"} 1"#,
            r#"mirrorvol_volume_state{volume="data",state="healthy"} 0"#,
            r#"mirrorvol_volume_size_bytes{volume="data"} 16777216"#,
            r#"mirrorvol_volume_plexes{volume="data"} 2"#,
            r#"mirrorvol_plex_state{volume="data",disk="/d/b",state="resyncing"} 1"#,
            r#"mirrorvol_resync_progress_ratio{volume="data",disk="/d/b"} 0.25"#,
            r#"mirrorvol_resync_progress_ratio{volume="data",disk="/d/a"} 1.0"#,
            r#"mirrorvol_resync_rate_bytes_per_second{volume="data",disk="/d/b"} 1048576"#,
            r#"mirrorvol_disk_state{disk="/d/a",state="online"} 1"#,
            r#"mirrorvol_disk_in_flight_requests{disk="/d/a"} 3"#,
            "# TYPE mirrorvol_disk_written_bytes_total counter",
            r#"mirrorvol_disk_written_bytes_total{disk="/d/a"} 8192"#,
            r#"mirrorvol_disk_operations_total{disk="/d/a",op="write"} 2"#,
            r#"mirrorvol_disk_operations_total{disk="/d/a",op="zeroes"} 0"#,
            "# TYPE mirrorvol_disk_latency_seconds histogram",
            r#"mirrorvol_disk_latency_seconds_bucket{disk="/d/a",op="write",le="5e-05"} 0"#,
            r#"mirrorvol_disk_latency_seconds_bucket{disk="/d/a",op="write",le="0.0005"} 1"#,
            r#"mirrorvol_disk_latency_seconds_bucket{disk="/d/a",op="write",le="10"} 1"#,
            r#"mirrorvol_disk_latency_seconds_bucket{disk="/d/a",op="write",le="+Inf"} 2"#,
            r#"mirrorvol_disk_latency_seconds_sum{disk="/d/a",op="write"} 20.0003"#,
            r#"mirrorvol_disk_latency_seconds_count{disk="/d/a",op="write"} 2"#,
            "mirrorvol_nbd_connections 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        // The resync rate exists only while a resync runs.
        assert!(!text.contains(r#"resync_rate_bytes_per_second{volume="data",disk="/d/a"}"#));
        // Prometheus 0.0.4 text has no EOF marker.
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn a_new_state_still_gets_its_series() {
        let s = state_series(&DISK_STATES, "sleeping");
        assert_eq!(s.len(), DISK_STATES.len() + 1);
        assert_eq!(s.last(), Some(&("sleeping", 1)));
        assert_eq!(s.iter().map(|(_, x)| *x as u32).sum::<u32>(), 1);
    }

    #[test]
    fn bind_refuses_a_taken_address_and_a_malformed_one() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = bind(&addr).unwrap_err();
        assert!(matches!(err, Error::Refused(_)), "{err}");
        assert!(err.to_string().contains(&addr), "{err}");
        assert!(matches!(bind("no-port-here"), Err(Error::Refused(_))));
        let l = bind("127.0.0.1:0").unwrap();
        assert_ne!(l.local_addr().unwrap().port(), 0);
    }
}
