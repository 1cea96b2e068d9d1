//! The text view of `status`: Windows' words for states, one table for the
//! disks and one for the volumes.

use crate::group::ops::human;
use crate::group::status::StatusReport;

/// Windows' capitalised words for the JSON states.
pub(crate) fn word(state: &str) -> &str {
    match state {
        "healthy" => "Healthy",
        "resynching" => "Resynching",
        "failed-redundancy" => "Failed Redundancy",
        "failed-redundancy-at-risk" => "Failed Redundancy (At Risk)",
        "failed" => "Failed",
        "not-answering" => "Not Answering",
        "online" => "Online",
        "online-errors" => "Online (Errors)",
        "missing" => "Missing",
        "offline" => "Offline",
        other => other,
    }
}

/// Lays out rows as left-aligned columns.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map(|s| s.chars().count()).unwrap_or(0))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A plex in the status table: its disk and state; while it resyncs, the
/// progress, and under `serve` the rate and the time left.
fn plex_text(p: &super::status::PlexStatus) -> String {
    let text = plex_progress(p);
    match p.resync_held {
        Some(held) => format!("{}, resync {held})", text.trim_end_matches(')')),
        None => text,
    }
}

fn plex_progress(p: &super::status::PlexStatus) -> String {
    match (p.state, p.resync_percent) {
        ("resyncing", Some(pct)) => {
            let mut text = format!("{} (resyncing {pct:.0}%", p.disk);
            if let Some(rate) = p.resync_rate {
                text.push_str(&format!(", {}/s", human(rate)));
            }
            if let Some(eta) = p.resync_eta_seconds {
                text.push_str(&format!(", {} left", show_seconds(eta)));
            }
            text.push(')');
            text
        }
        (state, _) => format!("{} ({state})", p.disk),
    }
}

/// A task under way on a volume: "(scrub 42%, 35 MiB/s, 3 s left)".
fn task_text(what: &str, percent: f64, rate: u64, eta: Option<u64>) -> String {
    let mut text = format!("({what} {percent:.0}%");
    if rate > 0 {
        text.push_str(&format!(", {}/s", human(rate)));
    }
    if let Some(eta) = eta {
        text.push_str(&format!(", {} left", show_seconds(eta)));
    }
    text.push(')');
    text
}

/// "42 s", "3 min 5 s", "2 h 10 min".
pub(crate) fn show_seconds(s: u64) -> String {
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

pub fn status_text(r: &StatusReport) -> String {
    let mut out = format!(
        "Group {} ({}), config {}{}\n",
        r.group.name,
        r.group.uuid,
        r.group.seqno,
        r.group
            .generation
            .map(|g| format!(", data generation {g}"))
            .unwrap_or_default()
    );
    if let Some(h) = &r.group.held_by {
        out.push_str(&format!("Held by {h}\n"));
    }
    if let Some(p) = &r.group.holder_progress {
        let mut line = format!(
            "  {}: {:.1}% ({} of {}",
            p.what,
            p.percent,
            human(p.done),
            human(p.total)
        );
        if p.rate > 0 {
            line.push_str(&format!(", {}/s", human(p.rate)));
        }
        if let Some(eta) = p.eta_seconds {
            line.push_str(&format!(", {} left", show_seconds(eta)));
        }
        if let Some(age) = p.not_renewed_for {
            line.push_str(&format!(
                "; its claim was last renewed {} ago",
                show_seconds(age)
            ));
        }
        out.push_str(&line);
        out.push_str(")\n");
    }
    out.push('\n');
    let mut disks = vec![vec![
        "DISK".to_string(),
        "STATE".into(),
        "CONTROLLER".into(),
        "STYLE".into(),
        "SIZE".into(),
        "FREE".into(),
        "ERRORS".into(),
    ]];
    for d in &r.disks {
        disks.push(vec![
            d.path.clone(),
            match (&d.replaced_by, d.spare) {
                (Some(by), _) => format!("{} (being replaced by {by})", word(d.state)),
                (None, true) => format!("{} (hot spare)", word(d.state)),
                (None, false) if d.write_behind > 0 => format!(
                    "{} (write-mostly, write-behind {})",
                    word(d.state),
                    d.write_behind
                ),
                (None, false) if d.write_mostly => format!("{} (write-mostly)", word(d.state)),
                (None, false) => word(d.state).to_string(),
            } + &if d.own_timeout {
                format!(
                    " (deadline {})",
                    crate::group::show_duration(std::time::Duration::from_millis(d.timeout_ms))
                )
            } else {
                String::new()
            },
            d.controller.clone(),
            d.style.clone(),
            human(d.size),
            human(d.free),
            d.errors.to_string(),
        ]);
    }
    out.push_str(&table(&disks));
    for d in &r.disks {
        if let Some(link) = d.link.as_ref().filter(|l| *l != "connected") {
            out.push_str(&format!("Link of {}: {link}\n", d.path));
        }
    }
    for d in r.disks.iter().filter(|d| d.checksums == Some(false)) {
        out.push_str(&format!(
            "Checksums of {}: none yet (format {}); `mirrorvol scrub VOLUME --repair` adds them\n",
            d.path,
            d.format.unwrap_or(0)
        ));
    }
    for u in &r.unreadable {
        out.push_str(&format!("Unreadable: {} ({})\n", u.path, u.reason));
    }
    if r.volumes.is_empty() {
        out.push_str("\nNo volumes.\n");
        out.push_str(&split_text(r));
        return out;
    }
    // Under `serve` the volumes' NBD clients get a column.
    let served = r.volumes.iter().any(|v| v.clients.is_some());
    let mut head = vec![
        "VOLUME".to_string(),
        "LAYOUT".into(),
        "SIZE".into(),
        "STATE".into(),
        "DUPLEXED".into(),
    ];
    if served {
        head.push("CLIENTS".into());
    }
    head.push("PLEXES".into());
    let mut vols = vec![head];
    for v in &r.volumes {
        // One plex a row: the volume's columns on the first.
        let mut plexes: Vec<String> = v.plexes.iter().map(plex_text).collect();
        if !v.waiting_on.is_empty() {
            plexes.push(format!("(waiting on {})", v.waiting_on.join(", ")));
        }
        if plexes.is_empty() {
            plexes.push("-".into());
        }
        if let Some(s) = &v.scrub {
            let what = if s.repair { "scrub --repair" } else { "scrub" };
            plexes.push(task_text(what, s.percent, s.rate, s.eta_seconds));
        }
        if let Some(c) = &v.copy {
            let what = format!("copy {} to {}", c.from, c.to);
            plexes.push(task_text(&what, c.percent, c.rate, c.eta_seconds));
        }
        if let Some(w) = v.written.filter(|_| v.layout == "mirror") {
            plexes.push(format!("written: {} (what a rebuild copies)", human(w)));
        }
        for (i, plex) in plexes.into_iter().enumerate() {
            let mut row = if i == 0 {
                vec![
                    v.name.clone(),
                    v.layout.to_string(),
                    human(v.size),
                    word(v.state).to_string(),
                    if v.layout == "mirror" {
                        if v.duplexed { "yes" } else { "no" }.to_string()
                    } else {
                        "-".to_string()
                    },
                ]
            } else {
                vec![String::new(); 5]
            };
            if served {
                row.push(match (i, v.clients) {
                    (0, Some(n)) => n.to_string(),
                    _ => String::new(),
                });
            }
            row.push(plex);
            vols.push(row);
        }
    }
    out.push('\n');
    out.push_str(&table(&vols));
    out.push_str(&split_text(r));
    out
}

/// The sides of a split group and what each changed.
fn split_text(r: &StatusReport) -> String {
    if r.split_brain.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\nSPLIT BRAIN: these sides changed without each other; nothing is served or written until \
         one is kept with `mirrorvol resolve-split-brain --keep PATH`\n",
    );
    for (i, side) in r.split_brain.iter().enumerate() {
        out.push_str(&format!(
            "  side {}: {} (config {})\n",
            i + 1,
            side.disks.join(", "),
            side.seqno
        ));
        for v in &side.volumes {
            match (&v.unknown, v.regions, v.bytes) {
                (None, Some(n), Some(b)) => out.push_str(&format!(
                    "    volume {}: {n} region{} changed ({})\n",
                    v.name,
                    if n == 1 { "" } else { "s" },
                    human(b)
                )),
                (why, _, _) => out.push_str(&format!(
                    "    volume {}: unknown, assume all of it ({})\n",
                    v.name,
                    why.as_deref().unwrap_or("no bitmap")
                )),
            }
        }
    }
    out
}

/// "a.img", "a.img and b.img", "a.img, b.img and c.img".
pub fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::status::PlexStatus;

    fn plex(
        state: &'static str,
        pct: Option<f64>,
        rate: Option<u64>,
        eta: Option<u64>,
    ) -> PlexStatus {
        PlexStatus {
            disk: "b.img".into(),
            offset: 0,
            length: 1 << 20,
            state,
            resync_percent: pct,
            resync_reason: None,
            resync_rate: rate,
            resync_eta_seconds: eta,
            resync_held: None,
        }
    }

    #[test]
    fn a_resyncing_plex_shows_its_progress_rate_and_time_left() {
        assert_eq!(
            plex_text(&plex("in-sync", Some(100.0), None, None)),
            "b.img (in-sync)"
        );
        assert_eq!(
            plex_text(&plex("resyncing", Some(41.6), None, None)),
            "b.img (resyncing 42%)"
        );
        assert_eq!(
            plex_text(&plex("resyncing", Some(42.0), Some(35 << 20), Some(185))),
            "b.img (resyncing 42%, 35 MiB/s, 3 min 5 s left)"
        );
        assert_eq!(show_seconds(42), "42 s");
        assert_eq!(show_seconds(7800), "2 h 10 min");
    }
}
