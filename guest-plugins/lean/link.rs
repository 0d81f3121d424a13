//! The build script of the plugins built on `lean` (each names it with
//! `build = "../lean/link.rs"`): links the plugin with a stack 3 KiB short of
//! 1 MiB, so that an idle instance's stack top, static data and first heap
//! allocations share one page: see `lean`'s crate documentation.
const STACK_BYTES: u32 = 1024 * 1024 - 3 * 1024;

fn main() {
    println!("cargo:rustc-link-arg=-zstack-size={STACK_BYTES}");
}
