//! The NBD backend of a disk queue.
//!
//! A disk that is an NBD export ([`crate::disk::nbd::NbdDisk`] with nothing
//! wrapped around it) has its data requests sent by one sender thread
//! without waiting for the answers: it writes each request on one of the
//! export's connections and takes the next, the connection's reader reads
//! the answer, and the disk's completer thread completes the request. The
//! workers before, each blocked on its answer, held requests in flight to
//! the number of workers (16 by default): a far export 5 ms away took at
//! most about 3000 writes a second, a write-behind backlog of 256 never
//! filled. One sender wakes once for a burst of requests, where each
//! request woke a worker of its own.
//!
//! What goes so: reads (into a buffer of their own or one lent), writes
//! (FUA as NBD_CMD_FLAG_FUA where the export takes it), flushes, and
//! write-zeroes where the export takes them, each of at most one NBD
//! request. The rest (longer transfers, FUA without the flag, health
//! checks) goes on to the workers, which run it as before; metadata keeps
//! its own lane. At most 512 requests are in flight on the export (the
//! sender waits for room); a queue that stops waits, within its deadline,
//! for the answers still owed. The completer runs one completion at a
//! time, as an io_uring disk's ring thread does: one that waits (a
//! failure report waits for the group's config commit) holds up the
//! disk's others meanwhile, never the answers of the config write itself,
//! which wait on their own tickets. The queue's
//! bookkeeping is the same as a worker's: a request that timed out while
//! queued is never sent, and one answered after the watchdog gave up on it
//! finds its ticket already completed.

use std::io;
use std::sync::{Arc, Weak};

use crossbeam_channel::{Receiver, Sender};

use super::{DiskQueue, DiskStats, Job, Op, Outcome};
use crate::disk::nbd::NbdDisk;
use crate::disk::{AlignedBuf, Disk};
use crate::nbd::proto;
use crate::nbd::session::Answer;

/// The sender thread of an NBD disk's queue: sends what it can, passes
/// the rest to the workers on `fallback`. Ends when the queue closes (its
/// channel does), and the workers' channel with it.
pub(super) fn sender(
    queue: Weak<DiskQueue>,
    disk: Arc<dyn Disk>,
    stats: Arc<DiskStats>,
    rx: Receiver<Job>,
    fallback: Sender<Job>,
) {
    for job in rx {
        // Timed out while queued: never sent (as a worker does).
        if let Some(q) = queue.upgrade()
            && !q.is_in_flight(job.id)
        {
            q.end(job.id);
            continue;
        }
        let back = match disk.as_nbd_disk() {
            Some(nbd) => send(nbd, job, &queue, &stats),
            None => Err(job),
        };
        if let Err(job) = back {
            // The workers are gone only once this thread is.
            let _ = fallback.send(job);
        }
    }
}

/// Sends `job` on `disk`'s connections and returns at once; the job comes
/// back when it is not one this backend takes.
fn send(
    disk: &NbdDisk,
    job: Job,
    queue: &Weak<DiskQueue>,
    stats: &Arc<DiskStats>,
) -> Result<(), Job> {
    let most = proto::MAX_REQUEST as usize;
    let fits = |len: usize| len > 0 && len <= most;
    // (command, flags, offset, length), and where a read's bytes go.
    let (ask, into) = match &job.op {
        Op::Read { offset, len } if fits(*len) => ((proto::CMD_READ, 0, *offset, *len), Into::Own),
        Op::ReadInto { offset, len, buf } if fits(*len) && *len <= buf.capacity() => {
            ((proto::CMD_READ, 0, *offset, *len), Into::Lent)
        }
        Op::Write { offset, data, fua } if fits(data.len()) && (!fua || disk.can_fua()) => {
            let flags = if *fua { proto::CMD_FLAG_FUA } else { 0 };
            (
                (proto::CMD_WRITE, flags, *offset, data.len()),
                Into::Nothing,
            )
        }
        Op::Flush => ((proto::CMD_FLUSH, 0, 0, 0), Into::Nothing),
        Op::WriteZeroes {
            offset,
            len,
            fua,
            keep,
        } if disk.can_write_zeroes()
            && *len > 0
            && *len <= most as u64
            && (!fua || disk.can_fua()) =>
        {
            let mut flags = 0;
            if *keep {
                flags |= proto::CMD_FLAG_NO_HOLE;
            }
            if *fua {
                flags |= proto::CMD_FLAG_FUA;
            }
            (
                (proto::CMD_WRITE_ZEROES, flags, *offset, *len as usize),
                Into::Nothing,
            )
        }
        _ => return Err(job),
    };
    let Job {
        id,
        submitted,
        op,
        ticket,
    } = job;
    let (kind, bytes) = (op.kind(), op.bytes());
    let (payload, lent) = match op {
        Op::Write { data, .. } => (Some(data), None),
        Op::ReadInto { buf, .. } => (None, Some(buf)),
        _ => (None, None),
    };
    let (queue, stats) = (queue.clone(), stats.clone());
    let (command, flags, offset, len) = ask;
    let then = Box::new(move |answer: io::Result<Answer>| {
        let outcome = outcome(answer, len, into, lent);
        stats.record(kind, bytes, outcome.is_ok(), submitted.elapsed());
        if let Some(q) = queue.upgrade() {
            q.end(id);
        }
        ticket.complete(outcome);
    });
    let data: &[u8] = payload.as_deref().map_or(&[], |d| &d[..]);
    disk.send_then((command, flags, offset, len as u32, data), then);
    Ok(())
}

/// Where a read's bytes go.
enum Into {
    /// A buffer of the request's own.
    Own,
    /// The buffer the request lent ([`Op::ReadInto`]).
    Lent,
    /// Not a read.
    Nothing,
}

/// The queue's outcome of an NBD answer.
fn outcome(
    answer: io::Result<Answer>,
    len: usize,
    into: Into,
    lent: Option<AlignedBuf>,
) -> Outcome {
    let answer = answer?;
    if answer.errno != 0 {
        // Kept raw, as a file's error would be (see the disk's `reply`).
        return Err(io::Error::from_raw_os_error(answer.errno as i32));
    }
    let mut buf = match into {
        Into::Nothing => return Ok(None),
        Into::Own => AlignedBuf::recycled(len),
        Into::Lent => {
            let mut buf = lent.ok_or_else(|| io::Error::other("a lent buffer went missing"))?;
            buf.set_len(len);
            buf
        }
    };
    match answer.data {
        Some(d) if d.len() == len => {
            buf.copy_from_slice(&d);
            Ok(Some(buf))
        }
        _ => Err(io::Error::other("a read was answered without its data")),
    }
}
