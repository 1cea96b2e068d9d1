//! What a `status` report says needs attention, for people (`status -x`,
//! as `zpool status -x`) and for scripts (`status --test` and `-x` exit 3
//! when the group is degraded and 4 when a volume serves no data, as
//! `mdadm --detail --test` tells a script; 1 and 2 keep their meaning:
//! the command failed, or was refused).

use serde_json::{Value, json};

use crate::{Error, Result};

/// One thing that needs attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// A volume serves no data (failed, split, waiting on its disks); else
    /// the group is degraded.
    pub failed: bool,
    /// "volume data is failed-redundancy (b.img: failed)".
    pub what: String,
    /// The command that deals with it, when one does.
    pub hint: Option<String>,
}

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or("?").to_string()
}

/// The plexes of a volume that are not in sync: "b.img: failed".
fn plexes_behind(volume: &Value) -> Vec<String> {
    volume["plexes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["state"] != "in-sync")
        .map(
            |p| match (p["state"].as_str(), p["resync_percent"].as_f64()) {
                (Some("resyncing"), Some(pct)) => {
                    format!("{}: resyncing {pct:.0}%", text(p, "disk"))
                }
                _ => format!("{}: {}", text(p, "disk"), text(p, "state")),
            },
        )
        .collect()
}

/// Everything in a `status --json` report that is not healthy: volumes not
/// healthy, disks not online (errors seen count too), a split group, paths
/// that cannot be read.
pub fn problems(status: &Value) -> Vec<Problem> {
    let mut found = Vec::new();
    let mut add = |failed: bool, what: String, hint: Option<String>| {
        found.push(Problem { failed, what, hint })
    };
    for v in status["volumes"].as_array().into_iter().flatten() {
        let (name, state) = (text(v, "name"), text(v, "state"));
        let behind = plexes_behind(v);
        let what = match behind.is_empty() {
            true => format!("volume {name} is {state}"),
            false => format!("volume {name} is {state} ({})", behind.join(", ")),
        };
        if v["split_brain"] == true {
            add(
                true,
                format!("volume {name} is split between two sides of the group"),
                Some("mirrorvol resolve-split-brain --keep PATH".into()),
            );
            continue;
        }
        match state.as_str() {
            "healthy" => {}
            "resynching" => add(false, what, None),
            "failed-redundancy" | "failed-redundancy-at-risk" => {
                add(false, what, Some(format!("mirrorvol repair {name}")))
            }
            "not-answering" => add(true, what, None),
            _ => add(
                true,
                what,
                Some("bring its disks back: mirrorvol reactivate PATH".into()),
            ),
        }
    }
    for d in status["disks"].as_array().into_iter().flatten() {
        let (path, state) = (text(d, "path"), text(d, "state"));
        let hint = match state.as_str() {
            "online" => continue,
            "online-errors" => {
                format!("mirrorvol scrub NAME; replace it: mirrorvol replace {path} NEW")
            }
            "offline" => format!("mirrorvol reactivate {path}"),
            "missing" => format!("connect it again, or mirrorvol remove-disk {path}"),
            _ => format!(
                "mirrorvol reactivate {path}, or mirrorvol replace {path} NEW, or mirrorvol remove-disk {path}"
            ),
        };
        let what = match d["errors"].as_u64() {
            Some(n) if n > 0 => format!("disk {path} is {state} ({n} errors)"),
            _ => format!("disk {path} is {state}"),
        };
        add(false, what, Some(hint));
    }
    if status["split_brain"]
        .as_array()
        .is_some_and(|s| !s.is_empty())
    {
        add(
            true,
            "the group is split: its disks moved on apart".into(),
            Some("mirrorvol resolve-split-brain --keep PATH".into()),
        );
    }
    for u in status["unreadable"].as_array().into_iter().flatten() {
        add(
            false,
            format!("{} cannot be read: {}", text(u, "path"), text(u, "reason")),
            None,
        );
    }
    found
}

/// The exit of `status --test` and `-x`: nothing, or an error with status
/// 3 (degraded) or 4 (failed) naming the problems.
pub fn verdict(found: &[Problem]) -> Result<()> {
    if found.is_empty() {
        return Ok(());
    }
    Err(Error::Unhealthy {
        failed: found.iter().any(|p| p.failed),
        problems: found.iter().map(|p| p.what.clone()).collect(),
    })
}

/// `status -x`: what is unhealthy, a line each with what deals with it, or
/// "all volumes healthy"; with `--json`, {"state", "problems"}.
pub fn only_problems(found: &[Problem], json: bool) -> String {
    let state = match (found.is_empty(), found.iter().any(|p| p.failed)) {
        (true, _) => "healthy",
        (false, false) => "degraded",
        (false, true) => "failed",
    };
    if json {
        let list: Vec<Value> = found
            .iter()
            .map(|p| json!({"what": p.what, "failed": p.failed, "hint": p.hint}))
            .collect();
        let doc = json!({"state": state, "problems": list});
        return format!(
            "{}\n",
            serde_json::to_string_pretty(&doc).expect("JSON serializes")
        );
    }
    if found.is_empty() {
        return "all volumes healthy\n".into();
    }
    let mut out = String::new();
    for p in found {
        out.push_str(&p.what);
        if let Some(h) = &p.hint {
            out.push_str(&format!("\n    {h}"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_healthy_group_has_no_problems() {
        let s = json!({"volumes": [{"name": "v", "state": "healthy", "plexes": []}],
                       "disks": [{"path": "a.img", "state": "online", "errors": 0}]});
        assert!(problems(&s).is_empty());
        assert!(verdict(&problems(&s)).is_ok());
        assert_eq!(only_problems(&problems(&s), false), "all volumes healthy\n");
    }

    #[test]
    fn degraded_and_failed_exit_3_and_4() {
        let s = json!({"volumes": [{"name": "v", "state": "failed-redundancy",
                         "plexes": [{"disk": "a.img", "state": "in-sync"},
                                    {"disk": "b.img", "state": "failed"}]}],
                       "disks": [{"path": "a.img", "state": "online"},
                                 {"path": "b.img", "state": "failed", "errors": 3}]});
        let found = problems(&s);
        assert_eq!(found.len(), 2);
        assert_eq!(
            found[0].what,
            "volume v is failed-redundancy (b.img: failed)"
        );
        assert_eq!(found[0].hint.as_deref(), Some("mirrorvol repair v"));
        assert_eq!(found[1].what, "disk b.img is failed (3 errors)");
        assert_eq!(verdict(&found).unwrap_err().exit_code(), 3);
        let text = only_problems(&found, false);
        assert!(text.contains("    mirrorvol repair v\n"), "{text}");

        let mut s = s;
        s["volumes"][0]["state"] = json!("failed");
        let found = problems(&s);
        assert!(found[0].failed);
        let e = verdict(&found).unwrap_err();
        assert_eq!(e.exit_code(), 4);
        assert!(
            e.to_string().starts_with("failed: volume v is failed"),
            "{e}"
        );
        let doc: Value = serde_json::from_str(&only_problems(&found, true)).unwrap();
        assert_eq!(doc["state"], "failed");
        assert_eq!(
            doc["problems"][1]["what"],
            "disk b.img is failed (3 errors)"
        );
    }

    #[test]
    fn a_split_volume_serves_nothing() {
        let s = json!({"volumes": [{"name": "v", "state": "failed", "split_brain": true,
                                     "plexes": []}],
                       "disks": [], "split_brain": [{"side": 1}]});
        let found = problems(&s);
        assert!(found.iter().all(|p| p.failed), "{found:?}");
        assert!(
            found[0]
                .hint
                .as_deref()
                .unwrap()
                .contains("resolve-split-brain")
        );
    }
}
