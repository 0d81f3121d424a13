//! The heap: dlmalloc (the allocator std uses on this target), fed memory
//! the way `sbrk` feeds a C allocator: from where the program's static data
//! ends, upwards, a kilobyte at a time, growing the linear memory only once
//! what the linker reserved is used up.
//!
//! Why not dlmalloc as std sets it up: on `wasm32-wasip2` it leaves the
//! memory the linker reserved past the static data unused and grows the
//! memory by a 64 KiB page for its first allocation, writing that segment's
//! header at its start and a fencepost at its end: two 4 KiB pages of the
//! host's that every instance touches and that stay resident for as long as
//! the instance lives, which is to say for as long as its TCP connection is
//! open. Fed from the end of the static data, the small heap a connection
//! needs lies in the page the static data ends in, or the next one.

use core::alloc::{GlobalAlloc, Layout};
use core::arch::wasm32;
use core::ptr;
use core::sync::atomic::{AtomicUsize, Ordering};

use dlmalloc::Dlmalloc;
use spin::Mutex;

/// A WebAssembly page.
const WASM_PAGE: usize = 64 << 10;

/// How much memory dlmalloc asks for at a time.
const GRANULARITY: usize = 1 << 10;

unsafe extern "C" {
    /// Defined by the linker: the first byte past the static data (the
    /// stack lies below it on this target).
    static __heap_base: u8;
}

/// Hands dlmalloc memory in ascending, contiguous pieces, which it merges
/// into one segment.
struct Break {
    /// The next byte to hand out; 0 until the first request.
    next: AtomicUsize,
}

// SAFETY: `alloc` returns memory that nothing else uses (nothing else in a
// plugin built on this crate allocates or grows the memory), that is zeroed
// (not written since the instance started, or just grown), and that is
// never handed out twice; nothing is ever given back.
unsafe impl dlmalloc::Allocator for Break {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        let failed = (ptr::null_mut(), 0, 0);
        let start = match self.next.load(Ordering::Relaxed) {
            0 => (&raw const __heap_base).addr(),
            next => next,
        };
        let Some(end) = start.checked_add(size) else {
            return failed;
        };
        let have = wasm32::memory_size(0) * WASM_PAGE;
        if end > have && wasm32::memory_grow(0, (end - have).div_ceil(WASM_PAGE)) == usize::MAX {
            return failed;
        }
        self.next.store(end, Ordering::Relaxed);
        (ptr::with_exposed_provenance_mut(start), size, 0)
    }

    fn remap(&self, _ptr: *mut u8, _old: usize, _new: usize, _can_move: bool) -> *mut u8 {
        ptr::null_mut()
    }

    fn free_part(&self, _ptr: *mut u8, _old: usize, _new: usize) -> bool {
        false
    }

    fn free(&self, _ptr: *mut u8, _size: usize) -> bool {
        false
    }

    fn can_release_part(&self, _flags: u32) -> bool {
        false
    }

    fn allocates_zeros(&self) -> bool {
        true
    }

    fn page_size(&self) -> usize {
        WASM_PAGE
    }
}

/// dlmalloc behind a lock, as the global allocator (a plugin has one
/// thread, so the lock is never contended).
struct Heap(Mutex<Dlmalloc<Break>>);

#[global_allocator]
static HEAP: Heap = Heap(Mutex::new(heap()));

const fn heap() -> Dlmalloc<Break> {
    let mut heap = Dlmalloc::new_with_allocator(Break {
        next: AtomicUsize::new(0),
    });
    // A power of two of at least twice a word: always accepted.
    heap.set_granularity(GRANULARITY);
    heap
}

// SAFETY: dlmalloc's `malloc`, `calloc`, `free` and `realloc` meet
// `GlobalAlloc`'s contract (as std's own wrapper relies on), and the lock
// keeps their calls apart.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe { self.0.lock().malloc(layout.size(), layout.align()) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe { self.0.lock().calloc(layout.size(), layout.align()) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above; `ptr` came from this allocator.
        unsafe { self.0.lock().free(ptr, layout.size(), layout.align()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above; `ptr` came from this allocator with `layout`.
        unsafe {
            self.0
                .lock()
                .realloc(ptr, layout.size(), layout.align(), new_size)
        }
    }
}
