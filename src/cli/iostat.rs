//! `iostat [--interval S] [--count N] [--json]`: the I/O of every disk and
//! volume of the group `serve` holds, from the daemon's counters (the same
//! the metrics endpoint shows). The first report is the totals since serve
//! opened the disks; each next one, with `--interval`, the rates over the
//! interval since the one before, as iostat(1) does.

use serde_json::{Value, json};

use crate::group::ops::human;
use crate::{Error, Result};

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string()
}

fn rows<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// The same disk or volume in an earlier sample.
fn before<'a>(earlier: &'a Value, list: &str, id: &str, name: &str) -> Option<&'a Value> {
    rows(earlier, list).iter().find(|r| text(r, id) == name)
}

/// A report: totals (no earlier sample) or rates since `earlier`.
pub fn report(now: &Value, earlier: Option<&Value>) -> Value {
    // The daemon's monotonic clock, where both samples carry it.
    let clock = match earlier.is_some_and(|e| e.get("monotonic").is_some())
        && now.get("monotonic").is_some()
    {
        true => "monotonic",
        false => "time",
    };
    let secs = earlier.map(|e| (num(now, clock) - num(e, clock)).max(1e-3));
    let per = |r: &Value, e: Option<&Value>, key: &str| -> f64 {
        match (e, secs) {
            (Some(e), Some(s)) => ((num(r, key) - num(e, key)).max(0.0)) / s,
            _ => num(r, key),
        }
    };
    // Milliseconds per request over the interval (or since the start).
    let wait = |r: &Value, e: Option<&Value>, time: &str, ops: &str| -> f64 {
        let d = |k: &str| num(r, k) - e.map_or(0.0, |e| num(e, k));
        let n = d(ops);
        if n > 0.0 { d(time) * 1000.0 / n } else { 0.0 }
    };
    // A rate needs the same row in the earlier sample (a disk or volume
    // that came since is left out of that report).
    let baseline = |list: &str, id: &str, r: &Value| {
        earlier.map(|e| before(e, list, id, &text(r, id)).is_some())
    };
    let disks: Vec<Value> = rows(now, "disks")
        .iter()
        .filter(|r| baseline("disks", "path", r) != Some(false))
        .map(|r| {
            let e = earlier.and_then(|e| before(e, "disks", "path", &text(r, "path")));
            json!({
                "path": text(r, "path"),
                "reads": per(r, e, "reads"),
                "writes": per(r, e, "writes"),
                "read_bytes": per(r, e, "read_bytes"),
                "written_bytes": per(r, e, "written_bytes"),
                "read_await_ms": wait(r, e, "read_seconds", "reads"),
                "write_await_ms": wait(r, e, "write_seconds", "writes"),
                "in_flight": num(r, "in_flight"),
                "errors": per(r, e, "errors"),
            })
        })
        .collect();
    let volumes: Vec<Value> = rows(now, "volumes")
        .iter()
        .filter(|r| baseline("volumes", "name", r) != Some(false))
        .map(|r| {
            let e = earlier.and_then(|e| before(e, "volumes", "name", &text(r, "name")));
            json!({
                "name": text(r, "name"),
                "reads": per(r, e, "reads"),
                "writes": per(r, e, "writes"),
                "read_bytes": per(r, e, "read_bytes"),
                "written_bytes": per(r, e, "written_bytes"),
            })
        })
        .collect();
    json!({
        "time": num(now, "time"),
        // null: totals since serve opened the disks; else per second.
        "interval": secs,
        "disks": disks,
        "volumes": volumes,
    })
}

/// A report as a table.
pub fn table(r: &Value) -> String {
    let rates = r.get("interval").is_some_and(|i| !i.is_null());
    let (ops, bytes) = if rates {
        (["r/s", "w/s"], ["read/s", "written/s"])
    } else {
        (["reads", "writes"], ["read", "written"])
    };
    let count = |x: f64| {
        if rates {
            format!("{x:.1}")
        } else {
            format!("{x:.0}")
        }
    };
    let size = |x: f64| {
        let s = human(x.round() as u64);
        if rates { format!("{s}/s") } else { s }
    };
    let mut out = if rates {
        format!("over {:.1} s:\n", num(r, "interval"))
    } else {
        "since serve opened the disks:\n".to_string()
    };
    let mut lines = vec![vec![
        "DISK".to_string(),
        ops[0].into(),
        ops[1].into(),
        bytes[0].into(),
        bytes[1].into(),
        "r_await".into(),
        "w_await".into(),
        "in-flight".into(),
        "errors".into(),
    ]];
    for d in rows(r, "disks") {
        lines.push(vec![
            text(d, "path"),
            count(num(d, "reads")),
            count(num(d, "writes")),
            size(num(d, "read_bytes")),
            size(num(d, "written_bytes")),
            format!("{:.2} ms", num(d, "read_await_ms")),
            format!("{:.2} ms", num(d, "write_await_ms")),
            format!("{:.0}", num(d, "in_flight")),
            count(num(d, "errors")),
        ]);
    }
    lines.push(Vec::new());
    lines.push(vec![
        "VOLUME".to_string(),
        ops[0].into(),
        ops[1].into(),
        bytes[0].into(),
        bytes[1].into(),
    ]);
    for v in rows(r, "volumes") {
        lines.push(vec![
            text(v, "name"),
            count(num(v, "reads")),
            count(num(v, "writes")),
            size(num(v, "read_bytes")),
            size(num(v, "written_bytes")),
        ]);
    }
    let widths: Vec<usize> = (0..9)
        .map(|c| {
            lines
                .iter()
                .filter_map(|l| l.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if i == 0 {
                    format!("{s:<w$}", w = widths[0])
                } else {
                    format!("{s:>w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Checks `--interval` and `--count`.
pub fn check(interval: Option<f64>, count: Option<u64>) -> Result<()> {
    if let Some(i) = interval
        && !(i.is_finite() && (0.1..=86_400.0).contains(&i))
    {
        return Err(Error::refused(format!(
            "iostat --interval {i} is out of range: give seconds from 0.1 to 86400"
        )));
    }
    if count == Some(0) {
        return Err(Error::refused(
            "iostat --count 0 would print nothing: give 1 or more",
        ));
    }
    if count.is_some() && interval.is_none() {
        return Err(Error::refused(
            "iostat --count needs --interval: the reports after the first are rates over an interval",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(time: f64, reads: u64, bytes: u64, secs: f64) -> Value {
        json!({
            "time": time,
            "disks": [{"path": "/d/a", "reads": reads, "writes": 0, "read_bytes": bytes,
                       "written_bytes": 0, "errors": 0, "in_flight": 2,
                       "read_seconds": secs, "write_seconds": 0.0}],
            "volumes": [{"name": "data", "reads": reads, "writes": 0, "read_bytes": bytes, "written_bytes": 0}],
        })
    }

    #[test]
    fn the_first_report_is_totals_and_the_next_ones_rates() {
        let a = sample(100.0, 10, 40960, 0.010);
        let b = sample(102.0, 210, 40960 + (2 << 20), 0.210);
        let first = report(&a, None);
        assert!(first["interval"].is_null());
        assert_eq!(first["disks"][0]["reads"], 10.0);
        assert_eq!(first["disks"][0]["read_await_ms"], 1.0);
        let next = report(&b, Some(&a));
        assert_eq!(next["interval"], 2.0);
        assert_eq!(next["disks"][0]["reads"], 100.0);
        assert_eq!(next["disks"][0]["read_bytes"], (1u64 << 20) as f64);
        assert_eq!(next["volumes"][0]["read_bytes"], (1u64 << 20) as f64);
        // 200 reads took 0.2 s: 1 ms each.
        assert!((next["disks"][0]["read_await_ms"].as_f64().unwrap() - 1.0).abs() < 1e-9);
        let t = table(&next);
        assert!(t.starts_with("over 2.0 s:"), "{t}");
        assert!(t.contains("1 MiB/s") && t.contains("100.0"), "{t}");
        assert!(table(&first).contains("since serve opened the disks"));
    }

    #[test]
    fn intervals_are_measured_on_the_daemons_monotonic_clock() {
        let mut a = sample(100.0, 10, 0, 0.0);
        let mut b = sample(40.0, 210, 0, 0.0);
        // The wall clock went back a minute between the samples; the
        // monotonic one moved on 2 s.
        a["monotonic"] = json!(5.0);
        b["monotonic"] = json!(7.0);
        let r = report(&b, Some(&a));
        assert_eq!(r["interval"], 2.0);
        assert_eq!(r["disks"][0]["reads"], 100.0);
    }

    #[test]
    fn intervals_and_counts_out_of_range_are_refused() {
        assert!(check(Some(0.0), None).is_err());
        assert!(check(Some(f64::NAN), None).is_err());
        assert!(check(Some(1.0), Some(0)).is_err());
        assert!(check(None, Some(3)).is_err());
        assert!(check(Some(0.5), Some(3)).is_ok());
        assert!(check(None, None).is_ok());
    }
}
