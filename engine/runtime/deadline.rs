//! Coarse per-worker deadlines for connection timeouts.
//!
//! monoio's timer entry is 640 bytes, and every idle keep-alive connection
//! waits under a timeout: with it, an idle connection's task costs over a
//! kilobyte. Here a deadline is a 40-byte future registered in a ring of
//! buckets that one ticker task per worker fires every [`TICK`]; a timeout
//! therefore fires up to one tick late, which is fine for header, keep-alive,
//! body and response timeouts (configured in seconds).
//!
//! Registrations are removed when their future drops, so a connection that
//! serves a million requests leaves nothing behind in the ring.

use std::{
    cell::{Cell, RefCell},
    future::Future,
    num::NonZeroU64,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

/// Resolution of every deadline.
pub const TICK: Duration = Duration::from_millis(TICK_MS);

/// [`TICK`] in milliseconds.
const TICK_MS: u64 = 100;

/// [`TICK`] in nanoseconds.
const TICK_NS: u64 = TICK_MS * 1_000_000;

/// Buckets in the ring: deadlines further out than this many ticks park in
/// the last bucket and re-register when it fires.
const SLOTS: u64 = 128;

struct Bucket {
    wakers: Vec<Option<Waker>>,
    free: Vec<u32>,
    /// Bumped each time the bucket fires, invalidating its registrations (never zero, so a
    /// registration key has a niche and an idle connection's deadline stays small).
    epoch: NonZeroU64,
}

struct Wheel {
    /// Set once the process drains: idle waits resolve at once.
    draining: Cell<bool>,
    start: Instant,
    /// Ticks fired so far.
    now: Cell<u64>,
    /// The turn clock's last reading and its nanoseconds since `start`: a turn arms several
    /// deadlines, and an `Instant` subtraction costs more than comparing two.
    since_start: Cell<(Instant, u64)>,
    buckets: RefCell<Vec<Bucket>>,
}

impl Wheel {
    /// Nanoseconds from `start` to the turn clock's now (see `since_start`).
    fn nanos_now(&self) -> u64 {
        let now = super::clock::now();
        let (at, ns) = self.since_start.get();
        if at == now {
            return ns;
        }
        // u64 nanoseconds last 584 years.
        let ns = now.saturating_duration_since(self.start).as_nanos() as u64;
        self.since_start.set((now, ns));
        ns
    }
}

thread_local! {
    static WHEEL: RefCell<Option<Rc<Wheel>>> = const { RefCell::new(None) };
}

/// Installs this thread's wheel and returns the ticker to spawn on its runtime.
pub fn install() -> impl Future<Output = ()> {
    let start = Instant::now();
    let wheel = Rc::new(Wheel {
        draining: Cell::new(false),
        start,
        now: Cell::new(0),
        since_start: Cell::new((start, 0)),
        buckets: RefCell::new(
            (0..SLOTS)
                .map(|_| Bucket {
                    wakers: Vec::new(),
                    free: Vec::new(),
                    epoch: NonZeroU64::MIN,
                })
                .collect(),
        ),
    });
    WHEEL.with(|w| *w.borrow_mut() = Some(wheel.clone()));
    async move {
        loop {
            // Woken at the tick boundaries themselves: sleeping a TICK after each wake
            // drifted by every wake's lateness, so a deadline fired up to a further tick late.
            let next = wheel.now.get().saturating_add(1);
            let at = wheel.start + Duration::from_millis(next.saturating_mul(TICK_MS));
            monoio::time::sleep_until(monoio::time::Instant::from_std(at)).await;
            if !wheel.draining.get() && super::shutdown::is_draining() {
                // Wake every waiter: idle ones see the flag and give up.
                wheel.draining.set(true);
                for t in 0..SLOTS {
                    fire(&wheel, t);
                }
            }
            // Catch up on ticks missed while the worker was busy.
            // At least the tick slept for: the turn clock may have been read just before it.
            let target = (super::clock::since(wheel.start).as_millis() / TICK.as_millis()) as u64;
            let target = target.max(next);
            while wheel.now.get() < target {
                let t = wheel.now.get() + 1;
                wheel.now.set(t);
                fire(&wheel, t);
            }
        }
    }
}

fn fire(wheel: &Wheel, tick: u64) {
    let wakers: Vec<Waker> = {
        let mut buckets = wheel.buckets.borrow_mut();
        let b = &mut buckets[(tick % SLOTS) as usize];
        b.epoch = b.epoch.saturating_add(1);
        b.free.clear();
        b.wakers.drain(..).flatten().collect()
    };
    for w in wakers {
        w.wake();
    }
}

fn wheel() -> Option<Rc<Wheel>> {
    WHEEL.with(|w| w.borrow().clone())
}

/// Resolves once `after` has passed (to within one tick).
pub struct Expire {
    wheel: Option<Rc<Wheel>>,
    due: u64,
    /// An idle wait: it also resolves when the worker drains.
    idle: bool,
    /// Where the waker is registered: bucket, slot, the bucket's epoch then.
    key: Option<(u32, u32, NonZeroU64)>,
}

impl Expire {
    /// A deadline `after` from now. Without a wheel on this thread (no
    /// worker runtime) it never fires.
    pub fn after(after: Duration) -> Self {
        let wheel = wheel();
        let due = match &wheel {
            Some(w) => {
                // The first tick at or after the real deadline: tick `t`
                // fires once `start.elapsed() >= t * TICK`, so the deadline
                // is early by at most the time this turn has run (the clock
                // is read once per turn). Counting from `now`, the last tick
                // fired, was up to one tick early when called late in a tick.
                let after = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
                let due = w.nanos_now().saturating_add(after).div_ceil(TICK_NS);
                due.max(w.now.get() + 1)
            }
            None => u64::MAX,
        };
        Self {
            wheel,
            due,
            idle: false,
            key: None,
        }
    }

    fn unregister(&mut self) {
        if let (Some(w), Some((b, slot, epoch))) = (&self.wheel, self.key.take()) {
            let mut buckets = w.buckets.borrow_mut();
            let bucket = &mut buckets[b as usize];
            if bucket.epoch == epoch {
                bucket.wakers[slot as usize] = None;
                bucket.free.push(slot);
            }
        }
    }
}

impl Future for Expire {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(wheel) = self.wheel.clone() else {
            return Poll::Pending;
        };
        let now = wheel.now.get();
        if now >= self.due || (self.idle && wheel.draining.get()) {
            self.unregister();
            return Poll::Ready(());
        }
        let mut buckets = wheel.buckets.borrow_mut();
        if let Some((b, slot, epoch)) = self.key {
            let bucket = &mut buckets[b as usize];
            if bucket.epoch == epoch {
                // Still registered: refresh the waker only if it changed.
                let entry = &mut bucket.wakers[slot as usize];
                if !entry.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *entry = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
        }
        let ahead = (self.due - now).min(SLOTS - 1);
        // `SLOTS` is small: the bucket index fits in a u32.
        let b = ((now + ahead) % SLOTS) as u32;
        let bucket = &mut buckets[b as usize];
        let slot = match bucket.free.pop() {
            Some(s) => {
                bucket.wakers[s as usize] = Some(cx.waker().clone());
                s
            }
            None => {
                bucket.wakers.push(Some(cx.waker().clone()));
                (bucket.wakers.len() - 1) as u32
            }
        };
        let epoch = bucket.epoch;
        drop(buckets);
        self.key = Some((b, slot, epoch));
        Poll::Pending
    }
}

impl Drop for Expire {
    fn drop(&mut self) {
        self.unregister();
    }
}

/// `fut` ran past its deadline (it was dropped, cancelling its operation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

pin_project_lite::pin_project! {
    /// `fut`, abandoned at a deadline.
    pub struct Timeout<F> {
        #[pin]
        fut: F,
        #[pin]
        expire: Expire,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match this.expire.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Runs `fut` for at most `limit` (to within one tick).
pub fn timeout<F: Future>(limit: Duration, fut: F) -> Timeout<F> {
    Timeout {
        fut,
        expire: Expire::after(limit),
    }
}

/// Like [`timeout`], for waits on an idle connection: these also end when
/// the process starts draining, so idle keep-alives close promptly.
pub fn idle_timeout<F: Future>(limit: Duration, fut: F) -> Timeout<F> {
    let mut expire = Expire::after(limit);
    expire.idle = true;
    Timeout { fut, expire }
}

/// Runs `fut` until `deadline` (to within one tick).
pub fn timeout_at<F: Future>(deadline: Instant, fut: F) -> Timeout<F> {
    timeout(deadline.saturating_duration_since(super::clock::now()), fut)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use monoio::{LegacyDriver, RuntimeBuilder};

    /// Runs `f` to its end on a test runtime (legacy driver, timers) with this thread's
    /// deadline wheel ticking.
    pub(crate) fn run<F: Future>(f: F) -> F::Output {
        let mut rt = RuntimeBuilder::<LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        rt.block_on(async {
            monoio::spawn(install());
            f.await
        })
    }

    /// Starts a timeout of `limit` at each of `offsets` (ms, after the previous one ended),
    /// and checks that it ends no sooner than `limit` and before `most`.
    async fn timeouts_end_between(limit: Duration, most: Duration, offsets: &[u64]) {
        for &offset_ms in offsets {
            monoio::time::sleep(Duration::from_millis(offset_ms)).await;
            let t0 = Instant::now();
            let res = timeout(limit, std::future::pending::<()>()).await;
            let took = t0.elapsed();
            assert_eq!(res, Err(Elapsed));
            assert!(took >= limit, "fired after {took:?}, limit {limit:?}");
            assert!(took < most, "fired after {took:?}, at most {most:?}");
        }
    }

    /// A timeout started anywhere within a tick never ends before its limit
    /// (and ends within about a tick after it).
    #[test]
    fn a_timeout_never_fires_early() {
        let limit = Duration::from_millis(200);
        run(timeouts_end_between(
            limit,
            limit + 4 * TICK,
            &[0, 25, 50, 75, 95],
        ));
    }

    /// The ticks stay on their boundaries after turns that ran late: a short timeout ends
    /// within a tick of its limit (the early watch's 50 ms relies on it), where a ticker
    /// that slept a tick after each late wake had drifted by the delays.
    #[test]
    fn ticks_stay_on_their_boundaries_after_late_turns() {
        run(async {
            for _ in 0..10 {
                monoio::time::sleep(TICK).await;
                // The worker's turn runs 35 ms: the ticker's wake waits behind it.
                std::thread::sleep(Duration::from_millis(35));
            }
            let limit = Duration::from_millis(50);
            let most = limit + TICK + Duration::from_millis(40);
            timeouts_end_between(limit, most, &[0, 30, 60, 90]).await;
        });
    }
}
