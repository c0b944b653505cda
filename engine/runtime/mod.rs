//! Workers: one pinned thread per core, each running its own monoio runtime
//! with its own listeners, buffer pool, pipes and upstream pools.

mod accept;
pub mod alloc;
pub mod clock;
pub mod deadline;
pub mod driver;
pub mod either;
pub mod hugepages;
pub mod listen;
pub mod nofile;
pub mod shutdown;
pub mod waitq;
pub mod worker;

pub use worker::{current, publish, Generation, Shared, Worker};
