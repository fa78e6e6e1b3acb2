//! The benchmark baselines' runtime (`weir-bench-static`, `weir-bench-forward`): the same choice
//! and allocator as `weir run` (current-thread on one CPU, else multi-thread; mimalloc), so the
//! floors are fair.

/// The allocator `weir` uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map(std::num::NonZero::get).unwrap_or(1);
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}
