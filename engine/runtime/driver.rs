//! Building a worker's runtime: io_uring with COOP_TASKRUN and SINGLE_ISSUER
//! where the kernel has them, plain io_uring where it does not, epoll where
//! io_uring is refused (old kernel, seccomp, `io_uring_disabled`) or asked for.

use std::{future::Future, io};

use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};

use crate::config::Driver;

/// Ring size: enough for thousands of in-flight operations per worker.
const RING_ENTRIES: u32 = 4096;

/// The driver a worker ended up with, for the start-up log and /stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverInUse {
    /// io_uring with COOP_TASKRUN and SINGLE_ISSUER.
    IoUringCoop,
    /// io_uring without the setup flags (kernel older than 6.0).
    IoUring,
    /// epoll.
    Epoll,
}

impl DriverInUse {
    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            DriverInUse::IoUringCoop => "io_uring (coop_taskrun, single_issuer)",
            DriverInUse::IoUring => "io_uring",
            DriverInUse::Epoll => "epoll",
        }
    }
}

/// Runs `make()`'s future to completion on the best runtime allowed by
/// `want`, calling `started` with the driver chosen before it runs.
pub fn run<F, Fut>(want: Driver, started: impl FnOnce(DriverInUse), make: F) -> io::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    if want != Driver::Epoll && std::env::var_os("MONOIO_FORCE_LEGACY_DRIVER").is_none() {
        let mut flags = io_uring::IoUring::builder();
        flags.setup_coop_taskrun().setup_single_issuer();
        let built = RuntimeBuilder::<IoUringDriver>::new()
            .with_entries(RING_ENTRIES)
            .uring_builder(flags)
            .enable_timer()
            .build()
            .map(|rt| (rt, DriverInUse::IoUringCoop))
            .or_else(|_| {
                // EINVAL: the kernel predates the flags.
                RuntimeBuilder::<IoUringDriver>::new()
                    .with_entries(RING_ENTRIES)
                    .enable_timer()
                    .build()
                    .map(|rt| (rt, DriverInUse::IoUring))
            });
        match built {
            Ok((mut rt, kind)) => {
                started(kind);
                rt.block_on(make());
                return Ok(());
            }
            Err(e) if want == Driver::IoUring => return Err(e),
            Err(_) => {}
        }
    }
    let mut rt = RuntimeBuilder::<LegacyDriver>::new()
        .with_entries(RING_ENTRIES)
        .enable_timer()
        .build()?;
    started(DriverInUse::Epoll);
    rt.block_on(make());
    Ok(())
}
