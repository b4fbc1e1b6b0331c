//! vtr-index's integration tests: one binary, one module per boundary.
//! Fixtures come from `../shared/fixtures` (see its README for the tolerances).

mod util;

mod cli;
mod fidelity;
mod ingest;
mod score;
mod texts;
