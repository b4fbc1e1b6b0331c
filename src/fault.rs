//! Failure injection for the crash-safety tests: named points in the write path where a test
//! can have the process killed with `SIGKILL`, as a power cut or the OOM killer would.
//!
//! `VTR_INDEX_KILL_AT=POINT` kills the process the first time it reaches `POINT`;
//! `POINT:N` the N-th time (1-based). Points: `planned` (ingest's walk and plan done, before
//! any file is started), `decode:FILE_NAME` (a decode worker starting on
//! that file), `shard-written` (a shard synced under its temporary name), `shard-renamed`
//! (a shard renamed, before any manifest names it), `manifest-written` (the new manifest
//! synced under its temporary name, before the rename), `committed` (just after a commit),
//! `encode` (a model batch of ingest or encode-text starting), `scored` (score done, outputs
//! not yet published). `VTR_INDEX_KILL_WITH=SIGINT|SIGTERM` sends that
//! signal instead, as Ctrl-C or a scheduler would, and the process goes on to handle it;
//! `SIGINT*2` sends a second SIGINT once the first has been seen (a user pressing Ctrl-C
//! twice), and the point then waits for the process to end.
//! Unset, every check is one relaxed atomic load.
//!
//! `VTR_INDEX_FAIL_AT=STEP[:N]` makes the N-th I/O step of that kind fail instead, as a full
//! disk or a revoked permission would: `write` (a temporary file created), `sync` (a finished
//! temporary file synced), `rename` (a temporary renamed into place), `sync-dir` (a folder
//! synced after a rename). The error is `VTR_INDEX_FAIL_WITH` (`ENOSPC`, the default, `EACCES`
//! or `EIO`). Every atomic write goes through these steps (`store::create_temporary`,
//! `store::sync_temporary`, `store::publish`), so a test can fail each one in turn.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Target {
    point: String,
    signal: i32,
    /// Send the signal a second time once the first has been seen.
    twice: bool,
    hit_number: u64,
    hits: AtomicU64,
}

fn target() -> Option<&'static Target> {
    static TARGET: OnceLock<Option<Target>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let spec = std::env::var("VTR_INDEX_KILL_AT").ok()?;
            let (point, hit_number) = match spec.rsplit_once(':').map(|(p, n)| (p, n.parse::<u64>())) {
                Some((point, Ok(n))) => (point.to_string(), n.max(1)),
                _ => (spec, 1),
            };
            let (signal, twice) = match std::env::var("VTR_INDEX_KILL_WITH").as_deref() {
                Ok("SIGINT") => (libc::SIGINT, false),
                Ok("SIGINT*2") => (libc::SIGINT, true),
                Ok("SIGTERM") => (libc::SIGTERM, false),
                _ => (libc::SIGKILL, false),
            };
            Some(Target { point, signal, twice, hit_number, hits: AtomicU64::new(0) })
        })
        .as_ref()
}

struct IoTarget {
    step: String,
    errno: i32,
    hit_number: u64,
    hits: AtomicU64,
}

fn io_target() -> Option<&'static IoTarget> {
    static TARGET: OnceLock<Option<IoTarget>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let spec = std::env::var("VTR_INDEX_FAIL_AT").ok()?;
            let (step, hit_number) = match spec.rsplit_once(':').map(|(p, n)| (p, n.parse::<u64>())) {
                Some((step, Ok(n))) => (step.to_string(), n.max(1)),
                _ => (spec, 1),
            };
            let errno = match std::env::var("VTR_INDEX_FAIL_WITH").as_deref() {
                Ok("EACCES") => libc::EACCES,
                Ok("EIO") => libc::EIO,
                _ => libc::ENOSPC,
            };
            Some(IoTarget { step, errno, hit_number, hits: AtomicU64::new(0) })
        })
        .as_ref()
}

/// Fails this I/O step if a test asked for it.
pub fn io_step(step: &str) -> std::io::Result<()> {
    match io_target() {
        Some(target) if target.step == step && target.hits.fetch_add(1, Ordering::SeqCst) + 1 == target.hit_number => {
            Err(std::io::Error::from_raw_os_error(target.errno))
        }
        _ => Ok(()),
    }
}

/// Kills (or signals) the process here if a test asked for it.
pub fn point(name: &str) {
    let Some(target) = target().filter(|_| !name.is_empty()) else { return };
    if target.point == name && target.hits.fetch_add(1, Ordering::SeqCst) + 1 == target.hit_number {
        // SAFETY: raising a signal at our own process touches no memory.
        unsafe {
            libc::kill(libc::getpid(), target.signal);
        }
        // Goes on only once the signal thread has seen it, so a test knows where the process
        // was when the interruption took effect.
        let waited = std::time::Instant::now();
        while crate::interrupt::requested().is_none() && waited.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if target.twice {
            // SAFETY: as above. The signal thread now ends the process.
            unsafe {
                libc::kill(libc::getpid(), target.signal);
            }
            loop {
                std::thread::park();
            }
        }
    }
}
