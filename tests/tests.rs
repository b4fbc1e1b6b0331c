//! vtr-index's integration tests: one binary, one module per boundary.
//! Fixtures come from `../shared/fixtures` (see its README for the tolerances).

mod util;

mod checkpoints;
mod cli;
mod conformance;
mod fidelity;
mod ingest;
mod interrupt;
mod nightly;
mod placement;
mod score;
mod scoring;
mod texts;
mod walk;
