//! Failure injection for the crash-safety tests: named points in the write path where a test
//! can have the process killed with `SIGKILL`, as a power cut or the OOM killer would.
//!
//! `VTR_INDEX_KILL_AT=POINT` kills the process the first time it reaches `POINT`;
//! `POINT:N` the N-th time (1-based). Points: `decode:FILE_NAME` (a decode worker starting on
//! that file), `shard-written` (a shard synced under its temporary name), `shard-renamed`
//! (a shard renamed, before any manifest names it), `manifest-written` (the new manifest
//! synced under its temporary name, before the rename), `committed` (just after a commit).
//! Unset, every check is one relaxed atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Target {
    point: String,
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
            Some(Target { point, hit_number, hits: AtomicU64::new(0) })
        })
        .as_ref()
}

/// Kills the process here if a test asked for it.
pub fn point(name: &str) {
    let Some(target) = target().filter(|_| !name.is_empty()) else { return };
    if target.point == name && target.hits.fetch_add(1, Ordering::SeqCst) + 1 == target.hit_number {
        // SAFETY: raising a signal at our own process touches no memory.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
