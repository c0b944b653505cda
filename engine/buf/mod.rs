//! Memory on the data path: the fixed buffer pool and the splice pipes.

pub mod pair;
pub mod pipe;
pub mod pool;
pub mod ring;

pub use pair::HeadAndBody;
pub use pipe::PipePool;
pub use pool::{BufPool, PoolBuf, PoolError};
pub use ring::{Received, RecvRing, RingRecv};
