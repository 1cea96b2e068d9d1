//! Format 3's state blocks: who holds the group (the claim) and which data
//! generation a disk holds. They live in the area between the label and
//! config slot A, zero in formats 1 and 2 (see [`super::layout`]):
//!
//! ```text
//!  member offset
//!  0       label (primary)                                  4 KiB
//!  4 KiB   claim block: the holder's heartbeat              4 KiB
//!  8 KiB   generation slot 0 (even counters)                4 KiB
//!  12 KiB  generation slot 1 (odd counters)                 4 KiB
//!  16 KiB  reserved for the block-checksum state, zero     48 KiB
//!  64 KiB  the written map (format 4, see [`super::written`])   960 KiB
//! ```
//!
//! Every block carries its meaning in its first 512 bytes (one sector, so
//! that a write of it is not torn on 512-byte disks) with a crc32c at 508;
//! the rest of the block is zero. The label is never rewritten by a
//! heartbeat. All integers are little-endian.
//!
//! **Claim block** (rewritten every heartbeat interval by the holder):
//!
//! ```text
//!   0 magic "MVCLAIM1"                        (8)
//!   8 state: 0 released, 1 held               (4)
//!  12 heartbeat interval, ms                  (4)
//!  16 host id (random, kept in the host-id file) (16)
//!  32 boot id of the holder's kernel          (16)
//!  48 pid                                     (4)
//!  52 reserved, zero                          (4)
//!  56 sequence, raised by every renewal       (8)
//!  64 fence after, ms: the holder stops all I/O when it could
//!     not renew on a majority of disks for this long         (8)
//!  72 claimed at, Unix seconds                (8)
//!  80 written at, Unix seconds (shown, never compared)       (8)
//!  88 host name, NUL padded                  (64)
//! 152 command (serve, add-mirror, ...), NUL padded           (32)
//! 184 the holder's start time, clock ticks after boot (a pid
//!     reused by another process does not pass for the holder)  (8)
//! 192 what the holder is doing, when it shows progress (a
//!     command's resync or copy), so that `status` from another
//!     process can show it: bytes done    (8)
//! 200   bytes in all; 0 when it shows none (8)
//! 208   bytes per second since it began   (8)
//! 216   what, NUL padded ("resync data onto /dev/sdb")  (256)
//! 472 reserved, zero
//! 508 crc32c of bytes [0, 508)                (4)
//! ```
//!
//! **Generation slot** (written before the first data write after each
//! open for writing and after each idle period, to both slots in turn):
//!
//! ```text
//!   0 magic "MVGENER1"                        (8)
//!   8 counter                                 (8)
//!  16 generation id, random per counter      (16)
//!  32 previous generation id                 (16)
//!  48 written at, Unix seconds (shown, never compared)       (8)
//!  56 reserved, zero
//! 508 crc32c of bytes [0, 508)                (4)
//! ```

use uuid::Uuid;

use super::label::{u32_at, u64_at, uuid_at};
use super::layout::LABEL_SIZE;

/// Offset of the claim block from the start of the member area.
pub const CLAIM_OFFSET: u64 = LABEL_SIZE;
/// Offset of generation slot 0 from the start of the member area.
pub const GENERATION_OFFSET: u64 = 2 * LABEL_SIZE;
/// Size of every state block.
pub const STATE_BLOCK: u64 = 4096;
/// Offset of the area reserved for the block-checksum state.
pub const CHECKSUM_STATE_OFFSET: u64 = 4 * LABEL_SIZE;

pub const CLAIM_MAGIC: &[u8; 8] = b"MVCLAIM1";
pub const GENERATION_MAGIC: &[u8; 8] = b"MVGENER1";

const CRC: usize = 508;
const MEANING: usize = 512;

fn text_at(buf: &[u8], at: usize, len: usize) -> String {
    let raw = &buf[at..at + len];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(len);
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn put_text(buf: &mut [u8], at: usize, len: usize, text: &str) {
    let mut n = text.len().min(len);
    // Never cut a character in half.
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    buf[at..at + n].copy_from_slice(&text.as_bytes()[..n]);
}

fn seal(buf: &mut [u8]) {
    let crc = crc32c::crc32c(&buf[..CRC]);
    buf[CRC..MEANING].copy_from_slice(&crc.to_le_bytes());
}

/// What a state block position holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read<T> {
    /// All zero: never written (formats 1 and 2, or a fresh disk).
    Empty,
    /// Something is there but it does not decode.
    Damaged(&'static str),
    Good(T),
}

fn check(buf: &[u8], magic: &[u8; 8]) -> Option<Result<(), &'static str>> {
    if buf.len() < MEANING {
        return Some(Err("block is truncated"));
    }
    if buf[..MEANING].iter().all(|&b| b == 0) {
        return None;
    }
    if &buf[..8] != magic {
        return Some(Err("wrong magic"));
    }
    if crc32c::crc32c(&buf[..CRC]) != u32_at(buf, CRC) {
        return Some(Err("checksum mismatch"));
    }
    Some(Ok(()))
}

/// The claim block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimBlock {
    pub held: bool,
    pub interval_ms: u32,
    pub host: Uuid,
    pub boot: Uuid,
    pub pid: u32,
    pub seq: u64,
    pub fence_ms: u64,
    pub claimed_at: u64,
    pub written_at: u64,
    pub hostname: String,
    pub command: String,
    pub started: u64,
    /// The holder's progress, when it shows one.
    pub activity: Option<Activity>,
}

/// What a holder is doing, with its progress (written with each renewal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    pub what: String,
    pub done: u64,
    pub total: u64,
    /// Bytes per second since it began.
    pub rate: u64,
}

impl ClaimBlock {
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; STATE_BLOCK as usize];
        buf[..8].copy_from_slice(CLAIM_MAGIC);
        buf[8..12].copy_from_slice(&u32::from(self.held).to_le_bytes());
        buf[12..16].copy_from_slice(&self.interval_ms.to_le_bytes());
        buf[16..32].copy_from_slice(self.host.as_bytes());
        buf[32..48].copy_from_slice(self.boot.as_bytes());
        buf[48..52].copy_from_slice(&self.pid.to_le_bytes());
        buf[56..64].copy_from_slice(&self.seq.to_le_bytes());
        buf[64..72].copy_from_slice(&self.fence_ms.to_le_bytes());
        buf[72..80].copy_from_slice(&self.claimed_at.to_le_bytes());
        buf[80..88].copy_from_slice(&self.written_at.to_le_bytes());
        put_text(&mut buf, 88, 64, &self.hostname);
        put_text(&mut buf, 152, 32, &self.command);
        buf[184..192].copy_from_slice(&self.started.to_le_bytes());
        if let Some(a) = self.activity.as_ref().filter(|a| a.total > 0) {
            buf[192..200].copy_from_slice(&a.done.to_le_bytes());
            buf[200..208].copy_from_slice(&a.total.to_le_bytes());
            buf[208..216].copy_from_slice(&a.rate.to_le_bytes());
            put_text(&mut buf, 216, 256, &a.what);
        }
        seal(&mut buf);
        buf
    }

    pub fn decode(buf: &[u8]) -> Read<ClaimBlock> {
        match check(buf, CLAIM_MAGIC) {
            None => return Read::Empty,
            Some(Err(e)) => return Read::Damaged(e),
            Some(Ok(())) => {}
        }
        let held = match u32_at(buf, 8) {
            0 => false,
            1 => true,
            _ => return Read::Damaged("unknown claim state"),
        };
        Read::Good(ClaimBlock {
            held,
            interval_ms: u32_at(buf, 12),
            host: uuid_at(buf, 16),
            boot: uuid_at(buf, 32),
            pid: u32_at(buf, 48),
            seq: u64_at(buf, 56),
            fence_ms: u64_at(buf, 64),
            claimed_at: u64_at(buf, 72),
            written_at: u64_at(buf, 80),
            hostname: text_at(buf, 88, 64),
            command: text_at(buf, 152, 32),
            started: u64_at(buf, 184),
            activity: match u64_at(buf, 200) {
                0 => None,
                total => Some(Activity {
                    what: text_at(buf, 216, 256),
                    done: u64_at(buf, 192).min(total),
                    total,
                    rate: u64_at(buf, 208),
                }),
            },
        })
    }
}

/// A data generation: raised on every disk in service before the first
/// write after each open for writing and after each idle period. A disk
/// whose counter is behind its twins' was rolled back, restored or copied
/// earlier; two disks at one counter with different ids moved on apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub counter: u64,
    pub id: Uuid,
    pub previous: Uuid,
    pub written_at: u64,
}

impl Generation {
    /// The slot (0 or 1) this generation is written to.
    pub fn slot(&self) -> u64 {
        self.counter % 2
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; STATE_BLOCK as usize];
        buf[..8].copy_from_slice(GENERATION_MAGIC);
        buf[8..16].copy_from_slice(&self.counter.to_le_bytes());
        buf[16..32].copy_from_slice(self.id.as_bytes());
        buf[32..48].copy_from_slice(self.previous.as_bytes());
        buf[48..56].copy_from_slice(&self.written_at.to_le_bytes());
        seal(&mut buf);
        buf
    }

    pub fn decode(buf: &[u8]) -> Read<Generation> {
        match check(buf, GENERATION_MAGIC) {
            None => Read::Empty,
            Some(Err(e)) => Read::Damaged(e),
            Some(Ok(())) => Read::Good(Generation {
                counter: u64_at(buf, 8),
                id: uuid_at(buf, 16),
                previous: uuid_at(buf, 32),
                written_at: u64_at(buf, 48),
            }),
        }
    }

    /// The newest of the two slots: the good one with the higher counter
    /// (a torn write of one slot leaves the other). Empty when neither was
    /// ever written; damaged when something is there and neither decodes.
    pub fn newest(slot0: &[u8], slot1: &[u8]) -> Read<Generation> {
        let (a, b) = (Generation::decode(slot0), Generation::decode(slot1));
        match (a, b) {
            (Read::Good(x), Read::Good(y)) => Read::Good(if y.counter > x.counter { y } else { x }),
            (Read::Good(x), _) | (_, Read::Good(x)) => Read::Good(x),
            (Read::Empty, Read::Empty) => Read::Empty,
            (Read::Damaged(e), _) | (_, Read::Damaged(e)) => Read::Damaged(e),
        }
    }
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn claim() -> ClaimBlock {
        ClaimBlock {
            held: true,
            interval_ms: 1000,
            host: Uuid::from_u128(7),
            boot: Uuid::from_u128(8),
            pid: 4242,
            seq: 99,
            fence_ms: 35_000,
            claimed_at: 1_700_000_000,
            written_at: 1_700_000_099,
            hostname: "büro-host".into(),
            command: "serve".into(),
            started: 123_456,
            activity: None,
        }
    }

    #[test]
    fn a_claim_carries_its_holders_progress() {
        let mut c = claim();
        c.command = "add-mirror".into();
        c.activity = Some(Activity {
            what: "resync data".into(),
            done: 3 << 20,
            total: 8 << 20,
            rate: 1 << 20,
        });
        let buf = c.encode();
        assert!(buf[472..508].iter().all(|&b| b == 0));
        assert_eq!(ClaimBlock::decode(&buf), Read::Good(c.clone()));
        // Nothing in all is no progress: a block written before this field
        // existed (zeros there) decodes with none.
        c.activity.as_mut().unwrap().total = 0;
        let Read::Good(d) = ClaimBlock::decode(&c.encode()) else {
            panic!("decodes")
        };
        assert_eq!(d.activity, None);
    }

    #[test]
    fn claim_round_trips_in_one_sector() {
        let buf = claim().encode();
        assert!(buf[512..].iter().all(|&b| b == 0));
        assert_eq!(ClaimBlock::decode(&buf), Read::Good(claim()));
        let mut bad = buf.clone();
        bad[60] ^= 1;
        assert_eq!(ClaimBlock::decode(&bad), Read::Damaged("checksum mismatch"));
        assert_eq!(ClaimBlock::decode(&vec![0; 4096]), Read::Empty);
    }

    #[test]
    fn the_newest_good_generation_slot_wins() {
        let g = |counter| Generation {
            counter,
            id: Uuid::from_u128(counter as u128),
            previous: Uuid::from_u128(counter as u128 - 1),
            written_at: 5,
        };
        let (four, five) = (g(4).encode(), g(5).encode());
        assert_eq!(Generation::newest(&four, &five), Read::Good(g(5)));
        assert_eq!(Generation::newest(&five, &four), Read::Good(g(5)));
        let mut torn = five.clone();
        torn[20] ^= 0xff;
        assert_eq!(Generation::newest(&four, &torn), Read::Good(g(4)));
        let zero = vec![0u8; 4096];
        assert_eq!(Generation::newest(&zero, &zero), Read::Empty);
        assert!(matches!(Generation::newest(&torn, &zero), Read::Damaged(_)));
    }

    #[test]
    fn long_names_are_cut_at_a_character() {
        let mut c = claim();
        c.hostname = "é".repeat(40);
        let Read::Good(back) = ClaimBlock::decode(&c.encode()) else {
            panic!("decodes");
        };
        assert_eq!(back.hostname, "é".repeat(32));
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = ClaimBlock::decode(&bytes);
            let _ = Generation::decode(&bytes);
        }
    }
}
