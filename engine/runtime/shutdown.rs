//! Signals: SIGHUP reloads, SIGUSR1 reopens the access log, and
//! graceful drain: SIGTERM or SIGINT stops the listeners, closes idle
//! connections, lets requests in flight finish (up to `drain_timeout`), and
//! the process exits 0. A second signal exits at once.
//!
//! Signals are blocked in every thread and taken synchronously by one
//! thread with `sigwait`, so no handler runs on a worker.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    task::{Context, Poll, Waker},
};

use crate::log;

static DRAINING: AtomicBool = AtomicBool::new(false);
static WAITERS: Mutex<Vec<Waker>> = Mutex::new(Vec::new());

/// Whether the process is draining.
pub fn is_draining() -> bool {
    DRAINING.load(Ordering::Relaxed)
}

/// Starts the drain: every [`Drain`] future resolves.
pub fn trigger() {
    if DRAINING.swap(true, Ordering::SeqCst) {
        return;
    }
    let wakers = match WAITERS.lock() {
        Ok(mut w) => std::mem::take(&mut *w),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    };
    for w in wakers {
        w.wake();
    }
}

/// Resolves when the drain starts.
pub struct Drain {
    registered: bool,
}

/// A future that resolves when the drain starts.
pub fn drained() -> Drain {
    Drain { registered: false }
}

impl Future for Drain {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if is_draining() {
            return Poll::Ready(());
        }
        if !self.registered {
            // Registered once: wakers of a task stay valid across polls, and
            // the list is emptied only by `trigger`.
            if let Ok(mut w) = WAITERS.lock() {
                w.push(cx.waker().clone());
            }
            self.registered = true;
            // The flag may have been set between the check and the push.
            if is_draining() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and every thread it
/// starts afterwards) and starts the thread that waits for them.
pub fn install_signal_thread() -> std::io::Result<()> {
    // SAFETY: plain libc signal-set calls on a zeroed, local sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::Builder::new()
        .name("ringway-signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid sigset_t; sigwait writes one int.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                continue;
            }
            match sig {
                libc::SIGTERM | libc::SIGINT => {
                    if is_draining() {
                        log::warn("second signal: exiting now");
                        std::process::exit(1);
                    }
                    log::info("draining: listeners closed, waiting for requests in flight");
                    trigger();
                }
                libc::SIGUSR1 => crate::accesslog::request_reopen(),
                libc::SIGHUP => {
                    // Reload off this thread's loop would gain nothing: it is
                    // the only thing it does, and it never touches a worker.
                    let _ = crate::reload::reload();
                }
                _ => {}
            }
        })
        .map(drop)
}
