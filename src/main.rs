//! The `vtr-index` binary: parse arguments, run, map the outcome to an exit code (contract §3).

use std::process::ExitCode;

use clap::Parser;
use vtr_index::cli::{Cli, run};
use vtr_index::interrupt;

/// Every error ends as one line on stderr and exit code 1; an interrupted command that stopped
/// as asked exits 128 + the signal.
fn main() -> ExitCode {
    vtr_index::model::keep_freed_activation_memory();
    vtr_index::matmul::choose_blas_kernels();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let outcome = run(cli);
    let interrupted = interrupt::requested();
    match outcome {
        Ok(code) => ExitCode::from(interrupted.map_or(code, interrupt::exit_code)),
        // 128 + the signal promises that the finished work is committed: a command stopped as
        // asked returns its report (Ok), never an error; one that failed afterwards (a commit on
        // a full disk, say) exits 1.
        Err(e) => {
            eprintln!("vtr-index: {e:#}");
            ExitCode::from(1)
        }
    }
}
