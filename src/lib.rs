//! likeness: a similarity-learning daemon. It embeds inputs with ONNX Siamese/triplet
//! towers (ONNX Runtime, dynamic batching), keeps labelled embedding vectors durably,
//! answers nearest-neighbour, identification and verification queries over gRPC (with
//! pair models that score two inputs together for verification and re-ranking), and
//! (as it grows) streams hard negatives to training jobs.
//!
//! # Layout
//! - [`config`]: flags + env + TOML -> one validated [`Config`].
//! - [`error`]: the crate [`Error`]; the one place errors become gRPC statuses.
//! - [`types`]: domain types (metrics, items, filters, hits), free of gRPC.
//! - [`store`]: sled: collection specs, item records, group commit.
//! - [`index`]: usearch HNSW per collection, snapshots.
//! - [`pool`]: the fixed thread pool that runs searches, with admission control.
//! - [`embed`]: ONNX Runtime models (embedders and pair models): manifests (TOML or ONNX
//!   metadata), image preprocessing, dynamic batching by input shape.
//! - [`db`]: the collections registry joining store and index; recovery; validation.
//! - [`grpc`]: tonic services (thin handlers), health, reflection, [`serve`].
//! - [`cli`]: the client subcommands and `likeness bench`.
//! - [`synth`]: deterministic synthetic data for tests and benchmarks.
//!
//! Only `grpc` and `error` know about tonic.

pub mod cli;
pub mod config;
pub mod db;
pub mod embed;
pub mod error;
pub mod grpc;
pub mod index;
pub mod pool;
pub mod store;
pub mod synth;
pub mod types;

/// The generated protobuf types and gRPC stubs of `likeness.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("likeness.v1");
}

pub use config::Config;
pub use error::{Error, Result};
pub use grpc::serve;
