//! `examine PATH`: the label and config on one disk, read without assembling
//! the group, with the state of every metadata copy. It changes nothing.

use std::path::Path;

use serde_json::json;

use crate::disk::{Disk, FileDisk, OpenOptions};
use crate::format::GroupConfig;
use crate::format::ondisk;
use crate::format::state::Read;
use crate::{Error, Result};

pub fn examine(path: &Path, json: bool) -> Result<()> {
    let opts = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let disk = FileDisk::open(path, opts).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::refused(format!("disk {} does not exist", path.display()))
        }
        _ => Error::io_path("open", path, e),
    })?;
    let read = match ondisk::read_label(&disk) {
        Ok(Some(r)) => r,
        Ok(None) => {
            return Err(Error::refused(format!(
                "{} is not a mirrorvol disk (no label found)",
                path.display()
            )));
        }
        Err(e) => {
            return Err(Error::corrupt(format!(
                "{} cannot be examined: {e}",
                path.display()
            )));
        }
    };
    let slots = ondisk::read_config(&disk, &read.label)
        .map_err(|e| Error::corrupt(format!("{}: {e}", path.display())))?;
    let (seqno, config) = match &slots.newest {
        Some((_, slot)) => (Some(slot.seqno), GroupConfig::from_text(&slot.text).ok()),
        None => (None, None),
    };
    let l = &read.label;
    let layout = &l.layout;
    let generation = match ondisk::read_generation(&disk, layout) {
        Ok(Read::Good(g)) => json!({
            "counter": g.counter,
            "id": g.id,
            "previous": g.previous,
            "written_at": g.written_at,
        }),
        Ok(Read::Damaged(why)) => json!({ "damaged": why }),
        Ok(Read::Empty) => serde_json::Value::Null,
        Err(e) => json!({ "damaged": e.to_string() }),
    };
    let claim = match ondisk::read_claim(&disk, layout) {
        Ok(Read::Good(c)) => json!({
            "state": if c.held { "held" } else { "released" },
            "host": c.host,
            "hostname": c.hostname,
            "boot": c.boot,
            "pid": c.pid,
            "command": c.command,
            "seq": c.seq,
            "interval_ms": c.interval_ms,
            "fence_ms": c.fence_ms,
            "claimed_at": c.claimed_at,
            "written_at": c.written_at,
        }),
        Ok(Read::Damaged(why)) => json!({ "state": "damaged", "damaged": why }),
        Ok(Read::Empty) => json!({ "state": "absent" }),
        Err(e) => json!({ "state": "damaged", "damaged": e.to_string() }),
    };
    let written = match crate::format::written::read(&disk, layout) {
        Ok(Read::Good(w)) => json!({
            "region_size": w.header.region_size,
            "bytes": w.written_bytes(layout.data_size),
        }),
        Ok(Read::Damaged(why)) => json!({ "damaged": why }),
        Ok(Read::Empty) => serde_json::Value::Null,
        Err(e) => json!({ "damaged": e.to_string() }),
    };
    let ok = |b: bool| if b { "ok" } else { "damaged" };
    let slot = |i: usize| match (slots.valid[i], slots.empty[i]) {
        (true, _) => "ok",
        (false, true) => "empty",
        (false, false) => "damaged",
    };
    let report = json!({
        "path": path.display().to_string(),
        "size": disk.size(),
        "label": {
            "version": l.version,
            "disk_uuid": l.disk_uuid,
            "group_uuid": l.group_uuid,
            "style": l.style.to_string(),
            "created": l.created,
            "member_offset": layout.member_offset,
            "member_size": layout.member_size,
            "data_offset": layout.data_offset(),
            "data_size": layout.data_size,
            "checksum_offset": layout.checksum_offset(),
            "checksum_size": layout.checksum_size,
        },
        "copies": {
            "primary_label": ok(read.primary_ok),
            "backup_label": ok(read.backup_ok),
            "config_slot_a": slot(0),
            "config_slot_b": slot(1),
        },
        "generation": generation,
        "claim": claim,
        "written": written,
        "seqno": seqno,
        "config": config,
    });
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
        return Ok(());
    }
    outln!("Disk {} ({} bytes)", path.display(), disk.size());
    outln!("  label version {}, style {}", l.version, l.style);
    outln!("  disk uuid   {}", l.disk_uuid);
    outln!("  group uuid  {}", l.group_uuid);
    outln!(
        "  member area {} + {}; data area {} + {}",
        layout.member_offset,
        layout.member_size,
        layout.data_offset(),
        layout.data_size
    );
    outln!(
        "  copies: primary label {}, backup label {}, config slot A {}, config slot B {}",
        ok(read.primary_ok),
        ok(read.backup_ok),
        slot(0),
        slot(1)
    );
    match &report["generation"] {
        serde_json::Value::Null => {
            outln!("  data generation: none (format 1 or 2, or never written)")
        }
        g if g.get("damaged").is_some() => {
            outln!("  data generation: damaged ({})", g["damaged"])
        }
        g => outln!(
            "  data generation {} (id {})",
            g["counter"],
            g["id"].as_str().unwrap_or("?")
        ),
    }
    match &report["written"] {
        serde_json::Value::Null => {
            outln!("  written map: none (format 3 or older: every region counts as written)")
        }
        w if w.get("damaged").is_some() => outln!("  written map: damaged ({})", w["damaged"]),
        w => outln!(
            "  written map: {} written, in regions of {}",
            crate::group::ops::human_exact(w["bytes"].as_u64().unwrap_or(0)),
            crate::group::ops::human(w["region_size"].as_u64().unwrap_or(0))
        ),
    }
    let c = &report["claim"];
    match c["state"].as_str() {
        Some("held") | Some("released") => outln!(
            "  claim: {} by mirrorvol {} (pid {}) on host {} ({}), renewal {}",
            c["state"].as_str().unwrap_or("?"),
            c["command"].as_str().unwrap_or("?"),
            c["pid"],
            c["hostname"].as_str().unwrap_or("?"),
            c["host"].as_str().unwrap_or("?"),
            c["seq"]
        ),
        Some("damaged") => outln!("  claim: damaged ({})", c["damaged"]),
        _ => outln!("  claim: none (format 1 or 2, or never claimed)"),
    }
    match (seqno, config) {
        (Some(seqno), Some(config)) => {
            outln!("  config {seqno}:");
            for line in config.to_text().lines() {
                outln!("    {line}");
            }
        }
        _ => outln!("  no readable config"),
    }
    Ok(())
}
