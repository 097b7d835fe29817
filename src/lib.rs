//! likeness: a similarity-learning daemon. It embeds inputs with ONNX Siamese/triplet
//! towers (ONNX Runtime, dynamic batching), keeps labelled embedding vectors durably,
//! answers nearest-neighbour, identification and verification queries over gRPC (with
//! pair models that score two inputs together for verification and re-ranking), and
//! (as it grows) streams hard negatives to training jobs.
//!
//! # Layout
//! - [`config`]: flags + env + TOML -> one validated [`Config`]; [`Config::core`] gives
//!   the core its own [`collections::Settings`].
//! - [`error`]: the crate [`Error`] with typed field paths, free of tonic.
//! - [`types`]: domain types (metrics, items, queries, filters, hits), free of gRPC.
//! - [`store`]: sled: collection specs, item records, raw inputs, group commit, codecs.
//! - [`index`]: usearch HNSW per collection; the snapshot format; reachability sweeps.
//! - [`collections`]: the registry joining store and index; one collection, the ordered
//!   write path and stream transactions, the catalogue with its label index, search and
//!   the batched kNN the miner reads through; recovery; validation.
//! - [`judge`]: classify, verify, calibrate, re-rank with a pair model.
//! - [`mine`]: hard-negative mining; so far its strategies, as plain functions.
//! - [`embed`]: the [`embed::Embedder`] trait and its handle; ONNX Runtime models
//!   (embedders and pair models): manifests, image preprocessing, dynamic batching;
//!   models published at run time, kept under the data dir; a fake embedder for tests.
//! - [`app`]: the application facade that handlers and the miner call: embedding,
//!   inputs kept, re-ranking, verification across collections and models.
//! - [`activation`]: Models.Activate, a collection re-embedded with another model in
//!   the background into a new generation, then switched to at once.
//! - [`pool`]: the fixed thread pool that runs searches, with admission control.
//! - [`memory`]: glibc's malloc arenas limited, and free memory given back when quiet.
//! - [`grpc`]: tonic services (convert -> app -> convert), the one Error -> Status map,
//!   health (also alone on a plaintext port), reflection, TLS with certificates reloaded
//!   in place, bearer tokens with a read/write table of every method, [`serve`] and its
//!   embed-only mode (Embedder and Models, no store).
//! - [`cli`]: the client subcommands.
//! - [`rng`], [`synth`]: a seedable PRNG; synthetic data for tests and benchmarks.
//!
//! Only `grpc` knows about tonic (`grpc::client` gives the `cli` client its channel). The benchmark harness is a
//! binary of its own (`likeness-bench`), outside the library and the daemon.

pub mod activation;
pub mod app;
pub mod cli;
pub mod collections;
pub mod config;
pub mod daemon;
pub mod embed;
pub mod error;
pub mod exporter;
pub mod grpc;
pub mod index;
pub mod judge;
pub mod memory;
pub mod metrics;
pub mod mine;
pub mod pool;
pub mod rng;
pub mod store;
pub mod synth;
pub mod types;

pub use config::Config;
pub use daemon::{ServeOptions, serve, serve_with};
pub use error::{Error, Result};
pub use grpc::Reloader;
