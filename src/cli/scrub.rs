//! The output of `scrub`: a summary line and one line per mismatching range
//! in text; DESIGN.md §6's keys, plus the ranges, in JSON.

use serde_json::{Value, json};

use crate::group::ops::human;
use crate::group::scrub::VolumeScrub;

/// "a.img", "a.img and b.img", "a.img, b.img and c.img".
pub(super) fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

pub fn scrub_text(r: &VolumeScrub) -> String {
    let mut out = format!(
        "scrubbed volume {}: compared {} on the plexes on {}",
        r.volume,
        human(r.checked_bytes),
        and_list(&r.compared)
    );
    if r.ranges.is_empty() {
        out.push_str("; they are identical\n");
        return out;
    }
    out.push_str(&format!(
        "; {} mismatching range{} ({})",
        r.ranges.len(),
        if r.ranges.len() == 1 { "" } else { "s" },
        human(r.mismatched_bytes())
    ));
    if r.repair {
        out.push_str(&format!(", {} repaired\n", r.repaired()));
    } else {
        out.push_str("; run with --repair to make them equal\n");
    }
    for m in &r.ranges {
        out.push_str(&format!(
            "mismatch at offset {}, {} bytes: plexes on {} differ",
            m.offset,
            m.length,
            and_list(&m.plexes())
        ));
        if m.repaired {
            out.push_str(&format!(
                "; repaired: the copy on {} was written to {}\n",
                m.kept,
                and_list(&m.outvoted)
            ));
        } else {
            out.push_str(&format!("; a repair would keep the copy on {}\n", m.kept));
        }
    }
    out
}

/// `{"volume", "checked_bytes", "mismatches", "repaired"}` (counts of
/// ranges), with the ranges themselves and byte totals besides.
pub fn scrub_json(r: &VolumeScrub) -> Value {
    json!({
        "volume": r.volume,
        "checked_bytes": r.checked_bytes,
        "mismatches": r.ranges.len(),
        "repaired": r.repaired(),
        "mismatched_bytes": r.mismatched_bytes(),
        "compared": r.compared,
        "ranges": r.ranges.iter().map(|m| json!({
            "offset": m.offset,
            "length": m.length,
            "plexes": m.plexes(),
            "kept": m.kept,
            "outvoted": m.outvoted,
            "repaired": m.repaired,
        })).collect::<Vec<_>>(),
    })
}
