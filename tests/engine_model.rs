//! Model-based test of the mirror engine: seeded batches of concurrent
//! writes, write-zeroes, reads and flushes at random, overlapping offsets,
//! all submitted at once through the engine's callbacks, checked against a
//! reference.
//!
//! The engine starts overlapping writes in arrival order (its range lock),
//! and disjoint writes commute, so after a batch the volume must equal the
//! reference with the batch's writes applied in submission order, and every
//! in-sync plex, read straight from its image file, must equal it too (the
//! plexes never diverge). A read racing a write to the same block may see
//! either; a read of a block no write of its batch touches must see the
//! reference exactly. Some seeds break one plex mid-run (write errors, a torn
//! write): the model must still hold on the plexes that stay in sync.

mod common;
mod rig;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use mirrorvol::disk::AlignedBuf;
use mirrorvol::volume::engine::Run;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rig::*;

const BLOCKS: u64 = 256;
const SIZE: u64 = BLOCKS * BLOCK;
const BATCHES: usize = 25;
const OPS: usize = 24;

#[derive(Debug, Clone)]
enum Req {
    Write {
        first: u64,
        n: u64,
        id: u64,
        fua: bool,
    },
    Zero {
        first: u64,
        n: u64,
        fua: bool,
    },
    Read {
        first: u64,
        n: u64,
    },
    Flush,
}

impl Req {
    /// The blocks a write or write-zeroes covers.
    fn writes(&self) -> Option<std::ops::Range<u64>> {
        match self {
            Req::Write { first, n, .. } | Req::Zero { first, n, .. } => Some(*first..first + n),
            _ => None,
        }
    }
}

fn write_data(first: u64, n: u64, id: u64) -> Vec<u8> {
    (first..first + n).flat_map(|b| block_data(b, id)).collect()
}

fn apply(model: &mut [u8], req: &Req) {
    match req {
        Req::Write { first, n, id, .. } => {
            let at = (first * BLOCK) as usize;
            model[at..at + (n * BLOCK) as usize].copy_from_slice(&write_data(*first, *n, *id));
        }
        Req::Zero { first, n, .. } => {
            let at = (first * BLOCK) as usize;
            model[at..at + (n * BLOCK) as usize].fill(0);
        }
        _ => {}
    }
}

fn random_req(rng: &mut StdRng, next_id: &mut u64) -> Req {
    let n = rng.random_range(1..=16u64);
    let first = rng.random_range(0..=BLOCKS - n);
    match rng.random_range(0..100u32) {
        0..50 => {
            *next_id += 1;
            Req::Write {
                first,
                n,
                id: *next_id,
                fua: rng.random_bool(0.2),
            }
        }
        50..60 => Req::Zero {
            first,
            n,
            fua: rng.random_bool(0.2),
        },
        60..95 => Req::Read { first, n },
        _ => Req::Flush,
    }
}

enum Fault {
    None,
    /// Writes to a part of disk 1's plex fail from batch 8 on.
    WriteErrors,
    /// Disk 2 tears a write in batch 8.
    Torn,
}

fn run(seed: u64, fault: Fault) {
    let disks = &[
        disk("a.img", "c0"),
        disk("b.img", "c1"),
        disk("c.img", "c2"),
    ];
    let mut rig = Rig::new(disks, 64, &[("m", SIZE, &[0, 1, 2])]);
    let live = rig.start(opts(5000, 20));
    let vol = live.volume("m").unwrap();
    let offsets: Vec<u64> = (0..3)
        .map(|i| Rig::plex_offset(&live, "m", rig.uuids[i]))
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; SIZE as usize];
    let mut next_id = 1u64;
    let mut broken: Option<usize> = None;

    for batch in 0..BATCHES {
        if batch == 8 {
            match fault {
                Fault::None => {}
                Fault::WriteErrors => {
                    let from = rng.random_range(0..BLOCKS / 2) * BLOCK;
                    rig.members[1]
                        .faulty
                        .fail_writes(offsets[1] + from..offsets[1] + from + SIZE / 4);
                    broken = Some(1);
                }
                Fault::Torn => {
                    rig.members[2]
                        .faulty
                        .torn_write_after(rng.random_range(0..4));
                    broken = Some(2);
                }
            }
        }
        let reqs: Vec<Req> = (0..OPS)
            .map(|_| random_req(&mut rng, &mut next_id))
            .collect();
        let before = model.clone();
        let (tx, rx) = mpsc::channel::<(usize, std::io::Result<Vec<u8>>)>();
        for (i, req) in reqs.iter().enumerate() {
            let read_tx = tx.clone();
            let tx = tx.clone();
            let unit = move |r: std::io::Result<()>| {
                let _ = tx.send((i, r.map(|()| Vec::new())));
            };
            match req.clone() {
                Req::Write { first, n, id, fua } => vol.submit_write(
                    first * BLOCK,
                    Arc::new(AlignedBuf::from_slice(&write_data(first, n, id))),
                    fua,
                    Run::Queued,
                    Box::new(unit),
                ),
                Req::Zero { first, n, fua } => vol.submit_write_zeroes(
                    first * BLOCK,
                    n * BLOCK,
                    fua,
                    first % 2 == 0,
                    Run::Queued,
                    Box::new(unit),
                ),
                Req::Read { first, n } => vol.submit_read(
                    first * BLOCK,
                    (n * BLOCK) as usize,
                    Run::Queued,
                    Box::new(move |r| {
                        let _ = read_tx.send((i, r.map(|b| b.to_vec())));
                    }),
                ),
                Req::Flush => vol.submit_flush(Run::Queued, Box::new(unit)),
            }
        }
        drop(tx);
        let mut results: Vec<Option<std::io::Result<Vec<u8>>>> = (0..OPS).map(|_| None).collect();
        for _ in 0..OPS {
            let (i, r) = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("seed {seed} batch {batch}: a request never completed"));
            assert!(results[i].is_none(), "request {i} completed twice");
            results[i] = Some(r);
        }
        for r in &reqs {
            apply(&mut model, r);
        }

        for (i, req) in reqs.iter().enumerate() {
            let r = results[i].take().unwrap();
            let got =
                r.unwrap_or_else(|e| panic!("seed {seed} batch {batch}: {req:?} failed: {e}"));
            let Req::Read { first, n } = req else {
                continue;
            };
            for b in *first..first + n {
                if reqs.iter().filter_map(Req::writes).any(|w| w.contains(&b)) {
                    continue; // raced a write of this batch
                }
                let at = ((b - first) * BLOCK) as usize;
                let want = &before[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
                assert!(
                    &got[at..at + BLOCK as usize] == want,
                    "seed {seed} batch {batch}: {req:?} read block {b} wrong: {:?}",
                    decode(b, &got[at..at + BLOCK as usize])
                );
            }
        }

        // The volume and every in-sync plex equal the model.
        let mut whole = vec![0u8; SIZE as usize];
        vol.read(0, &mut whole).unwrap();
        assert!(
            whole == model,
            "seed {seed} batch {batch}: the volume differs from the model"
        );
        let s = states(&status_json(&live));
        let names = ["a.img", "b.img", "c.img"];
        let mut in_sync = 0;
        for (i, name) in names.iter().enumerate() {
            if s.plex("m", name) != "in-sync" {
                assert_eq!(Some(i), broken, "seed {seed} batch {batch}: {s:?}");
                continue;
            }
            in_sync += 1;
            let mut plex = vec![0u8; SIZE as usize];
            rig.members[i]
                .bad
                .inner()
                .read_at(&mut plex, offsets[i])
                .unwrap();
            if plex != model {
                let b = (0..BLOCKS)
                    .find(|b| {
                        let r = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
                        plex[r.clone()] != model[r]
                    })
                    .unwrap();
                panic!(
                    "seed {seed} batch {batch}: the plex on {name} differs from the model at block {b}"
                );
            }
        }
        assert!(in_sync >= 2);
    }
    if let Some(i) = broken {
        let s = states(&status_json(&live));
        assert_eq!(
            s.plex("m", ["a.img", "b.img", "c.img"][i]),
            "failed",
            "seed {seed}: the broken plex was never failed: {s:?}"
        );
    }
    drop(vol);
    shut_down(live);
    rig.release_handles();
    let g = assemble(&rig.paths);
    for (disk, bytes) in read_plexes(&g, "m") {
        assert!(bytes == model, "plex on {disk} after re-assembly");
    }
}

#[test]
fn concurrent_batches_match_the_model_on_every_plex() {
    for seed in [1, 2] {
        run(seed, Fault::None);
    }
}

#[test]
fn concurrent_batches_match_the_model_when_a_plex_fails_writes() {
    run(3, Fault::WriteErrors);
}

#[test]
fn concurrent_batches_match_the_model_when_a_plex_tears_a_write() {
    run(4, Fault::Torn);
}
