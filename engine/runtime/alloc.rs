//! The process's allocator: mimalloc, asked for a plain block wherever a plain block is
//! aligned enough.
//!
//! The `mimalloc` crate sends every Rust allocation to `mi_malloc_aligned`. mimalloc v3 takes
//! that call's fast path only for blocks up to 1 KiB, and above that only when the size rounds
//! to a power of two; any other size (a request's 1.5 KiB state, say) is over-allocated by
//! `align - 1` bytes and aligned by hand: about 200 more instructions per allocation, and a
//! block within 7 bytes of its size class takes the next one (1,536 B becomes 1,792 B). A
//! plain `mi_malloc` block is aligned to 16 bytes once it is that large, and to its size class
//! below (as C's `malloc` must be), so a layout whose alignment is at most 16 and at most its
//! size needs nothing more; the rest (cache-line-aligned types) keep the aligned calls. The same
//! rule as std's `System` on Unix.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every plain mimalloc block of at least this size has (`MI_MAX_ALIGN_SIZE`).
const PLAIN_ALIGN: usize = 16;

/// mimalloc as the global allocator (see the module's doc).
pub struct Allocator;

fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` takes aligned and
// plain blocks alike); `plain` only sends mimalloc layouts its plain blocks satisfy.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: plain mimalloc calls with the layout's size (and alignment).
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator; the new block keeps the layout's alignment.
        unsafe {
            if plain(layout.align(), new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size and alignment a Rust type can ask for, up to a few KiB: the block is aligned,
    /// and reallocation keeps both the alignment and the bytes.
    #[test]
    fn blocks_are_aligned_for_every_layout() {
        let a = Allocator;
        for align in [1, 2, 4, 8, 16, 32, 64, 128] {
            for size in (1..=4200).filter(|s| s % align == 0) {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: the layout's size is non-zero; each block is freed once, by `a`.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xA5, size);
                    let grown = a.realloc(p, layout, size + 24);
                    assert_eq!(grown as usize % align, 0, "realloc {size} align {align}");
                    assert_eq!(*grown.add(size - 1), 0xA5);
                    a.dealloc(grown, Layout::from_size_align_unchecked(size + 24, align));
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed {size} align {align}");
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
