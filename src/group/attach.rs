//! A disk of the group that was absent when the group was assembled and is
//! present again while it serves (hot-plugged, or a cable put back): it is
//! opened, checked against the config, and made a member, so that
//! `reactivate` can bring it back without stopping `serve`.

use std::path::Path;
use std::sync::Arc;
use uuid::Uuid;

use super::{Group, Member, open_disk_with, read_found};
use crate::format::DiskState;
use crate::format::ondisk::{self, FormatError};
use crate::volume::queue::QueuedDisk;
use crate::{Error, Result};

impl Group {
    /// Opens the disk at `path` (locked, as the group's disks are opened)
    /// and makes it a member again. Refused when it is not a disk of this group's
    /// config, when it is present already, or when it moved on without the
    /// group: a config of its own written after it left is a split brain,
    /// which only `resolve-split-brain` (offline) settles.
    pub fn attach(&mut self, path: &Path) -> Result<Uuid> {
        let disk = open_disk_with(path, &self.open)?;
        self.attach_disk(path, disk)
    }

    /// [`Group::attach`] of a disk opened already (a remote disk reached
    /// again, opened off the controller's thread).
    pub fn attach_disk(&mut self, path: &Path, disk: Arc<QueuedDisk>) -> Result<Uuid> {
        let read = match ondisk::read_label(&*disk) {
            Ok(Some(read)) => read,
            Ok(None) => {
                return Err(Error::refused(format!(
                    "{} is not a mirrorvol disk (no label found)",
                    path.display()
                )));
            }
            Err(FormatError::Damaged) => {
                return Err(Error::refused(format!(
                    "disk {}: every label copy is damaged, so it cannot say which disk it is",
                    path.display()
                )));
            }
            Err(e) => {
                return Err(Error::corrupt(format!(
                    "disk {} cannot be read: {e}",
                    path.display()
                )));
            }
        };
        let found = read_found(path, super::canonical(path, self.open.timeout), disk, read);
        let uuid = found.read.label.disk_uuid;
        if found.read.label.group_uuid != self.config.uuid {
            return Err(Error::refused(format!(
                "disk {} belongs to another group ({})",
                path.display(),
                found.read.label.group_uuid
            )));
        }
        let Some(entry) = self.config.disk(uuid) else {
            return Err(Error::refused(format!(
                "disk {} carries the label of group {} but is not in its config (removed earlier)",
                path.display(),
                self.config.name
            )));
        };
        if self.members.contains_key(&uuid) {
            return Err(Error::refused(format!(
                "disk {} is present already",
                path.display()
            )));
        }
        if entry.state != DiskState::Online
            && found.config.is_some()
            && found.seqno >= entry.state_seqno
        {
            return Err(Error::refused(format!(
                "disk {} changed on its own while it was away (its config is at {}, written after it left the group at {}): this is a split brain; stop mirrorvol serve and settle it with resolve-split-brain",
                path.display(),
                found.seqno,
                entry.state_seqno
            )));
        }
        self.config.disk_mut(uuid).expect("checked").path = path.display().to_string();
        let mut found = found;
        found.path = path.to_path_buf();
        self.members.insert(uuid, Member::from_found(found));
        self.apply_deadlines();
        // Read now: no longer reported unreadable.
        let shown = path.display().to_string();
        self.unreadable.retain(|u| u.path != shown);
        if let Some(set) = self.bitmaps.clone()
            && let Err(e) = self.load_bitmap(&set, uuid)
        {
            self.members.remove(&uuid);
            return Err(e);
        }
        Ok(uuid)
    }
}
