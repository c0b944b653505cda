//! A first-come, first-served queue of tasks waiting for a resource on one
//! worker (a pool buffer, an upstream connection slot).
//!
//! A waiter that gives up (its request timed out) leaves the queue when its
//! future drops, and a waiter that was woken but dropped before using the
//! wake passes it on — so no release is ever lost on a dead waiter, and a
//! release wakes exactly one task instead of the whole herd.

use std::{
    cell::RefCell,
    collections::VecDeque,
    future::Future,
    pin::Pin,
    task::{Context, Poll, Waker},
};

/// Waiting tasks, in arrival order.
#[derive(Default)]
pub struct WaitQueue {
    inner: RefCell<Queue>,
}

#[derive(Default)]
struct Queue {
    next_id: u64,
    waiters: VecDeque<(u64, Waker)>,
}

impl WaitQueue {
    /// Wakes the longest-waiting task, if any.
    pub fn wake_one(&self) {
        let w = self.inner.borrow_mut().waiters.pop_front();
        if let Some((_, w)) = w {
            w.wake();
        }
    }

    /// Tasks waiting now.
    pub fn len(&self) -> usize {
        self.inner.borrow().waiters.len()
    }

    /// True when nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when this waiter's turn comes (after a `wake_one`).
    pub fn wait(&self) -> Wait<'_> {
        Wait {
            q: self,
            id: None,
            done: false,
        }
    }
}

/// One waiter's place in a [`WaitQueue`].
pub struct Wait<'a> {
    q: &'a WaitQueue,
    id: Option<u64>,
    done: bool,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut q = self.q.inner.borrow_mut();
        match self.id {
            None => {
                let id = q.next_id;
                q.next_id += 1;
                q.waiters.push_back((id, cx.waker().clone()));
                drop(q);
                self.id = Some(id);
                Poll::Pending
            }
            Some(id) => match q.waiters.iter_mut().find(|(i, _)| *i == id) {
                Some((_, w)) => {
                    // Spurious poll: still queued.
                    if !w.will_wake(cx.waker()) {
                        *w = cx.waker().clone();
                    }
                    Poll::Pending
                }
                None => {
                    drop(q);
                    self.done = true;
                    Poll::Ready(())
                }
            },
        }
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        let Some(id) = self.id else { return };
        if self.done {
            return;
        }
        let mut q = self.q.inner.borrow_mut();
        if let Some(pos) = q.waiters.iter().position(|(i, _)| *i == id) {
            q.waiters.remove(pos);
        } else {
            // Woken but never used: hand the wake to the next in line.
            drop(q);
            self.q.wake_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        task::Wake,
    };

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn poll(w: &mut Wait<'_>, waker: &Waker) -> Poll<()> {
        Pin::new(w).poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn a_dropped_waiter_does_not_swallow_the_wake() {
        let q = WaitQueue::default();
        let c1 = Arc::new(Count(AtomicUsize::new(0)));
        let c2 = Arc::new(Count(AtomicUsize::new(0)));
        let (w1, w2) = (Waker::from(c1.clone()), Waker::from(c2.clone()));
        let mut a = q.wait();
        let mut b = q.wait();
        assert!(poll(&mut a, &w1).is_pending());
        assert!(poll(&mut b, &w2).is_pending());
        // `a` gives up before any release: the release goes to `b`.
        drop(a);
        q.wake_one();
        assert_eq!(c2.0.load(Ordering::Relaxed), 1);
        assert!(poll(&mut b, &w2).is_ready());
    }

    #[test]
    fn a_woken_waiter_that_drops_passes_the_wake_on() {
        let q = WaitQueue::default();
        let c1 = Arc::new(Count(AtomicUsize::new(0)));
        let c2 = Arc::new(Count(AtomicUsize::new(0)));
        let (w1, w2) = (Waker::from(c1.clone()), Waker::from(c2.clone()));
        let mut a = q.wait();
        let mut b = q.wait();
        assert!(poll(&mut a, &w1).is_pending());
        assert!(poll(&mut b, &w2).is_pending());
        q.wake_one();
        assert_eq!(c1.0.load(Ordering::Relaxed), 1);
        drop(a);
        assert_eq!(c2.0.load(Ordering::Relaxed), 1);
        assert!(q.is_empty());
    }
}
