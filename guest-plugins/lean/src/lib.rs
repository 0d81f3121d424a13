//! What std gives a plugin on `wasm32-wasip2`, for the built-ins that do
//! without it: a memory allocator ([`heap`]), a panic handler and the
//! canonical ABI's `cabi_realloc` export. It leaves everything else to the
//! plugins.
//!
//! Why do without std: on this target std links the WASI C library, whose
//! start-up and panic paths import a dozen WASI interfaces (`wasi:cli`'s
//! environment, exit, stdio and terminals, `wasi:io`), and the component
//! then carries two more core modules to adapt them. The host builds all of
//! that for every instance, which is to say for every TCP connection. A
//! plugin linked against this crate imports only the `wasm-echo:plugin`
//! interfaces it uses and is one core module: it starts in less time and
//! holds fewer pages while its connection is open. What it gives up is
//! std's panic message: a panic traps at once (`unreachable`), which the
//! host reports and contains as it does any trap.
//!
//! A plugin opts in with `#![no_std]`, `extern crate alloc;` and
//! `use lean as _;` (the last so that the items below are linked).
//!
//! # One page for an idle instance's stack, data and heap
//!
//! The linker puts the stack first (growing down from its top) and the
//! static data right above it, then the heap ([`heap`]). A connection's
//! first calls write to the top of the stack, to the static data and to the
//! heap's first allocations, and each page written is one the host copies
//! for that instance and keeps for as long as the connection is open. With
//! the stack's top on a page boundary, as a stack of 1 MiB puts it, that is
//! two pages at least. The lean plugins link with a stack 3 KiB short of
//! 1 MiB (`-zstack-size`, set by `link.rs`, the build script they share),
//! so that its top lies 1 KiB into a page and the static data and the start
//! of the heap have the other 3 KiB of it: the first calls of `echo` and
//! `counter` use less than 512 bytes of stack (`hello`'s fit in the
//! kilobyte too), and `counter`'s static data and first allocations fit in
//! 3 KiB but not in 2 KiB (found by moving the boundary). A plugin that uses
//! more touches the next page, as it would have anyway.
//!
//! Under `cfg(test)` (`clippy --all-targets` builds a test harness, which
//! brings std and std's own handler and allocator) it gives nothing.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

// `memcmp`, `memcpy` and the like: on this target compiler-builtins leaves
// them to the WASI C library, so it is linked as std would link it. Only the
// routines a plugin calls are taken from it, and those import nothing.
#[cfg(not(test))]
#[link(name = "c")]
unsafe extern "C" {}

#[cfg(not(test))]
mod heap;

/// A panic traps: the host ends the call and drops the instance.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

/// The canonical ABI's allocator, which the host calls to place lists and
/// strings in guest memory. std exports it on `wasm32-wasip2` and
/// `wit-bindgen` only brings its own for other targets, so without std it
/// is written here (no crate offers it).
///
/// # Safety
///
/// Called by the host per the canonical ABI: `old_ptr` and `old_len` are
/// zero or an earlier allocation of this function with alignment `align`,
/// and `align` is a power of two.
#[cfg(not(test))]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{Layout, alloc, handle_alloc_error, realloc};
    let layout;
    let ptr = if old_len == 0 {
        if new_len == 0 {
            // A dangling, aligned pointer for an empty list, as std does.
            return align as *mut u8;
        }
        // SAFETY: the canonical ABI passes a power-of-two alignment.
        layout = unsafe { Layout::from_size_align_unchecked(new_len, align) };
        // SAFETY: `new_len` is not zero.
        unsafe { alloc(layout) }
    } else {
        // SAFETY: as for the allocation `old_ptr` came from.
        layout = unsafe { Layout::from_size_align_unchecked(old_len, align) };
        // SAFETY: `old_ptr` was allocated here with this layout.
        unsafe { realloc(old_ptr, layout, new_len) }
    };
    if ptr.is_null() {
        handle_alloc_error(layout);
    }
    ptr
}
