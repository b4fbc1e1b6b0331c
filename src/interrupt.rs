//! Interruptions: SIGINT (Ctrl-C) and SIGTERM (what Slurm sends at a job's time limit and
//! Kubernetes at a pod's termination, each followed by SIGKILL after a grace period of 30 s
//! by default). The only module that handles signals; it depends on no other module of the
//! crate: what other modules need done on a signal they register here ([`on_signal_call`],
//! [`remove_temporaries_in`]).
//!
//! A thread of its own receives both signals (signal-hook), so the work done on a signal is
//! ordinary code, not a handler's. What it does depends on the command running:
//!
//! - [`Policy::Finish`] (ingest, encode-text): the first signal marks the crash journals as
//!   interrupted (so nothing that follows blames a file) and sets a flag the command polls: it
//!   stops taking new work, finishes or drops what is in flight, commits what is complete and
//!   exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM). A second signal
//!   exits at once; the next run continues from the last commit.
//! - [`Policy::Abandon`] (score): the first signal waits for a publication of outputs in progress
//!   ([`publishing`]), removes this process's temporary files in the registered output folders,
//!   and exits at once, so an output folder holds all of the old outputs or all of the new.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, Once};

use signal_hook::consts::{SIGINT, SIGTERM};

/// What the running command does when interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Finish = 1,
    Abandon = 2,
}

/// The first signal received, 0 until one is.
static RECEIVED: AtomicI32 = AtomicI32::new(0);
static POLICY: AtomicU8 = AtomicU8::new(Policy::Finish as u8);
/// Held while outputs are renamed into place; an abandoning exit waits for it.
static PUBLISHING: Mutex<()> = Mutex::new(());
/// Folders whose temporary files an abandoning exit removes, each with the test of a name
/// that is this process's temporary.
static OUTPUT_FOLDERS: Mutex<Vec<(PathBuf, NameTest)>> = Mutex::new(Vec::new());

/// Whether a file name is one of this process's temporaries.
type NameTest = fn(&str) -> bool;
/// Called on every signal, before anything else is done about it.
static ON_SIGNAL: Mutex<Vec<fn()>> = Mutex::new(Vec::new());

/// Handles SIGINT and SIGTERM from now on, as `policy` says (the latest call wins, so each
/// step of a job sets its own).
pub fn install(policy: Policy) {
    POLICY.store(policy as u8, Ordering::SeqCst);
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
            Ok(signals) => signals,
            Err(e) => {
                eprintln!("vtr-index: warning: cannot handle SIGINT/SIGTERM ({e}); an interruption will lose work");
                return;
            }
        };
        let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
            for signal in signals.forever() {
                on_signal(signal);
            }
        });
        if let Err(e) = spawned {
            eprintln!("vtr-index: warning: cannot start the signal thread ({e})");
        }
    });
}

fn on_signal(signal: i32) {
    let first = RECEIVED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst).is_ok();
    for action in ON_SIGNAL.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        action();
    }
    let finishing = POLICY.load(Ordering::SeqCst) == Policy::Finish as u8;
    if first && finishing {
        eprintln!(
            "vtr-index: {}: finishing the files in flight and committing the work done; interrupt again to stop at once",
            signal_name(signal)
        );
        return;
    }
    if finishing {
        eprintln!(
            "vtr-index: {}: stopped at once; the index is as of its last commit, and a re-run continues from there",
            signal_name(signal)
        );
    } else {
        // Outputs being renamed into place are all renamed first.
        let _publishing = PUBLISHING.lock().unwrap_or_else(|e| e.into_inner());
        remove_temporaries();
        eprintln!("vtr-index: {}: stopped; no partial output was left", signal_name(signal));
    }
    // `_exit`, not `exit`: other threads (GStreamer's, BLAS's, CUDA's) are still running, and
    // the exit handlers and destructors `exit` runs could crash or hang under them. stderr is
    // unbuffered, so every message above is out.
    // SAFETY: `_exit` ends the process at once; it touches no state of this program.
    unsafe { libc::_exit(exit_code(signal).into()) }
}

/// The signal that interrupted this process, if one has.
pub fn requested() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// Whether the process was interrupted (for callers that take a plain `fn() -> bool`).
pub fn was_requested() -> bool {
    requested().is_some()
}

/// 128 + the signal's number, as a shell reports a process killed by it.
pub fn exit_code(signal: i32) -> u8 {
    (128 + signal).clamp(0, 255) as u8
}

/// A signal's name, as `kill -l` spells it (for the two this module handles, and the ones a
/// crashing decode worker dies of).
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        libc::SIGABRT => "SIGABRT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGSYS => "SIGSYS",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGHUP => "SIGHUP",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => "a signal",
    }
}

/// Registers an action for every signal from now on (once per function, however often called).
pub fn on_signal_call(action: fn()) {
    let mut actions = ON_SIGNAL.lock().unwrap_or_else(|e| e.into_inner());
    if !actions.iter().any(|&f| std::ptr::fn_addr_eq(f, action)) {
        actions.push(action);
    }
}

/// Registers a folder whose temporary outputs (the names `is_ours` accepts) an abandoning exit
/// removes.
pub fn remove_temporaries_in(folder: &Path, is_ours: NameTest) {
    OUTPUT_FOLDERS.lock().unwrap_or_else(|e| e.into_inner()).push((folder.to_path_buf(), is_ours));
}

/// Held while outputs are renamed into place: an interruption waits until they all are. Once
/// the process is being abandoned, it never returns (the signal thread is about to exit), so
/// nothing new is published after the signal.
pub fn publishing() -> MutexGuard<'static, ()> {
    let guard = PUBLISHING.lock().unwrap_or_else(|e| e.into_inner());
    if requested().is_some() && POLICY.load(Ordering::SeqCst) == Policy::Abandon as u8 {
        drop(guard);
        loop {
            std::thread::park();
        }
    }
    guard
}

fn remove_temporaries() {
    for (folder, is_ours) in OUTPUT_FOLDERS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let Ok(entries) = std::fs::read_dir(folder) else { continue };
        for entry in entries.flatten() {
            if is_ours(&entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}
