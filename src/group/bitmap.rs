//! The group's write-intent bitmaps: loading them, resyncing the regions they
//! name after an unclean stop, deciding whether a returning plex can be
//! resynced from them or needs a full copy, and clearing them once the
//! volumes are in sync.
//!
//! A disk's bitmap covers its data area; a volume range maps to a region of
//! each disk it has a plex on. A set bit says "the plexes of the volume there
//! may differ". While a volume has a plex out of sync its bits are pinned,
//! so the survivors' bitmaps name every region the absent plex missed.

use std::ops::Range;
use std::sync::Arc;

use uuid::Uuid;

use super::Group;
use crate::disk::AlignedBuf;
use crate::disk::buf::IO_ALIGN;
use crate::format::{FORMAT_VERSION, PlexEntry};
use crate::volume::COPY_CHUNK;
use crate::volume::bitmap::{BitmapSet, DiskBitmap, Found};
use crate::{Error, Result};

/// Merges overlapping or touching ranges.
pub(super) fn merge(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Volume bytes that the data-area `ranges` of a plex's disk cover.
pub(super) fn to_volume(plex: &PlexEntry, size: u64, ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    ranges
        .iter()
        .filter_map(|r| {
            let start = r.start.max(plex.offset) - plex.offset;
            let end = r.end.min(plex.offset + size).saturating_sub(plex.offset);
            (start < end).then_some(start..end)
        })
        .collect()
}

impl Group {
    /// Bytes of volume `v` that some in-sync plex records as written in its
    /// disk's written map; `None` when one of them cannot tell (its disk
    /// has no written map, or cannot be read). From the bitmaps when they
    /// are loaded; read from the disks only for a look at the group
    /// (`status` without `serve`), never while the group runs (a hung disk
    /// must not hold up its status).
    pub(super) fn written_bytes(&self, v: &crate::format::VolumeEntry) -> Option<u64> {
        if self.bitmaps.is_none() && !self.open.shared {
            return None;
        }
        let mut most = None;
        for p in &v.plexes {
            if self.plex_state(p.disk, p.state) != "in-sync" {
                continue;
            }
            let (start, end) = (p.offset, p.offset + v.size);
            let n = match self.bitmaps.as_ref().and_then(|set| set.get(p.disk)) {
                Some(b) => b.written_bytes(start, end)?,
                None => {
                    let m = self.members.get(&p.disk)?;
                    match crate::format::written::read(&*m.disk, &m.label.layout).ok()? {
                        crate::format::state::Read::Good(w) => w.bytes_within(start, end),
                        _ => return None,
                    }
                }
            };
            most = Some(most.map_or(n, |m: u64| m.max(n)));
        }
        most
    }

    /// Without write-intent bitmaps no write sets a written bit: a group
    /// run that way first wipes every disk's written map, so that all of
    /// each disk counts as written from then on (a map left behind would
    /// tell a later rebuild that regions written now hold zeroes).
    pub fn forget_written_maps(&self) {
        for m in self.members.values() {
            let layout = &m.label.layout;
            match crate::format::written::read(&*m.disk, layout) {
                Ok(crate::format::state::Read::Empty) => continue,
                Ok(_) => {}
                // What cannot be read is not trusted when read later
                // either: it is wiped all the same.
                Err(_) => {}
            }
            let zero = vec![0u8; crate::format::bitmap::BITMAP_BLOCK as usize];
            let disk: &dyn crate::disk::Disk = &*m.disk;
            if let Err(e) = disk.write_all_then_flush(&[(layout.written_offset(), &zero[..])], true)
            {
                tracing::warn!(disk = %m.path.display(), error = %e, "cannot wipe the written map");
            }
        }
    }

    /// Loads the bitmap of member `uuid` into `set` (warning when it is
    /// damaged; an older disk's labels are raised to the current format just
    /// before its first bit is written, so an older binary refuses the disk).
    pub(super) fn load_bitmap(&mut self, set: &BitmapSet, uuid: Uuid) -> Result<()> {
        let m = &self.members[&uuid];
        let (b, found) = DiskBitmap::load(
            m.disk.clone(),
            &m.label.layout,
            self.config.region_size,
            self.config.seqno,
        )
        .map_err(|e| Error::io(format!("cannot read the bitmap of {}", m.path.display()), e))?;
        b.set_patient(m.disk.queue());
        if m.label.version < 5 || !crate::volume::sums::enabled() {
            // Its checksum area holds nothing yet (format 5).
            b.sums.distrust();
        }
        if let Found::Damaged(e) = &found {
            self.warnings.push(format!(
                "disk {}: its write-intent bitmap is damaged ({e}); its mirrors are resynced in full",
                m.path.display()
            ));
        }
        b.set_version_raise(m.raise.clone());
        self.bitmap_found.insert(uuid, found);
        set.insert(uuid, Arc::new(b));
        Ok(())
    }

    /// Loads the bitmap of every disk present, resyncs what an unclean stop
    /// left dirty, and from then on gives every volume opened a bitmap.
    /// Commands that write (and `serve`) call it once after assembly.
    pub fn start_bitmaps(&mut self) -> Result<()> {
        if self.bitmaps.is_some() {
            return Ok(());
        }
        // Plexes assembly found stale by their generation are recorded so
        // before the generation is raised on their disks.
        if self.generation_stale {
            self.commit()?;
            self.generation_stale = false;
        }
        let set = BitmapSet::default();
        let uuids: Vec<Uuid> = self.members.keys().copied().collect();
        let mut failed = false;
        for uuid in uuids {
            // A disk that fails here (or hangs past its deadline) is
            // failed as on any other I/O; the group goes on without it.
            if let Err(e) = self.load_bitmap(&set, uuid) {
                self.bitmap_failed(uuid, e);
                failed = true;
            }
        }
        if failed {
            self.commit()?;
        }
        let keeper = self.start_generations();
        set.set_keeper(keeper);
        self.bitmaps = Some(Arc::new(set));
        let (compared, copied) = self.resync_dirty_regions()?;
        if copied > 0 {
            let line = format!(
                "resynced {} of dirty regions after an unclean stop of group {}: {} differed between the plexes and were copied",
                super::ops::human_exact(compared),
                self.config.name,
                super::ops::human_exact(copied)
            );
            tracing::warn!("{line}");
            self.warnings.push(line);
        } else if compared > 0 {
            tracing::info!(
                bytes = compared,
                "the dirty regions of group {} are equal on every in-sync plex",
                self.config.name
            );
        }
        self.clean_bitmaps(true);
        Ok(())
    }

    /// A member without a bitmap in the set (its load failed when the
    /// group started) gets a fresh one before it is back in service: its
    /// old bits say nothing of the writes it missed the tracking of, so
    /// the new one tracks from now on (a disk that left before now comes
    /// back by a full resync where this one is its source).
    pub(super) fn ensure_bitmap(&mut self, uuid: Uuid) -> Result<()> {
        let Some(set) = self.bitmaps.clone() else {
            return Ok(());
        };
        let Some(m) = self.members.get(&uuid) else {
            return Ok(());
        };
        if set.get(uuid).is_some() {
            return Ok(());
        }
        let b = DiskBitmap::fresh(
            m.disk.clone(),
            &m.label.layout,
            self.config.region_size,
            self.config.seqno,
        )
        .map_err(|e| Error::io(format!("cannot read the bitmap of {}", m.path.display()), e))?;
        b.set_patient(m.disk.queue());
        b.set_version_raise(m.raise.clone());
        // Its written map (all of it written: what went untracked is not
        // known) goes out with its first bitmap write, which the first
        // write to it and a resync onto it wait for.
        self.bitmap_found.insert(uuid, Found::Valid);
        set.insert(uuid, Arc::new(b));
        Ok(())
    }

    /// A disk whose bitmap could not be loaded: failed (a remote disk
    /// whose connection was lost is tried again under `serve`, and its
    /// plexes come back by the bitmaps of the others; any other gets a
    /// full resync).
    fn bitmap_failed(&mut self, uuid: Uuid, e: Error) {
        let path = self.disk_path(uuid);
        let lost = super::is_nbd(std::path::Path::new(&path))
            && matches!(&e, Error::Io { source, .. } if crate::volume::error::link_lost(source));
        let line = format!(
            "disk {path} failed as its write-intent bitmap was read ({e}); the group goes on without it"
        );
        tracing::error!("{line}");
        self.warnings.push(line);
        self.mark_disk_failed(
            uuid,
            (!lost).then_some("its write-intent bitmap could not be read"),
        );
        if lost && let Some(d) = self.config.disk_mut(uuid) {
            d.link_lost = true;
        }
    }

    /// The format version of `disk`'s labels as they stand on it: raised to
    /// the current one once anything of it was written.
    pub fn label_version(&self, disk: Uuid) -> Option<u32> {
        let m = self.members.get(&disk)?;
        Some(if m.raise.is_pending() {
            m.label.version
        } else {
            FORMAT_VERSION.max(m.label.version)
        })
    }

    fn bitmap(&self, disk: Uuid) -> Option<Arc<DiskBitmap>> {
        self.bitmaps.as_ref()?.get(disk)
    }

    /// The volume bytes the bitmaps of the plexes on `disks` name as dirty;
    /// the whole volume for a disk whose bitmap was damaged.
    pub(super) fn dirty_volume_ranges(&self, name: &str, disks: &[Uuid]) -> Vec<Range<u64>> {
        let Some(v) = self.config.volume(name) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for p in v.plexes.iter().filter(|p| disks.contains(&p.disk)) {
            if matches!(self.bitmap_found.get(&p.disk), Some(Found::Damaged(_))) {
                return std::iter::once(0..v.size).collect();
            }
            if let Some(b) = self.bitmap(p.disk) {
                out.extend(to_volume(p, v.size, &b.dirty_ranges()));
            }
        }
        merge(out)
    }

    /// After an unclean stop: in every mirror with two or more in-sync
    /// plexes at hand, makes the dirty regions of the others equal to the
    /// first in-sync plex that is not write-mostly (a write-behind plex
    /// may lack writes there that were answered; it is the source only
    /// when every plex is write-mostly). Returns the volume bytes compared
    /// and copied.
    fn resync_dirty_regions(&mut self) -> Result<(u64, u64)> {
        let (mut compared, mut copied) = (0, 0);
        for v in self.config.volumes.clone() {
            let mut in_sync: Vec<Uuid> = v
                .plexes
                .iter()
                .filter(|p| self.plex_state(p.disk, p.state) == "in-sync")
                .map(|p| p.disk)
                .collect();
            // Stable: config order among equals.
            in_sync.sort_by_key(|d| self.is_write_mostly(*d));
            if in_sync.len() < 2 {
                continue;
            }
            let ranges = self.dirty_volume_ranges(&v.name, &in_sync);
            if ranges.is_empty() {
                continue;
            }
            for target in &in_sync[1..] {
                copied += self.sync_ranges(&v.name, in_sync[0], *target, &ranges)?.1;
            }
            compared += ranges.iter().map(|r| r.end - r.start).sum::<u64>();
        }
        Ok((compared, copied))
    }

    /// Makes volume `ranges` of `name` on its plex on `to` equal to its plex
    /// on `from`, directly between the disks (nothing else runs): each chunk
    /// is read from both and written only where they differ, so plexes
    /// already equal (bits left set by a clean stop while a plex was out of
    /// sync) are not written at all. Returns the bytes compared and the
    /// bytes copied.
    pub(super) fn sync_ranges(
        &self,
        name: &str,
        from: Uuid,
        to: Uuid,
        ranges: &[Range<u64>],
    ) -> Result<(u64, u64)> {
        let v = self.volume(name)?;
        let at = |disk: Uuid| -> Result<(Arc<dyn crate::disk::Disk>, u64, String)> {
            let p =
                v.plexes.iter().find(|p| p.disk == disk).ok_or_else(|| {
                    Error::failed(format!("volume {name} has no plex on that disk"))
                })?;
            let m = self.members.get(&disk).ok_or_else(|| {
                Error::failed(format!("disk {} is not present", self.disk_path(disk)))
            })?;
            Ok((
                m.disk.clone(),
                m.label.layout.data_offset() + p.offset,
                m.path.display().to_string(),
            ))
        };
        let (src, src_at, src_path) = at(from)?;
        let (dst, dst_at, dst_path) = at(to)?;
        // What is copied becomes written on the target first (its written
        // map must hold all the data its plex holds).
        let dst_map = self.bitmaps.as_ref().and_then(|set| set.get(to));
        let dst_data = self
            .members
            .get(&to)
            .map_or(0, |m| m.label.layout.data_offset());
        let mark = |pos: u64, n: usize| -> std::io::Result<()> {
            match &dst_map {
                Some(b) => {
                    let at = dst_at - dst_data + pos;
                    // Rehashed just before: those entries are kept.
                    b.set_written(std::slice::from_ref(&(at..at + n as u64)), true)
                }
                None => Ok(()),
            }
        };
        // The checksums of both copies there are not trusted after an
        // unclean stop (written lazily, maybe torn): rehashed from what
        // both hold now ([`crate::format::checksum`]).
        let src_map = self.bitmaps.as_ref().and_then(|set| set.get(from));
        let rehash = |pos: u64, data: &[u8]| {
            for (map, at) in [(&src_map, src_at), (&dst_map, dst_at)] {
                if let Some(b) = map {
                    b.rehash(at - b.data_offset + pos, data);
                }
            }
        };
        let cannot = |verb: &str, path: &str, e| {
            Error::io(format!("resync of volume {name}: cannot {verb} {path}"), e)
        };
        // The chunks to compare; dirty regions are small and scattered, so
        // several go at once (each disk's queue has workers for them).
        let chunks: Vec<(u64, usize)> = ranges
            .iter()
            .flat_map(|r| {
                (r.start..r.end)
                    .step_by(COPY_CHUNK)
                    .map(move |pos| (pos, (r.end - pos).min(COPY_CHUNK as u64) as usize))
            })
            .collect();
        const AT_ONCE: usize = 4;
        let results: Vec<Result<(u64, u64)>> = std::thread::scope(|s| {
            let lanes: Vec<_> = (0..AT_ONCE)
                .map(|lane| {
                    let (chunks, src, dst, cannot, mark, rehash) =
                        (&chunks, &src, &dst, &cannot, &mark, &rehash);
                    let (src_path, dst_path) = (&src_path, &dst_path);
                    s.spawn(move || -> Result<(u64, u64)> {
                        let mut want = AlignedBuf::new(COPY_CHUNK, IO_ALIGN);
                        let mut have = AlignedBuf::new(COPY_CHUNK, IO_ALIGN);
                        let (mut compared, mut copied) = (0, 0);
                        for &(pos, n) in chunks.iter().skip(lane).step_by(AT_ONCE) {
                            src.read_at(&mut want[..n], src_at + pos)
                                .map_err(|e| cannot("read", src_path, e))?;
                            dst.read_at(&mut have[..n], dst_at + pos)
                                .map_err(|e| cannot("read", dst_path, e))?;
                            rehash(pos, &want[..n]);
                            if want[..n] != have[..n] {
                                mark(pos, n).map_err(|e| cannot("mark as written", dst_path, e))?;
                                dst.write_at(&want[..n], dst_at + pos)
                                    .map_err(|e| cannot("write", dst_path, e))?;
                                copied += n as u64;
                            }
                            compared += n as u64;
                        }
                        Ok((compared, copied))
                    })
                })
                .collect();
            lanes
                .into_iter()
                .map(|l| {
                    l.join()
                        .unwrap_or_else(|_| Err(Error::failed("a resync thread panicked")))
                })
                .collect()
        });
        let (mut compared, mut copied) = (0, 0);
        for r in results {
            let (c, n) = r?;
            compared += c;
            copied += n;
        }
        if copied > 0 {
            dst.flush().map_err(|e| cannot("flush", &dst_path, e))?;
        }
        Ok((compared, copied))
    }

    /// Why the plex of `name` on `disk` cannot be resynced from the
    /// bitmaps, or `None` when it can: the regions they name are then all
    /// it may lack ([`Group::returning_plex_ranges`]).
    pub(super) fn full_resync_reason(&self, name: &str, disk: Uuid) -> Option<String> {
        let v = self.config.volume(name)?;
        let plex = v.plexes.iter().find(|p| p.disk == disk)?;
        if let Some(r) = &plex.resync_reason {
            return Some(r.clone());
        }
        if let Some(r) = self.returned_older(disk) {
            return Some(r);
        }
        if plex.state == crate::format::PlexState::Resyncing {
            return Some("an earlier resync of it did not finish".to_string());
        }
        if self.bitmaps.is_none() {
            return Some("the group's bitmaps are not loaded".to_string());
        }
        let left = self.config.disk(disk).map(|d| d.state_seqno).unwrap_or(0);
        for p in v.plexes.iter().filter(|p| p.disk != disk) {
            if self.plex_state(p.disk, p.state) != "in-sync" {
                continue;
            }
            let path = self.disk_path(p.disk);
            match self.bitmap_found.get(&p.disk) {
                Some(Found::Valid) => {}
                Some(Found::Absent) => {
                    return Some(format!(
                        "disk {path} had no write-intent bitmap (format 1) while it was away"
                    ));
                }
                Some(Found::Damaged(e)) => {
                    return Some(format!(
                        "the write-intent bitmap of disk {path} is damaged ({e})"
                    ));
                }
                None => return Some(format!("disk {path} has no bitmap loaded")),
            }
            let since = self
                .bitmap(p.disk)
                .map(|b| b.header().since)
                .unwrap_or(u64::MAX);
            if since >= left {
                return Some(format!(
                    "the write-intent bitmap of disk {path} started at config {since}, after the plex left at config {left}"
                ));
            }
        }
        None
    }

    /// The volume bytes a returning plex on `disk` may lack: what the
    /// bitmaps of the in-sync plexes, and its own, name.
    pub(super) fn returning_plex_ranges(&self, name: &str, disk: Uuid) -> Vec<Range<u64>> {
        let Some(v) = self.config.volume(name) else {
            return Vec::new();
        };
        let mut disks: Vec<Uuid> = v
            .plexes
            .iter()
            .filter(|p| self.plex_state(p.disk, p.state) == "in-sync")
            .map(|p| p.disk)
            .collect();
        if matches!(self.bitmap_found.get(&disk), Some(Found::Valid)) {
            disks.push(disk);
        }
        self.dirty_volume_ranges(name, &disks)
    }

    /// Data-area extents of `disk` whose bits must stay: plexes of volumes
    /// that have a plex out of sync.
    pub fn pinned_extents(&self, disk: Uuid) -> Vec<Range<u64>> {
        self.config
            .volumes
            .iter()
            .filter(|v| {
                v.plexes
                    .iter()
                    .any(|p| self.plex_state(p.disk, p.state) != "in-sync")
            })
            .flat_map(|v| v.plexes.iter())
            .filter(|p| p.disk == disk)
            .map(|p| p.offset..p.offset + p.length)
            .collect()
    }

    /// Clears the bits of idle regions of volumes that are in sync
    /// everywhere (`now`: without waiting for a clearing period). Errors are
    /// logged: a bit left set costs a resync of its region, no more.
    pub fn clean_bitmaps(&self, now: bool) {
        let Some(set) = &self.bitmaps else {
            return;
        };
        for (uuid, b) in set.all() {
            if !self.is_online(uuid) {
                continue;
            }
            let pinned = self.pinned_extents(uuid);
            let overlaps =
                |r: Range<u64>| pinned.iter().any(|p| p.start < r.end && r.start < p.end);
            if let Err(e) = b.clear_idle(now, &overlaps) {
                tracing::warn!(disk = %self.disk_path(uuid), error = %e, "cannot clear write-intent bits");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn ranges_merge_and_map_onto_volumes() {
        assert_eq!(merge(vec![5..7, 0..2, 2..3, 6..9]), vec![0..3, 5..9]);
        let p = PlexEntry {
            disk: Uuid::nil(),
            offset: 1 << 20,
            length: 2 << 20,
            state: crate::format::PlexState::InSync,
            resync_reason: None,
            resync_offset: 0,
            resync_cancelled: false,
        };
        let size = (1 << 20) + 512;
        assert_eq!(
            to_volume(&p, size, &[0..(1 << 20) + 4096, (3 << 20)..(4 << 20)]),
            vec![0..4096]
        );
        assert_eq!(
            to_volume(&p, size, &[(2 << 20) - 4096..(3 << 20)]),
            vec![(1 << 20) - 4096..size]
        );
    }
}
