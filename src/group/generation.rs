//! Data generations in the group (the keeper that raises them is
//! [`crate::volume::generation`]): assembly compares the generation of
//! every in-sync plex's disk with its twins', and a plex on a disk behind
//! them is stale, whatever the config on it says (a rolled-back image, a
//! restored snapshot, a copy made earlier); a disk that left the group and
//! comes back older than it left gets a full resync.
//!
//! Why per volume: a disk that hangs while it holds a volume's last copy
//! stays in service and may miss a generation raise; its other plexes are
//! failed, and the volume it holds alone has no twin to be behind of.

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;

use super::Group;
use crate::format::state::{Generation, Read};
use crate::format::{DiskState, PlexState};
use crate::volume::generation::{GenerationDisk, GenerationKeeper, IDLE_BEFORE_NEW_GENERATION};

impl Group {
    /// The newest generation among the disks in service, as opened.
    pub fn assembled_generation(&self) -> Option<Generation> {
        self.members
            .iter()
            .filter(|(u, _)| self.is_online(**u))
            .filter_map(|(_, m)| match m.generation {
                Read::Good(g) => Some(g),
                _ => None,
            })
            .max_by_key(|g| g.counter)
    }

    /// The generation counter `disk` holds as far as this process knows:
    /// what the keeper last wrote to it, else what it held when opened,
    /// else (an absent disk) the newest one the group had when assembled.
    pub fn generation_of(&self, disk: Uuid) -> u64 {
        if let Some(c) = self.keeper.as_ref().and_then(|k| k.known(disk)) {
            return c;
        }
        match self.members.get(&disk) {
            Some(m) => m.generation_counter().unwrap_or(0),
            None => self.assembled_generation().map_or(0, |g| g.counter),
        }
    }

    /// Starts the keeper of the data generation (from the newest one found),
    /// over the disks in service.
    pub(super) fn start_generations(&mut self) -> Arc<GenerationKeeper> {
        let held: Vec<Generation> = self
            .members
            .iter()
            .filter(|(u, _)| self.is_online(**u))
            .filter_map(|(_, m)| match m.generation {
                Read::Good(g) => Some(g),
                _ => None,
            })
            .collect();
        let top = held.iter().max_by_key(|g| g.counter).copied();
        let current = match top {
            // The disks agree: the group goes on from there.
            Some(g) if held.iter().all(|h| *h == g) => g,
            // They do not (a stale disk now recorded so, a split brain
            // resolved): a new generation, written to every disk by the
            // first write or commit.
            Some(g) => Generation {
                counter: g.counter + 1,
                id: Uuid::new_v4(),
                previous: g.id,
                written_at: crate::format::state::now_secs(),
            },
            None => Generation {
                counter: 0,
                id: Uuid::nil(),
                previous: Uuid::nil(),
                written_at: 0,
            },
        };
        let known = self
            .members
            .iter()
            .filter_map(|(u, m)| match m.generation {
                Read::Good(g) => Some((*u, (g.counter, g.id))),
                _ => None,
            })
            .collect();
        let keeper = GenerationKeeper::new(current, known, IDLE_BEFORE_NEW_GENERATION);
        self.keeper = Some(keeper.clone());
        keeper.start_disks(self.generation_disks());
        keeper
    }

    /// Tells the keeper which disks are in service (after every commit).
    pub(super) fn sync_generation_disks(&self) {
        let Some(keeper) = &self.keeper else { return };
        keeper.set_disks(self.generation_disks());
    }

    fn generation_disks(&self) -> BTreeMap<Uuid, GenerationDisk> {
        self.members_in_service()
            .map(|(u, m)| (u, m.state_disk()))
            .collect()
    }

    /// Records, for each disk that leaves service in the commit at `seqno`,
    /// the generation it held.
    pub(super) fn record_left_generations(&mut self, seqno: u64) {
        let leaving: Vec<Uuid> = self
            .config
            .disks
            .iter()
            .filter(|d| d.state != DiskState::Online && d.state_seqno == seqno)
            .map(|d| d.uuid)
            .collect();
        for uuid in leaving {
            let g = self.generation_of(uuid);
            if let Some(d) = self.config.disk_mut(uuid) {
                d.left_generation = g;
            }
        }
    }

    /// Why a plex on `disk`, coming back, needs a full resync because of
    /// its generation: it holds an older one than when it left.
    pub(super) fn returned_older(&self, disk: Uuid) -> Option<String> {
        let left = self.config.disk(disk)?.left_generation;
        if left == 0 {
            return None;
        }
        let m = self.members.get(&disk)?;
        match m.generation_counter() {
            Some(c) if c >= left => None,
            Some(c) => Some(format!(
                "its disk holds data generation {c}, older than generation {left} it held when it left: it was rolled back or restored from an earlier copy"
            )),
            None => Some(format!(
                "its disk holds no readable data generation, where it held generation {left} when it left"
            )),
        }
    }

    /// Assembly's judgement: in every volume, an in-sync plex whose disk
    /// holds an older data generation than another in-sync plex's disk is
    /// recorded stale, with the reason (a full resync: the bitmaps cannot
    /// say what a copy taken at an unknown moment lacks).
    pub(super) fn judge_generations(&mut self) {
        let gen_of = |g: &Group, u: Uuid| -> Option<Generation> {
            match g.members.get(&u)?.generation {
                Read::Good(x) if g.is_online(u) => Some(x),
                _ => None,
            }
        };
        let mut stale: Vec<(String, Uuid, String)> = Vec::new();
        for v in &self.config.volumes {
            let held: Vec<(Uuid, Generation)> = v
                .plexes
                .iter()
                .filter(|p| p.state == PlexState::InSync)
                .filter_map(|p| Some((p.disk, gen_of(self, p.disk)?)))
                .collect();
            let Some((top_disk, top)) = held.iter().max_by_key(|(_, g)| g.counter).copied() else {
                continue;
            };
            for (disk, g) in &held {
                if g.counter < top.counter {
                    stale.push((
                        v.name.clone(),
                        *disk,
                        format!(
                            "its disk holds data generation {}, older than generation {} of {}: it was rolled back, restored from a snapshot or copied earlier",
                            g.counter,
                            top.counter,
                            self.disk_path(top_disk)
                        ),
                    ));
                }
            }
        }
        for (name, disk, why) in stale {
            let path = self.disk_path(disk);
            let line = format!("volume {name}: the plex on {path} is stale: {why}");
            tracing::warn!("{line}");
            self.warnings.push(line);
            if let Some(p) = self
                .config
                .volume_mut(&name)
                .and_then(|v| v.plexes.iter_mut().find(|p| p.disk == disk))
            {
                p.state = PlexState::Stale;
                p.resync_reason = Some(why);
            }
            self.generation_stale = true;
        }
    }
}

/// Disks that moved on apart from the group's line: at the newest counter
/// among `gens` (disk, generation, config seqno), with another id than the
/// disk holding the newest config there.
pub(super) fn apart(gens: &[(usize, Generation, u64)]) -> Vec<usize> {
    let Some(top) = gens.iter().map(|(_, g, _)| g.counter).max() else {
        return Vec::new();
    };
    let Some((_, line, _)) = gens
        .iter()
        .filter(|(_, g, _)| g.counter == top)
        .max_by_key(|(_, _, seqno)| *seqno)
    else {
        return Vec::new();
    };
    gens.iter()
        .filter(|(_, g, _)| g.counter == top && g.id != line.id)
        .map(|(i, _, _)| *i)
        .collect()
}
