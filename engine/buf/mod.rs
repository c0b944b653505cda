//! Memory on the data path: the fixed buffer pool and the splice pipes.

pub mod pair;
pub mod pipe;
pub mod pool;

pub use pair::HeadAndBody;
pub use pipe::PipePool;
pub use pool::{BufPool, PoolBuf, PoolError};
