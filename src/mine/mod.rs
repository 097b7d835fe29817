//! Hard-negative mining (work in progress: the strategies are here; the Miner service
//! that streams them, built on the collections' read view, is not yet).
//!
//! - [`strategy`]: the strategies of ../shared/MINING.md as plain functions over
//!   distances.

pub mod strategy;
