//! The process's global allocator for Rust code: blocks of 8 MiB and more get their own
//! anonymous mapping (returned to the system when freed), the rest goes to the system
//! allocator.
//!
//! Why: Parquet row groups (tens of MB) come and go all the time in the loader. On
//! glibc's heap they fragment it and peak RSS grows with the bytes streamed. Giving
//! them their own mappings used to be done with `mallopt(M_MMAP_THRESHOLD, 8 MiB)`, but
//! that is process-wide: it also sent libtorch's 8–32 MiB activations to `mmap`, and
//! every training step then paid page faults for them (float32 step 0.78× a plain
//! PyTorch script on the same CPU). This allocator only sees Rust's allocations, so
//! `main` can tune glibc's heap for libtorch and OpenCV instead.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::null_mut;

/// Rust allocations of at least this many bytes get their own mapping.
pub const LARGE: usize = 8 << 20;
const PAGE: usize = 4096;

pub struct LargeMmap;

fn is_large(size: usize, align: usize) -> bool {
    size >= LARGE && align <= PAGE
}

unsafe fn map(size: usize) -> *mut u8 {
    // Safety: an anonymous private mapping with no address hint has no preconditions.
    let p = unsafe {
        libc::mmap(
            null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        null_mut()
    } else {
        p.cast()
    }
}

// Safety: every block is freed by the path that allocated it, since the decision only
// depends on the layout, which `GlobalAlloc` callers must pass unchanged to `dealloc`
// and `realloc`.
unsafe impl GlobalAlloc for LargeMmap {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if is_large(l.size(), l.align()) {
            unsafe { map(l.size()) }
        } else {
            unsafe { System.alloc(l) }
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if is_large(l.size(), l.align()) {
            // Anonymous mappings are zero-filled.
            unsafe { map(l.size()) }
        } else {
            unsafe { System.alloc_zeroed(l) }
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if is_large(l.size(), l.align()) {
            unsafe { libc::munmap(p.cast(), l.size()) };
        } else {
            unsafe { System.dealloc(p, l) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let (old_large, new_large) = (is_large(l.size(), l.align()), is_large(new_size, l.align()));
        match (old_large, new_large) {
            (false, false) => unsafe { System.realloc(p, l, new_size) },
            (true, true) => {
                let q = unsafe { libc::mremap(p.cast(), l.size(), new_size, libc::MREMAP_MAYMOVE) };
                if q == libc::MAP_FAILED {
                    null_mut()
                } else {
                    q.cast()
                }
            }
            _ => {
                // Crossing the threshold: a new block from the other path, then a copy.
                // Safety: `new_size` is non-zero and the alignment is the old valid one.
                let nl = unsafe { Layout::from_size_align_unchecked(new_size, l.align()) };
                let q = unsafe { self.alloc(nl) };
                if !q.is_null() {
                    unsafe {
                        std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                        self.dealloc(p, l);
                    }
                }
                q
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_survive_growing_and_shrinking_across_the_threshold() {
        let a = LargeMmap;
        let l = Layout::from_size_align(1000, 64).unwrap();
        unsafe {
            let p = a.alloc(l);
            for i in 0..1000 {
                *p.add(i) = (i % 251) as u8;
            }
            // small → large → larger → small, contents kept each time
            let p = a.realloc(p, l, LARGE + 5);
            let l2 = Layout::from_size_align(LARGE + 5, 64).unwrap();
            *p.add(LARGE + 4) = 7;
            let p = a.realloc(p, l2, 3 * LARGE);
            let l3 = Layout::from_size_align(3 * LARGE, 64).unwrap();
            assert_eq!(*p.add(LARGE + 4), 7);
            let p = a.realloc(p, l3, 500);
            for i in 0..500 {
                assert_eq!(*p.add(i), (i % 251) as u8);
            }
            a.dealloc(p, Layout::from_size_align(500, 64).unwrap());
            let z = a.alloc_zeroed(l3);
            assert!((0..3 * LARGE).step_by(4099).all(|i| *z.add(i) == 0));
            a.dealloc(z, l3);
        }
    }
}
