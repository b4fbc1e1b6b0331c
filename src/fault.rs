//! Failure injection for the crash-safety tests: named points in the write path where a test
//! can have the process killed with `SIGKILL`, as a power cut or the OOM killer would.
//!
//! `VTR_INDEX_KILL_AT=POINT` kills the process the first time it reaches `POINT`;
//! `POINT:N` the N-th time (1-based). Points: `planned` (ingest's walk and plan done, before
//! any file is started), `decode:FILE_NAME` (a thread starting to decode
//! that file), `shard-written` (a shard synced under its temporary name), `shard-renamed`
//! (a shard renamed, before any manifest names it), `segment-written` and `segment-renamed`
//! (the same for a search segment), `manifest-written` (the new manifest
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
//! synced after a rename), `spawn` (a decode worker started, as a process limit refuses it). The
//! error is `VTR_INDEX_FAIL_WITH` (`ENOSPC`, the default, `EACCES`, `EIO` or `EAGAIN`). Every atomic write goes through these steps (`store::create_temporary`,
//! `store::sync_temporary`, `store::publish`), so a test can fail each one in turn.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

const KILL_AT: &str = "VTR_INDEX_KILL_AT";
const KILL_WITH: &str = "VTR_INDEX_KILL_WITH";
const FAIL_AT: &str = "VTR_INDEX_FAIL_AT";
const FAIL_WITH: &str = "VTR_INDEX_FAIL_WITH";
/// The variables that name this process's fault points: the ingest run's decode workers start
/// without them, so a point fires in the parent only (the workers' own faults are
/// `ingest::worker::FAULT_VARIABLE`).
pub const PARENT_ONLY_VARIABLES: [&str; 4] = [KILL_AT, KILL_WITH, FAIL_AT, FAIL_WITH];

/// `NAME[:N]` from an environment variable: fires the N-th time (1-based) NAME is reached.
struct Trigger {
    name: String,
    hit_number: u64,
    hits: AtomicU64,
}

impl Trigger {
    fn from_env(variable: &str) -> Option<Trigger> {
        let spec = std::env::var(variable).ok()?;
        let (name, hit_number) = match spec.rsplit_once(':').map(|(p, n)| (p, n.parse::<u64>())) {
            Some((name, Ok(n))) => (name.to_string(), n.max(1)),
            _ => (spec, 1),
        };
        Some(Trigger { name, hit_number, hits: AtomicU64::new(0) })
    }

    /// Counts a pass through `name`; true on the one that fires.
    fn fires(&self, name: &str) -> bool {
        self.name == name && self.hits.fetch_add(1, Ordering::SeqCst) + 1 == self.hit_number
    }
}

/// `VTR_INDEX_KILL_AT` and what to send.
struct Target {
    trigger: Trigger,
    signal: i32,
    /// Send the signal a second time once the first has been seen.
    twice: bool,
}

fn target() -> Option<&'static Target> {
    static TARGET: OnceLock<Option<Target>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let trigger = Trigger::from_env(KILL_AT)?;
            let (signal, twice) = match std::env::var(KILL_WITH).as_deref() {
                Ok("SIGINT") => (libc::SIGINT, false),
                Ok("SIGINT*2") => (libc::SIGINT, true),
                Ok("SIGTERM") => (libc::SIGTERM, false),
                _ => (libc::SIGKILL, false),
            };
            Some(Target { trigger, signal, twice })
        })
        .as_ref()
}

/// `VTR_INDEX_FAIL_AT` and the error to return.
fn io_target() -> Option<&'static (Trigger, i32)> {
    static TARGET: OnceLock<Option<(Trigger, i32)>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let trigger = Trigger::from_env(FAIL_AT)?;
            let errno = match std::env::var(FAIL_WITH).as_deref() {
                Ok("EACCES") => libc::EACCES,
                Ok("EIO") => libc::EIO,
                Ok("EAGAIN") => libc::EAGAIN,
                _ => libc::ENOSPC,
            };
            Some((trigger, errno))
        })
        .as_ref()
}

/// Fails this I/O step if a test asked for it.
pub fn io_step(step: &str) -> std::io::Result<()> {
    match io_target() {
        Some((trigger, errno)) if trigger.fires(step) => Err(std::io::Error::from_raw_os_error(*errno)),
        _ => Ok(()),
    }
}

/// Kills (or signals) the process here if a test asked for it.
pub fn point(name: &str) {
    let Some(target) = target().filter(|_| !name.is_empty()) else { return };
    if target.trigger.fires(name) {
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
