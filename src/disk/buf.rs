//! Aligned I/O buffers: what `O_DIRECT` takes without a bounce copy. The
//! engine carries write data and read results in them, so a transfer goes
//! from the caller's copy to the disk in one step.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// The alignment of buffers the engine allocates: a page, which every
/// `O_DIRECT` implementation accepts.
pub const IO_ALIGN: usize = 4096;

/// A zeroed heap buffer with a chosen alignment.
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
        // SAFETY: the layout has a non-zero size (`len.max(1)`).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        AlignedBuf { ptr, len, layout }
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
        // SAFETY: `ptr` came from `alloc_zeroed` with this very layout and is
        // freed only here.
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
        for len in [0, 1, 512, 4096, 12345] {
            let b = AlignedBuf::new(len, IO_ALIGN);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
        }
        let c = AlignedBuf::from_slice(b"mirror");
        assert_eq!(&c[..], b"mirror");
    }
}
