//! Hot spares: disks of the group that hold no plex until a plex fails or
//! goes missing, and `repair` (or, under `serve`, the daemon) rebuilds it onto
//! one, as md rebuilds onto a spare. Automatic placement leaves spares alone;
//! a user's `--disk` may still name one. A spare that receives a plex stops
//! being a spare in the same commit ([`GroupConfig::retire_used_spares`]).
//!
//! [`GroupConfig::retire_used_spares`]: crate::format::GroupConfig::retire_used_spares

use uuid::Uuid;

use super::Group;
use super::alloc::{extent_len, first_fit};
use crate::Result;

impl Group {
    /// True when the config marks the disk a hot spare.
    pub fn is_spare(&self, disk: Uuid) -> bool {
        self.config.disk(disk).is_some_and(|d| d.spare)
    }

    /// The online disks, but those in `skip`, with a free extent of `len`
    /// bytes: (disk, the extent's offset, whether it is a spare).
    pub(super) fn disks_with_room(&self, len: u64, skip: &[Uuid]) -> Vec<(Uuid, u64, bool)> {
        self.config
            .disks
            .iter()
            .filter(|d| self.is_online(d.uuid) && !skip.contains(&d.uuid))
            .filter_map(|d| Some((d.uuid, first_fit(&self.config, d.uuid, len)?, d.spare)))
            .collect()
    }

    /// The end of a refusal to place a plex when only spares have room
    /// (empty when there are none).
    pub(super) fn spares_note(&self, spares: &[Uuid]) -> String {
        let paths: Vec<String> = spares.iter().map(|u| self.disk_path(*u)).collect();
        match paths.as_slice() {
            [] => String::new(),
            [one] => format!(
                "; disk {one} is a hot spare, kept for repairs: name it with --disk to use it anyway"
            ),
            many => format!(
                "; disks {} are hot spares, kept for repairs: name one with --disk to use it anyway",
                many.join(", ")
            ),
        }
    }

    /// Picks an online spare, not in `exclude`, with a free extent of `len`
    /// bytes: one behind a controller none of the `staying` disks sit behind
    /// (so the mirror stays or becomes duplexed), else any, in the order the
    /// spares joined the group. Returns the spare and the extent's offset.
    pub(super) fn pick_spare(
        &self,
        len: u64,
        exclude: &[Uuid],
        staying: &[Uuid],
    ) -> Option<(Uuid, u64)> {
        let used: Vec<&str> = staying
            .iter()
            .filter_map(|u| self.config.disk(*u))
            .map(|d| d.controller.as_str())
            .collect();
        let fits: Vec<(Uuid, u64, bool)> = self
            .disks_with_room(len, exclude)
            .into_iter()
            .filter(|(_, _, spare)| *spare)
            .map(|(u, offset, _)| (u, offset, used.contains(&self.controller(u))))
            .collect();
        fits.iter()
            .find(|(_, _, shared)| !shared)
            .or_else(|| fits.first())
            .map(|(u, o, _)| (*u, *o))
    }

    /// The spare a failed or missing plex of `volume` would be rebuilt on:
    /// an online spare with room for a plex of the volume, preferring one
    /// behind a controller that none of the volume's remaining plexes (those
    /// neither failed nor missing) use. None when the volume does not exist
    /// or no spare fits.
    pub fn spare_for(&self, volume: &str) -> Option<Uuid> {
        self.spare_extent_for(volume).map(|(u, _)| u)
    }

    /// [`Group::spare_for`], with the offset of the free extent there.
    fn spare_extent_for(&self, volume: &str) -> Option<(Uuid, u64)> {
        let v = self.config.volume(volume)?;
        let exclude: Vec<Uuid> = v.plexes.iter().map(|p| p.disk).collect();
        let staying: Vec<Uuid> = v
            .plexes
            .iter()
            .filter(|p| !self.plex_lost(p))
            .map(|p| p.disk)
            .collect();
        self.pick_spare(extent_len(v.size), &exclude, &staying)
    }

    /// The config half of a repair onto a hot spare, for the daemon: replaces
    /// one failed or missing plex of `volume` by a new plex on
    /// [`Group::spare_for`], recorded resyncing, and commits (the spare is
    /// an ordinary member from then on). Nothing is copied: the caller
    /// resyncs the new plex. Returns the spare and the disk of the plex it
    /// replaces, or None when the volume has no failed or missing plex or no
    /// spare fits. Refused when the volume does not exist or has no in-sync
    /// plex to resync from. A plex on a disk in `waiting` (a remote disk
    /// being reconnected, within its grace) is left alone.
    pub fn repair_onto_spare(
        &mut self,
        volume: &str,
        waiting: &[Uuid],
    ) -> Result<Option<(Uuid, Uuid)>> {
        let v = self.volume(volume)?;
        let Some(old) = v
            .plexes
            .iter()
            .find(|p| self.plex_lost(p) && !waiting.contains(&p.disk))
            .map(|p| p.disk)
        else {
            return Ok(None);
        };
        let Some((spare, offset)) = self.spare_extent_for(volume) else {
            return Ok(None);
        };
        self.require_source(volume)?;
        self.replace_plexes(volume, &[(old, spare, offset)])?;
        Ok(Some((spare, old)))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::MIB;
    use crate::format::PlexState;
    use crate::format::Style;
    use crate::group::NoProgress;
    use crate::group::ops::{self, InitOptions};

    fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
        let p = dir.join(name);
        fs::File::create(&p).unwrap().set_len(mib * MIB).unwrap();
        p
    }

    fn init(existing: Option<Group>, path: &Path, controller: &str, spare: bool) -> Group {
        let opts = InitOptions {
            style: Style::Raw,
            controller: Some(controller.into()),
            group: Some("g".into()),
            force: false,
            region_size: 0,
            spare,
        };
        ops::init(existing, &[path.to_path_buf()], &opts).unwrap()
    }

    /// a (c0) and b (c1) hold mirror m; spare s0 sits on c0, spare s1 on
    /// c2, and the small spare s2 (c3) cannot hold m.
    fn group(dir: &Path) -> (Group, [Uuid; 5]) {
        let a = image(dir, "a.img", 40);
        let b = image(dir, "b.img", 40);
        let s0 = image(dir, "s0.img", 40);
        let s1 = image(dir, "s1.img", 40);
        let s2 = image(dir, "s2.img", 20);
        let g = init(None, &a, "c0", false);
        let g = init(Some(g), &b, "c1", false);
        let g = init(Some(g), &s0, "c0", true);
        let g = init(Some(g), &s1, "c2", true);
        let mut g = init(Some(g), &s2, "c3", true);
        g.start_bitmaps().unwrap();
        g.create("m", 16 * MIB, 2, &[]).unwrap();
        let uuids = [&a, &b, &s0, &s1, &s2].map(|p| g.resolve_disk(p).unwrap());
        (g, uuids)
    }

    #[test]
    fn automatic_placement_leaves_spares_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (g, [a, b, ..]) = group(dir.path());
        let mut on: Vec<Uuid> = g
            .volume("m")
            .unwrap()
            .plexes
            .iter()
            .map(|p| p.disk)
            .collect();
        on.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(on, want);
    }

    #[test]
    fn spare_for_prefers_another_controller_and_needs_room() {
        let dir = tempfile::tempdir().unwrap();
        let (mut g, [_, _, s0, s1, s2]) = group(dir.path());
        // a sits on c0: s0 shares it, s1 does not; s2 is too small.
        assert_eq!(g.spare_for("m"), Some(s1));
        g.config.disk_mut(s1).unwrap().spare = false;
        assert_eq!(
            g.spare_for("m"),
            Some(s0),
            "any spare when none is elsewhere"
        );
        g.config.disk_mut(s0).unwrap().spare = false;
        assert_eq!(g.spare_for("m"), None, "{s2} is too small for m");
        assert_eq!(g.spare_for("no-such-volume"), None);
    }

    #[test]
    fn repair_onto_spare_replaces_one_failed_plex_and_retires_the_spare() {
        let dir = tempfile::tempdir().unwrap();
        let (mut g, [_, b, _, s1, _]) = group(dir.path());
        assert_eq!(
            g.repair_onto_spare("m", &[]).unwrap(),
            None,
            "nothing failed"
        );
        let seqno = g.config.seqno;
        g.fail(&dir.path().join("b.img"), false).unwrap();
        // A disk waited for (a remote one reconnecting) keeps its plex.
        assert_eq!(g.repair_onto_spare("m", &[b]).unwrap(), None);
        assert!(g.is_spare(s1));
        assert_eq!(g.repair_onto_spare("m", &[]).unwrap(), Some((s1, b)));
        assert!(g.config.seqno > seqno + 1, "the repair committed");
        assert!(!g.is_spare(s1));
        let v = g.volume("m").unwrap();
        assert!(v.plexes.iter().all(|p| p.disk != b));
        let p = v.plexes.iter().find(|p| p.disk == s1).unwrap();
        assert_eq!(p.state, PlexState::Resyncing);
        assert_eq!(
            p.resync_reason.as_deref(),
            Some(
                format!(
                    "a hot spare replacing the plex on {}",
                    dir.path().join("b.img").display()
                )
                .as_str()
            )
        );
        assert_eq!(
            g.repair_onto_spare("m", &[]).unwrap(),
            None,
            "no failed plex left"
        );
        // The group's controller resyncs the spare's plex.
        let live = crate::group::live::LiveGroup::start(g, Default::default());
        let done = live.resync_in_foreground(&NoProgress, None).unwrap();
        assert_eq!(done.len(), 1, "one resync");
        assert_eq!(done[0].bytes, 16 * MIB, "{}", done[0].line);
        let states: Vec<PlexState> = live
            .with_group(|g| {
                g.volume("m")
                    .unwrap()
                    .plexes
                    .iter()
                    .map(|p| p.state)
                    .collect()
            })
            .unwrap();
        assert_eq!(states, vec![PlexState::InSync; 2]);
    }

    #[test]
    fn repair_onto_spare_without_a_fitting_spare_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut g, [_, _, s0, s1, _]) = group(dir.path());
        for s in [s0, s1] {
            g.config.disk_mut(s).unwrap().spare = false;
        }
        g.fail(&dir.path().join("b.img"), false).unwrap();
        let seqno = g.config.seqno;
        assert_eq!(g.repair_onto_spare("m", &[]).unwrap(), None);
        assert_eq!(g.config.seqno, seqno, "nothing committed");
        assert!(g.repair_onto_spare("nope", &[]).is_err());
    }
}
