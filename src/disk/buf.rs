//! Aligned I/O buffers: what `O_DIRECT` takes without a bounce copy. The
//! engine carries write data and read results in them, so a transfer goes
//! from the caller's copy to the disk in one step.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The alignment of buffers the engine allocates: a page, which every
/// `O_DIRECT` implementation accepts.
pub const IO_ALIGN: usize = 4096;

/// Buffers of [`AlignedBuf::recycled`] come in page-aligned powers of
/// two from 4 KiB to this, and go back to a pool when dropped.
const POOL_MAX: usize = 4 << 20;
const POOL_CLASSES: usize = (POOL_MAX / IO_ALIGN).trailing_zeros() as usize + 1;
/// Bytes the pool keeps at most, over every size.
const POOL_BYTES: usize = 64 << 20;

/// Freed buffers waiting for reuse, by size class (4 KiB << class): a
/// read's buffer is neither zeroed (every byte is overwritten or the read
/// fails) nor faulted in afresh.
struct Pool {
    classes: [Mutex<Vec<NonNull<u8>>>; POOL_CLASSES],
    bytes: AtomicUsize,
}

// SAFETY: the pointers are allocations nobody else refers to while they
// sit in the pool; the mutexes hand each to one taker.
unsafe impl Sync for Pool {}
// SAFETY: as above.
unsafe impl Send for Pool {}

static POOL: Pool = Pool {
    classes: [const { Mutex::new(Vec::new()) }; POOL_CLASSES],
    bytes: AtomicUsize::new(0),
};

/// Buffers at least this large (and aligned at most to a page) are mapped
/// from the kernel, which hands out zeroed pages as they are first
/// touched: the allocator zeroes a page-aligned allocation by hand, a
/// millisecond and a half for each 4 MiB buffer of a resync before its
/// read overwrites every byte.
const MAP_MIN: usize = 1 << 20;

/// Whether a buffer of `layout` is a mapping of its own.
fn mapped(layout: Layout) -> bool {
    layout.size() >= MAP_MIN && layout.align() <= IO_ALIGN
}

/// The pool's size class of a buffer of `layout`, if it has one.
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size();
    (layout.align() == IO_ALIGN && size.is_power_of_two() && (IO_ALIGN..=POOL_MAX).contains(&size))
        .then(|| (size / IO_ALIGN).trailing_zeros() as usize)
}

/// A heap buffer with a chosen alignment: zeroed when new, or recycled
/// ([`AlignedBuf::recycled`]).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>; shared
// references only read it.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; `&AlignedBuf` gives only `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(1), align.max(1))
            .expect("buffer alignment is a power of two and the size fits");
        let raw = if mapped(layout) {
            // SAFETY: a new private anonymous mapping of a non-zero size,
            // at an address the kernel picks: it overlaps nothing.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    layout.size(),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                std::ptr::null_mut()
            } else {
                p.cast::<u8>()
            }
        } else {
            // SAFETY: the layout has a non-zero size (`len.max(1)`).
            unsafe { alloc::alloc_zeroed(layout) }
        };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        AlignedBuf { ptr, len, layout }
    }

    /// A page-aligned buffer of `len` bytes for a caller that overwrites
    /// every byte before anything reads them (a read from a disk, a write's
    /// payload from a client): taken from the pool of freed buffers when
    /// one of its size is there, so its bytes are whatever the last user
    /// left (zeroes for a new one), never uninitialised.
    pub fn recycled(len: usize) -> AlignedBuf {
        let size = len.max(IO_ALIGN).next_power_of_two();
        if size > POOL_MAX {
            return AlignedBuf::new(len, IO_ALIGN);
        }
        let layout = Layout::from_size_align(size, IO_ALIGN).expect("a page-aligned power of two");
        let class = (size / IO_ALIGN).trailing_zeros() as usize;
        let taken = POOL.classes[class]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        match taken {
            Some(ptr) => {
                POOL.bytes.fetch_sub(size, Ordering::Relaxed);
                AlignedBuf { ptr, len, layout }
            }
            None => {
                let mut b = AlignedBuf::new(size, IO_ALIGN);
                b.set_len(len);
                b
            }
        }
    }

    /// A page-aligned copy of `data`.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::new(data.len(), IO_ALIGN);
        b.copy_from_slice(data);
        b
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self
    }

    /// Bytes the allocation holds (the largest length [`AlignedBuf::set_len`]
    /// accepts).
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// Makes the buffer `len` bytes long, within its allocation, so that
    /// one buffer serves requests of several sizes. Bytes past the old
    /// length keep what the allocation held (zeroes, or earlier data).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "{len} bytes do not fit the buffer");
        self.len = len;
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points at `layout.size() >= len` initialised (zeroed)
        // bytes owned by this value.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` keeps the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(class) = class_of(self.layout) {
            let size = self.layout.size();
            if POOL.bytes.fetch_add(size, Ordering::Relaxed) + size <= POOL_BYTES {
                POOL.classes[class]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(self.ptr);
                return;
            }
            POOL.bytes.fetch_sub(size, Ordering::Relaxed);
        }
        if mapped(self.layout) {
            // SAFETY: `ptr` is the start of a mapping of `layout.size()`
            // bytes made in `new` for this layout, unmapped only here (a
            // pooled one is not: it went to the pool above).
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.layout.size()) };
            return;
        }
        // SAFETY: `ptr` came from `alloc_zeroed` with this very layout, and
        // is freed only here (a pooled one is not: it went to the pool
        // above, and comes out as a new value owning it).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_sized() {
        // Both kinds: from the allocator, and mapped (1 MiB and more).
        for len in [0, 1, 512, 4096, 12345, MAP_MIN, 4 << 20, (4 << 20) + 1] {
            let b = AlignedBuf::new(len, IO_ALIGN);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
        let c = AlignedBuf::from_slice(b"mirror");
        assert_eq!(&c[..], b"mirror");
    }

    #[test]
    fn recycled_buffers_are_aligned_sized_and_reused() {
        for len in [1, 4096, 5000, 65536, 300_000, 8 << 20] {
            let b = AlignedBuf::recycled(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
            assert!(b.capacity() >= len);
        }
        // A buffer of a pooled size comes back for the next of its class
        // (this test's own size, so other tests do not take it between).
        let mut b = AlignedBuf::recycled(2 << 20);
        b.fill(7);
        let at = b.as_ptr();
        drop(b);
        let again = AlignedBuf::recycled((2 << 20) - 100);
        assert_eq!(again.as_ptr(), at);
        assert_eq!(again.len(), (2 << 20) - 100);
        assert!(again.iter().all(|&x| x == 7));
    }
}
