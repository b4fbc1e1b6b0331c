//! vtr-index's integration tests: one binary, one module per boundary.
//! Fixtures come from `tests/fixtures/` (its README says how each was made); the tolerances are
//! those of `docs/contract.md` §6, defined once in `tolerance.rs`.

mod tolerance;
mod util;

mod architecture;
mod browser;
mod checkpoints;
mod cli;
mod conformance;
mod explorer;
mod fidelity;
mod heads;
mod ingest;
mod interrupt;
mod kubernetes;
mod nightly;
mod placement;
mod score;
mod score_cases;
mod search;
mod serve;
mod shards;
mod slurm;
mod texts;
mod walk;
mod workers;
