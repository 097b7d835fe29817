//! The integration tests, one binary (as ripgrep keeps them): real servers on
//! 127.0.0.1:0 with temp dirs, the real ONNX Runtime where the model is the point.
//! One binary links once, and its tests share `common`'s helpers.

mod common;

mod api;
mod backup;
mod bad_input;
mod cli;
mod crash;
mod deploy;
mod embed;
mod embed_only;
mod engine;
mod expansion;
mod identify;
mod layers;
mod lifecycle;
mod manifest;
mod metrics;
mod mine;
mod mine_engine;
mod pair;
mod reach;
mod recall;
mod recovery;
mod security;
mod shapes;
mod storage_errors;
mod streams;
