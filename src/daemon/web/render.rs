//! The web view's HTML, drawn from the document `status --json` prints
//! (and the events the daemon last emitted): one renderer, used for the
//! page a browser loads and for every live update, so the picture with
//! JavaScript off and the one kept live by it are the same.
//!
//! Nothing here uses inline styles or scripts: the page's Content Security
//! Policy allows only its own style sheet and script. Sizes and colours
//! are SVG presentation attributes.

use std::fmt::Write as _;

use serde_json::Value;

use crate::group::ops::human;
use crate::group::show::{show_seconds, word};

/// Width of a disk's bar, in pixels (the SVG scales down on narrow
/// screens: it has a viewBox).
const BAR_WIDTH: f64 = 800.0;
const BAR_HEIGHT: f64 = 64.0;
/// A plex drawn narrower than this would vanish: it is drawn this wide.
const MIN_PLEX_WIDTH: f64 = 6.0;

/// One colour per volume, in the order `status` lists them (as Disk
/// Management colours each volume's extents alike across disks).
const COLOURS: [&str; 8] = [
    "#3465a4", "#a3458f", "#2e8b57", "#c4731c", "#6a5acd", "#b03a3a", "#1f8fa8", "#7f7f22",
];

/// Escapes text for HTML content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn number(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// How good a state is, for its colour: `ok`, `warn` or `bad`.
fn tone(state: &str) -> &'static str {
    match state {
        "healthy" | "online" | "in-sync" => "ok",
        "resynching" | "resyncing" | "stale" | "online-errors" | "offline" => "warn",
        _ => "bad",
    }
}

/// A plex's state in Disk Management's words, with its progress.
fn plex_word(p: &Value) -> String {
    let words = plex_state_word(p);
    match p.get("resync_held").and_then(Value::as_str) {
        Some(held) => format!("{words}, {held}"),
        None => words,
    }
}

fn plex_state_word(p: &Value) -> String {
    let pct = p.get("resync_percent").and_then(Value::as_f64);
    match (text(p, "state"), pct) {
        ("in-sync", _) => "In Sync".into(),
        ("resyncing", Some(pct)) => format!("Resynching ({pct:.0}%)"),
        ("resyncing", None) => "Resynching".into(),
        ("stale", _) => "Stale".into(),
        ("failed", _) => "Failed".into(),
        ("missing", _) => "Missing".into(),
        (other, _) => other.to_string(),
    }
}

/// A volume's state in Disk Management's words; while it resyncs, the
/// progress of its slowest copy.
fn volume_word(v: &Value) -> String {
    let state = text(v, "state");
    if state == "resynching" {
        let least = list(v, "plexes")
            .iter()
            .filter(|p| text(p, "state") == "resyncing")
            .filter_map(|p| p.get("resync_percent").and_then(Value::as_f64))
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))));
        if let Some(pct) = least {
            return format!("Resynching ({pct:.0}%)");
        }
    }
    word(state).to_string()
}

/// What the page may offer: the actions, with the token they carry.
#[derive(Debug, Clone, Copy)]
pub enum Offer<'a> {
    /// `serve` was started without `--http-actions`.
    Off,
    /// Actions are on, but this page was opened without the token.
    Locked,
    /// Actions are on and the page holds the token.
    Actions(&'a str),
}

/// A button that posts one action (its confirmation comes first).
fn action(offer: Offer, op: &str, fields: &[(&str, &str)], label: &str) -> String {
    let Offer::Actions(token) = offer else {
        return String::new();
    };
    let mut f = format!(
        "<form class=\"act\" method=\"post\" action=\"/action\" data-op=\"{}\"",
        esc(op)
    );
    for (k, v) in fields {
        let _ = write!(f, " data-{}=\"{}\"", esc(k), esc(v));
    }
    let _ = write!(
        f,
        "><input type=\"hidden\" name=\"token\" value=\"{}\"><input type=\"hidden\" name=\"op\" value=\"{}\">",
        esc(token),
        esc(op)
    );
    for (k, v) in fields {
        let _ = write!(
            f,
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            esc(k),
            esc(v)
        );
    }
    let _ = write!(f, "<button type=\"submit\">{}</button></form>", esc(label));
    f
}

/// The alerts a glance should catch: volumes without full redundancy,
/// split brain, mirrors not duplexed, disks out of service, paths that
/// could not be read.
fn alerts(status: &Value) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let sides = list(status, "split_brain");
    if !sides.is_empty() {
        let described: Vec<String> = sides
            .iter()
            .map(|s| {
                let disks: Vec<&str> = list(s, "disks").iter().filter_map(Value::as_str).collect();
                format!("{} (config {})", disks.join(", "), number(s, "seqno"))
            })
            .collect();
        out.push((
            "bad",
            format!(
                "Split brain: the disks parted and both sides changed ({}). Nothing of the volumes they share is served until one side is kept with `mirrorvol resolve-split-brain --keep PATH`.",
                described.join(" against ")
            ),
        ));
    }
    for v in list(status, "volumes") {
        let (name, state) = (text(v, "name"), text(v, "state"));
        let why = match state {
            "healthy" | "resynching" => None,
            "failed-redundancy" => Some("a copy is failed, missing or stale: repair it"),
            "failed-redundancy-at-risk" => {
                Some("an in-sync copy sits on a disk with I/O errors: replace that disk")
            }
            "failed" => Some("no copy of it is in service"),
            "not-answering" => Some("every copy waits on a disk past its deadline"),
            _ => Some("its state is not healthy"),
        };
        if let Some(why) = why {
            out.push((
                tone(state),
                format!("Volume {name} is {}: {why}.", volume_word(v)),
            ));
        }
        if text(v, "layout") == "mirror" && v.get("duplexed") == Some(&Value::Bool(false)) {
            out.push((
                "warn",
                format!(
                    "Mirror {name} is not duplexed: two of its copies sit behind one controller, so that controller failing fails the volume."
                ),
            ));
        }
    }
    for d in list(status, "disks") {
        let state = text(d, "state");
        if matches!(state, "failed" | "missing" | "offline") {
            out.push((
                "bad",
                format!("Disk {} is {}.", text(d, "path"), word(state)),
            ));
        }
    }
    for u in list(status, "unreadable") {
        out.push((
            "bad",
            format!(
                "{} could not be read: {}.",
                text(u, "path"),
                text(u, "reason")
            ),
        ));
    }
    out
}

/// The colour of each volume, by name.
fn colours(status: &Value) -> Vec<(&str, &'static str)> {
    list(status, "volumes")
        .iter()
        .enumerate()
        .map(|(i, v)| (text(v, "name"), COLOURS[i % COLOURS.len()]))
        .collect()
}

fn colour_of<'a>(colours: &[(&str, &'a str)], name: &str) -> &'a str {
    colours
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("#888888", |(_, c)| c)
}

/// A small square in a volume's colour.
fn swatch(colour: &str) -> String {
    format!(
        "<svg class=\"swatch\" width=\"12\" height=\"12\" aria-hidden=\"true\"><rect width=\"12\" height=\"12\" fill=\"{colour}\"/></svg>"
    )
}

/// One disk: its description, and a bar of its data area with each plex
/// drawn at its offset and size, in its volume's colour.
fn disk_row(
    out: &mut String,
    index: usize,
    d: &Value,
    status: &Value,
    colours: &[(&str, &str)],
    offer: Offer,
) {
    let path = text(d, "path");
    let state = text(d, "state");
    let data = number(d, "data_size").max(1);
    let spare = d.get("spare") == Some(&Value::Bool(true));
    let _ = write!(
        out,
        "<div class=\"disk {tone}\" data-disk=\"{p}\" data-state=\"{s}\"><div class=\"about\"><b>Disk {index}</b> <span class=\"state {tone}\">{w}{spare}</span><br><span class=\"path\">{p}</span><br>{size} · {style} · controller {ctl}<br>{free} free{errors}",
        tone = tone(state),
        p = esc(path),
        s = esc(state),
        w = esc(word(state)),
        spare = match d.get("replaced_by").and_then(Value::as_str) {
            Some(by) => format!(" (being replaced by {})", esc(by)),
            None if spare => " (hot spare)".to_string(),
            None => String::new(),
        },
        size = human(number(d, "size")),
        style = esc(text(d, "style")),
        ctl = esc(text(d, "controller")),
        free = human(number(d, "free")),
        errors = match number(d, "errors") {
            0 => String::new(),
            n => format!(" · {n} I/O error{}", if n == 1 { "" } else { "s" }),
        },
    );
    let mut buttons = String::new();
    if matches!(state, "online" | "online-errors") {
        buttons.push_str(&action(offer, "fail", &[("disk", path)], "Fail"));
    } else {
        buttons.push_str(&action(
            offer,
            "reactivate",
            &[("disk", path)],
            "Reactivate",
        ));
    }
    if !buttons.is_empty() {
        let _ = write!(out, "<div class=\"buttons\">{buttons}</div>");
    }
    let _ = write!(
        out,
        "</div><svg class=\"bar\" viewBox=\"0 0 {BAR_WIDTH} {BAR_HEIGHT}\" width=\"{BAR_WIDTH}\" height=\"{BAR_HEIGHT}\" role=\"img\" aria-label=\"The data area of disk {index}\"><rect class=\"unallocated\" x=\"0\" y=\"0\" width=\"{BAR_WIDTH}\" height=\"{BAR_HEIGHT}\"/>",
    );
    for v in list(status, "volumes") {
        let name = text(v, "name");
        for p in list(v, "plexes").iter().filter(|p| text(p, "disk") == path) {
            // At least MIN_PLEX_WIDTH wide, within the bar: a small plex
            // at the end of a large disk moves left to stay seen.
            let w = (number(p, "length") as f64 / data as f64 * BAR_WIDTH)
                .clamp(MIN_PLEX_WIDTH, BAR_WIDTH);
            let x =
                (number(p, "offset") as f64 / data as f64 * BAR_WIDTH).clamp(0.0, BAR_WIDTH - w);
            let pstate = text(p, "state");
            // A nested svg clips the plex's text to its box.
            let _ = write!(
                out,
                "<svg class=\"plex {tone}\" data-volume=\"{n}\" data-state=\"{s}\" x=\"{x:.1}\" y=\"0\" width=\"{w:.1}\" height=\"{BAR_HEIGHT}\"><title>{n}: {words} ({size})</title><rect class=\"extent\" x=\"0\" y=\"0\" width=\"{w:.1}\" height=\"{BAR_HEIGHT}\"/><rect x=\"0\" y=\"0\" width=\"{w:.1}\" height=\"10\" fill=\"{c}\"/><text x=\"5\" y=\"26\" class=\"name\">{n}</text><text x=\"5\" y=\"41\">{size}</text><text x=\"5\" y=\"56\" class=\"{tone}\">{words}</text></svg>",
                tone = tone(pstate),
                n = esc(name),
                s = esc(pstate),
                words = esc(&plex_word(p)),
                size = human(number(p, "length")),
                c = colour_of(colours, name),
            );
        }
    }
    out.push_str("</svg></div>");
}

/// A resync or scrub under way: its progress, rate and time left.
fn job_row(
    out: &mut String,
    volume: &str,
    job: &str,
    disk: &str,
    pct: f64,
    rate: u64,
    eta: Option<u64>,
) {
    let _ = write!(
        out,
        "<tr class=\"job\" data-volume=\"{v}\" data-job=\"{j}\"><td>{v}</td><td>{j}</td><td>{d}</td><td><progress max=\"100\" value=\"{pct:.1}\">{pct:.1}%</progress> <span class=\"percent\">{pct:.1}%</span></td><td>{rate}</td><td>{eta}</td></tr>",
        v = esc(volume),
        j = esc(job),
        d = esc(disk),
        rate = if rate > 0 {
            format!("{}/s", human(rate))
        } else {
            "measuring".into()
        },
        eta = eta.map_or_else(|| "-".into(), show_seconds),
    );
}

/// The page's live part: alerts, disks, volumes, jobs and events.
pub fn view(status: &Value, events: &[Value], offer: Offer) -> String {
    let mut out = String::new();
    let group = status.get("group").unwrap_or(&Value::Null);
    let _ = write!(
        out,
        "<p class=\"group\">Group <b>{}</b> <span class=\"uuid\">{}</span> · config {}{}</p>",
        esc(text(group, "name")),
        esc(text(group, "uuid")),
        number(group, "seqno"),
        group
            .get("held_by")
            .and_then(Value::as_str)
            .map(|h| format!(" · held by {}", esc(h)))
            .unwrap_or_default(),
    );

    let alerts = alerts(status);
    out.push_str("<section id=\"alerts\">");
    if alerts.is_empty() {
        out.push_str("<p class=\"alert ok\">All volumes healthy.</p>");
    }
    for (tone, text) in &alerts {
        let _ = write!(out, "<p class=\"alert {tone}\">{}</p>", esc(text));
    }
    out.push_str("</section>");

    let colours = colours(status);
    out.push_str("<section id=\"disks\"><h2>Disks</h2>");
    for (i, d) in list(status, "disks").iter().enumerate() {
        disk_row(&mut out, i, d, status, &colours, offer);
    }
    out.push_str("</section>");

    out.push_str("<section id=\"volumes\"><h2>Volumes</h2>");
    let volumes = list(status, "volumes");
    if volumes.is_empty() {
        out.push_str("<p>No volumes.</p>");
    } else {
        let acting = matches!(offer, Offer::Actions(_));
        let _ = write!(
            out,
            "<table><thead><tr><th>Volume</th><th>Layout</th><th>Size</th><th>State</th><th>Duplexed</th><th>Clients</th><th>Copies</th>{}</tr></thead><tbody>",
            if acting { "<th>Actions</th>" } else { "" }
        );
        for v in volumes {
            volume_row(&mut out, v, status, &colours, offer);
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</section>");

    out.push_str("<section id=\"jobs\"><h2>Resyncs and scrubs</h2>");
    let mut jobs = String::new();
    for v in volumes {
        let name = text(v, "name");
        for p in list(v, "plexes")
            .iter()
            .filter(|p| text(p, "state") == "resyncing")
        {
            job_row(
                &mut jobs,
                name,
                "resync",
                text(p, "disk"),
                p.get("resync_percent")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0),
                number(p, "resync_rate"),
                p.get("resync_eta_seconds").and_then(Value::as_u64),
            );
        }
        if let Some(s) = v.get("scrub").filter(|s| s.is_object()) {
            let kind = match (
                s.get("repair") == Some(&Value::Bool(true)),
                s.get("background") == Some(&Value::Bool(true)),
            ) {
                (true, _) => "scrub (repair)",
                (false, true) => "scrub (background check)",
                (false, false) => "scrub (check)",
            };
            job_row(
                &mut jobs,
                name,
                kind,
                "every copy",
                s.get("percent").and_then(Value::as_f64).unwrap_or(0.0),
                number(s, "rate"),
                s.get("eta_seconds").and_then(Value::as_u64),
            );
        }
    }
    if jobs.is_empty() {
        out.push_str("<p>No resync or scrub is running.</p>");
    } else {
        let _ = write!(
            out,
            "<table><thead><tr><th>Volume</th><th>Job</th><th>Disk</th><th>Progress</th><th>Rate</th><th>Time left</th></tr></thead><tbody>{jobs}</tbody></table>"
        );
    }
    out.push_str("</section>");

    out.push_str("<section id=\"events\"><h2>Events</h2>");
    if events.is_empty() {
        out.push_str("<p>No events since serve started.</p>");
    } else {
        out.push_str("<ol>");
        for e in events.iter().rev() {
            event_item(&mut out, e);
        }
        out.push_str("</ol>");
    }
    out.push_str("</section>");
    out
}

/// One volume's row: its state, and each copy with what can be done to it.
fn volume_row(out: &mut String, v: &Value, status: &Value, colours: &[(&str, &str)], offer: Offer) {
    let name = text(v, "name");
    let mirror = text(v, "layout") == "mirror";
    let state = text(v, "state");
    let _ = write!(
        out,
        "<tr class=\"volume\" data-volume=\"{n}\" data-state=\"{s}\"><td>{sw} <b>{n}</b></td><td>{layout}</td><td>{size}</td><td class=\"state {tone}\">{words}</td><td>{dup}</td><td>{clients}</td><td><ul class=\"copies\">",
        n = esc(name),
        s = esc(state),
        sw = swatch(colour_of(colours, name)),
        layout = if mirror { "Mirror" } else { "Simple" },
        size = human(number(v, "size")),
        tone = tone(state),
        words = esc(&volume_word(v)),
        dup = match (mirror, v.get("duplexed")) {
            (false, _) => "-",
            (true, Some(Value::Bool(true))) => "yes",
            _ => "no",
        },
        clients = v
            .get("clients")
            .and_then(Value::as_u64)
            .map_or_else(|| "-".into(), |n| n.to_string()),
    );
    let plexes = list(v, "plexes");
    for p in plexes {
        let disk = text(p, "disk");
        let pstate = text(p, "state");
        let _ = write!(
            out,
            "<li data-disk=\"{d}\"><span class=\"path\">{d}</span> <span class=\"state {tone}\">{w}</span>",
            d = esc(disk),
            tone = tone(pstate),
            w = esc(&plex_word(p)),
        );
        if plexes.len() > 1 {
            out.push_str(&action(
                offer,
                "break",
                &[("volume", name), ("disk", disk)],
                "Break off",
            ));
            out.push_str(&action(
                offer,
                "remove-mirror",
                &[("volume", name), ("disk", disk)],
                "Remove mirror",
            ));
        }
        out.push_str("</li>");
    }
    out.push_str("</ul></td>");
    if let Offer::Actions(token) = offer {
        out.push_str("<td class=\"buttons\">");
        // Add a mirror: onto a disk named here, or one the group picks.
        let holding: Vec<&str> = plexes.iter().map(|p| text(p, "disk")).collect();
        let room: Vec<&str> = list(status, "disks")
            .iter()
            .filter(|d| matches!(text(d, "state"), "online" | "online-errors"))
            .filter(|d| number(d, "largest_free") >= number(v, "size"))
            .map(|d| text(d, "path"))
            .filter(|p| !holding.contains(p))
            .collect();
        if !room.is_empty() {
            let _ = write!(
                out,
                "<form class=\"act\" method=\"post\" action=\"/action\" data-op=\"add-mirror\" data-volume=\"{n}\"><input type=\"hidden\" name=\"token\" value=\"{t}\"><input type=\"hidden\" name=\"op\" value=\"add-mirror\"><input type=\"hidden\" name=\"volume\" value=\"{n}\"><select name=\"disk\" aria-label=\"The disk for the new copy\"><option value=\"\">any disk with room</option>",
                n = esc(name),
                t = esc(token),
            );
            for d in room {
                let _ = write!(out, "<option value=\"{d}\">{d}</option>", d = esc(d));
            }
            out.push_str("</select><button type=\"submit\">Add mirror</button></form>");
        }
        if matches!(
            state,
            "failed-redundancy" | "failed-redundancy-at-risk" | "failed"
        ) {
            out.push_str(&action(offer, "repair", &[("volume", name)], "Repair"));
        }
        if mirror {
            out.push_str(&action(offer, "scrub", &[("volume", name)], "Scrub"));
        }
        out.push_str("</td>");
    }
    out.push_str("</tr>");
}

/// Seconds since the epoch as `HH:MM:SS` UTC.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}

/// One event: its time, kind and fields.
fn event_item(out: &mut String, e: &Value) {
    let kind = text(e, "event");
    let tone = match kind {
        "disk-failed" | "split-brain" => "bad",
        "volume-degraded" | "scrub-mismatch" => "warn",
        _ => "ok",
    };
    let fields: Vec<String> = e
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| !matches!(k.as_str(), "event" | "time" | "group"))
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                    .collect::<Vec<_>>()
                    .join(", "),
                other => other.to_string(),
            };
            format!("{k} {v}")
        })
        .collect();
    let _ = write!(
        out,
        "<li class=\"event {tone}\" data-event=\"{k}\"><time>{t} UTC</time> <b>{k}</b> {f}</li>",
        k = esc(kind),
        t = clock(e.get("time").and_then(Value::as_f64).unwrap_or(0.0)),
        f = esc(&fields.join(" · ")),
    );
}

/// The whole page: the view between a header and the script that keeps it
/// live.
pub fn page(title: &str, banner: Option<(&str, &str)>, body: &str, offer: Offer) -> String {
    let hint = match offer {
        Offer::Off => "Read-only: actions are off (start serve with --http-actions to allow them).",
        Offer::Locked => {
            "Read-only: to act on the group, paste the token from the file serve named at its start (its --http-token-file)."
        }
        Offer::Actions(_) => "Actions are on: each asks for confirmation first.",
    };
    let token = match offer {
        Offer::Actions(t) => format!(" data-token=\"{}\"", esc(t)),
        _ => String::new(),
    };
    let banner = banner
        .map(|(tone, text)| {
            format!(
                "<p class=\"banner {}\" id=\"banner\">{}</p>",
                esc(tone),
                esc(text)
            )
        })
        .unwrap_or_default();
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title><link rel=\"stylesheet\" href=\"/static/style.css\"><script src=\"/static/live.js\" defer></script></head><body><header><h1>mirrorvol</h1><span id=\"live\">Static view: reload to update.</span><p class=\"hint\">{hint}{unlock}</p></header>{banner}<main id=\"view\"{token}>{body}</main></body></html>\n",
        title = esc(title),
        hint = esc(hint),
        unlock = match offer {
            Offer::Locked => {
                " <form class=\"unlock\" method=\"post\" action=\"/unlock\"><input type=\"password\" name=\"token\" autocomplete=\"off\" aria-label=\"Token\" placeholder=\"token\"><button type=\"submit\">Unlock actions</button></form>"
            }
            _ => "",
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status() -> Value {
        json!({
            "group": {"name": "g", "uuid": "u", "seqno": 9},
            "disks": [
                {"path": "/d/a.img", "state": "online", "controller": "c0", "style": "gpt",
                 "size": 200u64 << 20, "data_size": 100u64 << 20, "free": 50u64 << 20, "largest_free": 50u64 << 20, "errors": 0, "spare": false},
                {"path": "/d/<b>.img", "state": "failed", "controller": "c0", "style": "raw",
                 "size": 200u64 << 20, "data_size": 100u64 << 20, "free": 50u64 << 20, "largest_free": 50u64 << 20, "errors": 3, "spare": false},
            ],
            "volumes": [{
                "name": "data", "size": 50u64 << 20, "layout": "mirror", "state": "resynching",
                "duplexed": false, "clients": 2,
                "plexes": [
                    {"disk": "/d/a.img", "offset": 0, "length": 50u64 << 20, "state": "in-sync", "resync_percent": 100.0},
                    {"disk": "/d/<b>.img", "offset": 50u64 << 20, "length": 50u64 << 20, "state": "resyncing",
                     "resync_percent": 41.6, "resync_rate": 1u64 << 20, "resync_eta_seconds": 30},
                ],
                "scrub": null
            }]
        })
    }

    #[test]
    fn text_is_escaped_in_content_and_attributes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let html = view(&status(), &[], Offer::Actions("t0k\"en"));
        assert!(!html.contains("<b>.img"), "a path is never markup");
        assert!(html.contains("/d/&lt;b&gt;.img"));
        assert!(html.contains("value=\"t0k&quot;en\""));
    }

    #[test]
    fn plexes_are_drawn_at_their_offsets_in_their_volume_colour() {
        let html = view(&status(), &[], Offer::Off);
        // The second plex starts half way along its disk's data area.
        assert!(
            html.contains(
                "data-volume=\"data\" data-state=\"resyncing\" x=\"400.0\" y=\"0\" width=\"400.0\""
            ),
            "{html}"
        );
        assert!(html.contains(
            "data-volume=\"data\" data-state=\"in-sync\" x=\"0.0\" y=\"0\" width=\"400.0\""
        ));
        assert_eq!(
            html.matches(&format!("fill=\"{}\"", COLOURS[0])).count(),
            3,
            "two plexes and the swatch"
        );
        assert!(html.contains("Resynching (42%)"));
        assert!(html.contains("<progress max=\"100\" value=\"41.6\">"));
        assert!(html.contains("1 MiB/s"));
        assert!(html.contains("30 s"));
    }

    #[test]
    fn alerts_name_what_is_wrong() {
        let found: Vec<String> = alerts(&status()).into_iter().map(|(_, t)| t).collect();
        assert!(
            found
                .iter()
                .any(|a| a.contains("Mirror data is not duplexed")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|a| a.contains("Disk /d/<b>.img is Failed")),
            "{found:?}"
        );
        let mut healthy = status();
        healthy["volumes"][0]["state"] = json!("healthy");
        healthy["volumes"][0]["duplexed"] = json!(true);
        healthy["disks"][1]["state"] = json!("online");
        assert!(alerts(&healthy).is_empty());
        assert!(view(&healthy, &[], Offer::Off).contains("All volumes healthy."));
        let mut degraded = healthy.clone();
        degraded["volumes"][0]["state"] = json!("failed-redundancy");
        let a = alerts(&degraded);
        assert_eq!(a.len(), 1);
        assert!(a[0].1.contains("Volume data is Failed Redundancy"), "{a:?}");
    }

    #[test]
    fn actions_are_offered_only_with_the_token() {
        let off = view(&status(), &[], Offer::Off);
        let locked = view(&status(), &[], Offer::Locked);
        assert!(!off.contains("<form") && !locked.contains("<form"));
        let mut status = status();
        status["volumes"][0]["state"] = json!("failed-redundancy");
        let on = view(&status, &[], Offer::Actions("tok"));
        for op in [
            "break",
            "remove-mirror",
            "repair",
            "scrub",
            "fail",
            "reactivate",
        ] {
            assert!(on.contains(&format!("data-op=\"{op}\"")), "{op} offered");
        }
        assert_eq!(
            on.matches("name=\"token\" value=\"tok\"").count(),
            on.matches("<form").count()
        );
    }

    #[test]
    fn events_are_listed_newest_first() {
        let events = [
            json!({"event": "disk-failed", "time": 3661.5, "disk": "/d/b.img"}),
            json!({"event": "volume-degraded", "time": 3662.0, "volume": "data", "plexes": ["/d/a", "/d/b"]}),
        ];
        let html = view(&status(), &events, Offer::Off);
        let degraded = html.find("data-event=\"volume-degraded\"").unwrap();
        let failed = html.find("data-event=\"disk-failed\"").unwrap();
        assert!(degraded < failed);
        assert!(html.contains("01:01:01 UTC"));
        assert!(html.contains("plexes /d/a, /d/b"));
    }
}
