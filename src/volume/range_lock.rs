//! Orders overlapping writes: a write holds its byte range from submission to
//! the last plex's completion, and a later overlapping write (or read repair)
//! starts only when it is released. Every plex therefore sees overlapping
//! writes in the same order, and the plexes never diverge.
//!
//! Waiting is asynchronous: `acquire` takes the work to start, runs it at once
//! when the range is free, or keeps it until the ranges ahead of it are
//! released, in arrival order (a waiter never overtakes an earlier waiter it
//! overlaps, so no write starves).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Mutex;

type Start = Box<dyn FnOnce(RangeGuard) + Send>;

struct Waiter {
    range: Range<u64>,
    id: u64,
    start: Start,
}

#[derive(Default)]
struct State {
    next_id: u64,
    held: Vec<(u64, Range<u64>)>,
    waiting: VecDeque<Waiter>,
}

#[derive(Default)]
pub struct RangeLock {
    state: Mutex<State>,
    /// Told when the last range is released ([`RangeLock::wait_idle`]).
    idle: std::sync::Condvar,
}

/// Proof of a held range; give it back with [`RangeLock::release`].
#[derive(Debug)]
#[must_use = "a held range must be released"]
pub struct RangeGuard {
    id: u64,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl RangeLock {
    pub fn new() -> RangeLock {
        RangeLock::default()
    }

    /// Runs `start` with the range held, now or once the overlapping ranges
    /// ahead of it are released. `start` runs on the calling thread or on the
    /// thread that releases the last range in its way.
    pub fn acquire(&self, range: Range<u64>, start: impl FnOnce(RangeGuard) + Send + 'static) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let id = s.next_id;
        s.next_id += 1;
        let blocked = s.held.iter().any(|(_, r)| overlaps(r, &range))
            || s.waiting.iter().any(|w| overlaps(&w.range, &range));
        if blocked {
            s.waiting.push_back(Waiter {
                range,
                id,
                start: Box::new(start),
            });
            return;
        }
        s.held.push((id, range));
        drop(s);
        start(RangeGuard { id });
    }

    /// Releases a range and starts the waiters that are now free.
    pub fn release(&self, guard: RangeGuard) {
        let mut ready = Vec::new();
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.held.retain(|(id, _)| *id != guard.id);
            let mut i = 0;
            while i < s.waiting.len() {
                let w = &s.waiting[i];
                let blocked = s.held.iter().any(|(_, r)| overlaps(r, &w.range))
                    || s.waiting
                        .iter()
                        .take(i)
                        .any(|e| overlaps(&e.range, &w.range));
                if blocked {
                    i += 1;
                    continue;
                }
                let w = s.waiting.remove(i).expect("index in range");
                s.held.push((w.id, w.range.clone()));
                ready.push(w);
            }
            if s.held.is_empty() && s.waiting.is_empty() {
                self.idle.notify_all();
            }
        }
        for w in ready {
            (w.start)(RangeGuard { id: w.id });
        }
    }

    /// Blocks until no range is held or waited for.
    pub fn wait_idle(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !(s.held.is_empty() && s.waiting.is_empty()) {
            s = self.idle.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Ranges held or waiting (for tests and metrics).
    pub fn busy(&self) -> usize {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.held.len() + s.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn disjoint_ranges_run_at_once() {
        let lock = Arc::new(RangeLock::new());
        let ran = Arc::new(AtomicUsize::new(0));
        let mut guards = Vec::new();
        for i in 0..4u64 {
            let ran = ran.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            lock.acquire(i * 10..i * 10 + 10, move |g| {
                ran.fetch_add(1, Ordering::SeqCst);
                tx.send(g).unwrap();
            });
            guards.push(rx.recv().unwrap());
        }
        assert_eq!(ran.load(Ordering::SeqCst), 4);
        for g in guards {
            lock.release(g);
        }
        assert_eq!(lock.busy(), 0);
    }

    #[test]
    fn overlapping_ranges_wait_and_run_in_arrival_order() {
        let lock = Arc::new(RangeLock::new());
        let order = Arc::new(Mutex::new(Vec::new()));
        let guards = Arc::new(Mutex::new(Vec::new()));
        for (i, r) in [(0, 0..100), (1, 50..60), (2, 55..70), (3, 200..300)] {
            let order = order.clone();
            let guards = guards.clone();
            lock.acquire(r, move |g| {
                order.lock().unwrap().push(i);
                guards.lock().unwrap().push(g);
            });
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 3]);
        let first = guards.lock().unwrap().remove(0);
        lock.release(first);
        // 1 starts; 2 overlaps 1, so it still waits.
        assert_eq!(*order.lock().unwrap(), vec![0, 3, 1]);
        let g1 = guards.lock().unwrap().pop().unwrap();
        lock.release(g1);
        assert_eq!(*order.lock().unwrap(), vec![0, 3, 1, 2]);
    }

    #[test]
    fn wait_idle_returns_once_the_last_range_is_released() {
        let lock = Arc::new(RangeLock::new());
        // Idle already: returns at once.
        lock.wait_idle();
        let (tx, rx) = std::sync::mpsc::channel();
        lock.acquire(0..10, move |g| tx.send(g).unwrap());
        let g = rx.recv().unwrap();
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = {
            let (lock, released) = (lock.clone(), released.clone());
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                released.store(true, Ordering::SeqCst);
                lock.release(g);
            })
        };
        lock.wait_idle();
        assert!(
            released.load(Ordering::SeqCst),
            "wait_idle returned with a range held"
        );
        assert_eq!(lock.busy(), 0);
        t.join().unwrap();
    }
}
