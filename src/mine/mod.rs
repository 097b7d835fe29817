//! Hard-negative mining over a whole collection, streamed to training jobs.
//!
//! - [`strategy`]: the strategies of docs/mining.md as plain functions over distances.
//! - [`spec`]: a mining request, validated, with its defaults.
//! - [`job`]: mining a chunk of anchors: positives from the label index, negatives from
//!   the batched kNN, the strategy's choice, ids and items resolved.
//! - [`batches`]: P x K batches of neighbouring classes for an in-batch miner.
//! - [`stream`]: the job that orders the anchors, mines batch by batch on the search
//!   pool and hands batches over a channel of a few slots (flow control,
//!   cancellation), and the Session loop.

pub mod batches;
pub mod job;
pub mod spec;
pub mod strategy;
pub mod stream;

pub use batches::{BatchSpec, ClassBatch, RawBatchSpec};
pub use job::{MinedItem, Mode, Pair, Stats, Triplet};
pub use spec::{Anchors, MineSpec, RawSpec, Shard, Strategy};
pub use stream::{Batch, Counters, Miner, Step, StepAnchor};
