//! vtr-index: index video corpora with CLIP for text-to-video retrieval.
//!
//! The library holds every stage; the `vtr-index` binary is a thin shell over [`cli::run`] (`src/main.rs`).
//! See ARCHITECTURE.md for the data flow and the invariants between modules.

pub mod captions;
pub mod checksum;
pub mod cli;
pub mod commands;
pub mod decode;
pub mod encode;
pub mod failure;
pub mod fault;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod ingest;
pub mod interrupt;
pub mod matmul;
pub mod model;
pub mod partition;
pub mod preprocess;
pub mod progress;
pub mod sampling;
pub mod score;
pub mod search_engine;
pub mod serve;
pub mod simd;
pub mod store;
pub mod text_sets;
pub mod thumbnail;
pub mod types;
pub mod walk;
