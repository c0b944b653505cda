//! One of two futures with the same output, chosen when it is made: the size of the larger
//! in place, where a single `async` block holding both paths was laid out as their sum, and
//! where a `Box<dyn Future>` would cost an allocation per operation.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

pin_project_lite::pin_project! {
    /// The future of one of two paths (see the module documentation).
    #[project = EitherProj]
    pub enum Either<L, R> {
        Left { #[pin] f: L },
        Right { #[pin] f: R },
    }
}

impl<L: Future, R: Future<Output = L::Output>> Future for Either<L, R> {
    type Output = L::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<L::Output> {
        match self.project() {
            EitherProj::Left { f } => f.poll(cx),
            EitherProj::Right { f } => f.poll(cx),
        }
    }
}
