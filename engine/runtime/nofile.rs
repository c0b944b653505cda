//! The open-files limit.
//!
//! Every client connection and every upstream connection is a descriptor.
//! Login shells and many containers start processes with a soft limit of
//! 1024 under a much higher hard limit; a gateway held to the soft one stops
//! accepting (`accept` fails with EMFILE) long before its buffer pool or
//! memory is used up. So at start the soft limit is raised to the hard one,
//! as nginx's `worker_rlimit_nofile` and Go's runtime do. Only the hard
//! limit (`LimitNOFILE=` in the systemd unit, `ulimit -Hn`) bounds Ringway.

use std::io;

/// The soft limit to ask for, given the current soft and hard limits and
/// the kernel's ceiling for descriptors (`fs.nr_open`); `None` when the soft
/// limit is already as high as it can go.
///
/// An unlimited hard limit cannot be the soft one for RLIMIT_NOFILE: the
/// kernel refuses more than `fs.nr_open`.
pub fn target(soft: u64, hard: u64, nr_open: u64) -> Option<u64> {
    let ceiling = if hard == libc::RLIM_INFINITY {
        nr_open
    } else {
        hard
    };
    (soft != libc::RLIM_INFINITY && soft < ceiling).then_some(ceiling)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit. Returns the limits
/// before and after (equal when nothing changed).
pub fn raise() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let Some(want) = target(lim.rlim_cur, lim.rlim_max, nr_open) else {
        return Ok((before, before));
    };
    lim.rlim_cur = want;
    // SAFETY: setrlimit reads one rlimit struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, want))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_goes_up_to_hard() {
        assert_eq!(target(1024, 524_288, 1 << 20), Some(524_288));
        assert_eq!(target(20_000, 20_000, 1 << 20), None);
        assert_eq!(target(30_000, 20_000, 1 << 20), None);
    }

    #[test]
    fn an_unlimited_hard_limit_means_the_kernel_ceiling() {
        assert_eq!(target(1024, libc::RLIM_INFINITY, 1 << 20), Some(1 << 20));
        assert_eq!(
            target(libc::RLIM_INFINITY, libc::RLIM_INFINITY, 1 << 20),
            None
        );
    }

    #[test]
    fn raising_leaves_soft_at_the_ceiling() {
        let (before, after) = raise().expect("raise");
        assert!(after >= before);
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit struct we own.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, after);
        assert!(lim.rlim_max == libc::RLIM_INFINITY || lim.rlim_cur == lim.rlim_max);
    }
}
