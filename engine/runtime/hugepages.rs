//! Transparent huge pages, off for this process.
//!
//! mimalloc asks for huge pages on its arenas (`madvise(MADV_HUGEPAGE)`), and
//! a kernel with THP set to `always` backs any large aligned region with them
//! unasked. Either way a 2 MiB page is resident once any byte of it is
//! touched, so memory spread thin (ten thousand idle connections of a few
//! hundred bytes each, pool buffers taken in a burst) costs whole huge pages:
//! measured with `benches/idle_probe.py`, 1,042 B of RSS per idle connection
//! and an 18 MB baseline with them, 500 B and 10 MB without, at the same CPU
//! per request (small64).
//!
//! The `no_thp` feature of the mimalloc crate stops its `madvise`;
//! [`disable`] covers a kernel set to `always`.

/// Asks the kernel not to back this process's memory with transparent huge
/// pages (`PR_SET_THP_DISABLE`, Linux 3.15+). Returns the error when it refuses.
pub fn disable() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes integers only and changes a
    // flag of this process's memory map.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    /// After the call the kernel reports the process's huge pages as off.
    #[test]
    fn the_flag_is_set() {
        assert!(super::disable().is_ok());
        // SAFETY: PR_GET_THP_DISABLE takes no pointers and reads a flag of this process.
        let flag = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(flag, 1);
    }
}
