//! The `ringway` command.

#[global_allocator]
static GLOBAL: ringway::runtime::alloc::Allocator = ringway::runtime::alloc::Allocator;

fn main() {
    std::process::exit(ringway::cli::main(std::env::args().skip(1).collect()));
}
