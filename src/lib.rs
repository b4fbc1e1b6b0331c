//! vtr-index: index video corpora with CLIP for text-to-video retrieval.
//!
//! The library holds every stage; the `vtr-index` binary is a thin shell over [`cli::run`].
//! See ARCHITECTURE.md for the data flow and the invariants between modules.

pub mod captions;
pub mod checksum;
pub mod cli;
pub mod decode;
pub mod encode;
pub mod encode_text;
pub mod failure;
pub mod fault;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod ingest;
pub mod interrupt;
pub mod job;
pub mod matmul;
pub mod model;
pub mod nal;
pub mod preprocess;
pub mod progress;
pub mod sampling;
pub mod score;
pub mod search;
pub mod simd;
pub mod store;
pub mod walk;
