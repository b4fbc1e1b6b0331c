//! The decode workers of one ingest run, seen from the parent: starting them, watching them,
//! and what a worker's death, hang or bloat costs (one file, never the run).
//!
//! Workers are processes of this binary (`ingest/worker.rs`), started through
//! `/proc/self/exe` by one thread that lives as long as the pool (`PR_SET_PDEATHSIG` follows
//! the thread that started a process, not the process), with `posix_spawn`, so a model-sized
//! parent is never forked. Each decode slot keeps its worker across files. A watchdog thread
//! reads every worker's resident memory and CPU time every [`WATCH_EVERY`] and kills (SIGKILL)
//! a worker over `--decode-memory-mib`, one past its file's deadline plus [`grace`], and
//! every busy worker once the run is stopping (a signal, a broken decoder). A worker that dies
//! on its own while holding a file has the file tried once more, alone, in a fresh worker; if
//! that one dies too the file is a `crashed_decoder` failure, and [`CRASHES_IN_A_ROW`] such
//! files in a row stop the run (a broken plugin, not bad files).

use std::io;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use super::process::{
    LIVE_WORKERS_CPU_TICKS, Worker, cpu_ticks, how_it_ended, resident_bytes, start_error, start_worker,
    wait_without_reaping,
};
use super::worker::{self, Prepared, Setup};
use crate::failure::{FailureKind, Rejection, Stage};
use crate::walk::VideoFile;

/// `--decode-memory-mib`'s default: decoding a 4K file (H.264 or HEVC with a full picture
/// buffer, AV1 with dav1d's frame threads) and holding its 12 sampled frames in RGB stays below.
pub const DEFAULT_DECODE_MEMORY_MIB: u64 = 4096;
/// How long past a file's `--decode-timeout` the parent waits before it kills the worker, at
/// least: the worker's own deadline covers decoding, and it answers with its precise message.
pub const KILL_GRACE: Duration = Duration::from_secs(10);
/// The slowest reading the grace allows for: after decoding, the worker still hashes the whole
/// file, which takes a while for a large one.
const HASH_BYTES_PER_S: u64 = 50 << 20;

/// How long past `--decode-timeout` a worker may take over a file of `size_bytes`.
pub fn grace(size_bytes: u64) -> Duration {
    KILL_GRACE + Duration::from_secs(size_bytes / HASH_BYTES_PER_S)
}
/// How often the watchdog reads each worker's memory and checks the deadlines.
pub const WATCH_EVERY: Duration = Duration::from_millis(25);
/// This many files in a row whose workers die on both tries stop the run: a decoder that
/// kills every worker is a broken installation, and quarantining the corpus would hide it.
pub const CRASHES_IN_A_ROW: usize = 5;

/// Locks a mutex whose holder may have panicked (which fails the run anyway).
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why the parent killed a worker.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kill {
    Memory {
        resident_bytes: u64,
    },
    /// Past its answer's deadline, which allowed this long.
    Deadline {
        allowed: Duration,
    },
    /// The run is stopping: its file is cut short, not failed.
    Stopping,
}

/// A live worker as the watchdog sees it. Registered while the process is not yet reaped, so
/// its pid cannot have been reused when the watchdog kills it.
struct Watched {
    pid: i32,
    /// While it holds a file: when its answer is due, and how long that allowed.
    answer_due: Option<(Instant, Duration)>,
    killed: Option<Kill>,
    cpu_ticks: u64,
}

impl Watched {
    /// SIGKILL, recording why: the first reason is the one its file's outcome follows.
    fn kill(&mut self, why: Kill) {
        // SAFETY: the pid is our unreaped child's (it stays registered until reaped).
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
        self.killed = Some(why);
    }
}

#[derive(Default)]
struct SlotWatch {
    worker: Option<Watched>,
    peak_resident_bytes: u64,
}

/// What the workers did, as the run report gives it (`decode_workers`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PoolCounts {
    /// Worker processes started (a slot starts a fresh one after a death and for a retry).
    pub started: u64,
    /// Workers that died on their own while holding a file (a signal, an abnormal exit), not
    /// those the parent killed.
    pub deaths: u64,
    /// Files tried again, alone, in a fresh worker after a death.
    pub retries: u64,
    /// Workers killed above `--decode-memory-mib`.
    pub memory_kills: u64,
    /// Workers killed past a file's deadline.
    pub deadline_kills: u64,
}

/// Who may decode now: any number of files at once, or one alone (a suspect of an earlier
/// crash of the parent, or a retry after a worker's death), once the files in flight are done.
struct DecodeTurns(RwLock<()>);

/// A turn to decode, held while a file is in flight.
enum Turn<'a> {
    Shared { _guard: RwLockReadGuard<'a, ()> },
    Alone { _guard: RwLockWriteGuard<'a, ()> },
}

impl DecodeTurns {
    fn take(&self, alone: bool) -> Turn<'_> {
        if alone {
            Turn::Alone { _guard: self.0.write().unwrap_or_else(PoisonError::into_inner) }
        } else {
            Turn::Shared { _guard: self.0.read().unwrap_or_else(PoisonError::into_inner) }
        }
    }
}

/// A request to the thread that starts workers.
struct StartRequest {
    low_priority: bool,
    reply: Sender<io::Result<Child>>,
}

/// The workers of one run: their settings, the watchdog's view of them, and the counts.
pub struct Pool {
    setup: Setup,
    memory_limit_bytes: u64,
    /// `--decode-timeout`.
    timeout: Duration,
    slots: Vec<Mutex<SlotWatch>>,
    low_priority_slots: usize,
    turns: DecodeTurns,
    stopping: AtomicBool,
    finished: AtomicBool,
    /// Slots whose thread has not ended yet.
    slots_running: AtomicUsize,
    counts: Mutex<PoolCounts>,
    /// Files whose workers died on both tries, held back until a file decodes (then recorded)
    /// or until [`CRASHES_IN_A_ROW`] stop the run (then left for the next run).
    crashed_in_a_row: Mutex<Vec<(VideoFile, Rejection)>>,
    broken: Mutex<Option<String>>,
    /// The starter thread's requests: the sender is dropped by [`Pool::finish`], the receiver
    /// taken by [`Pool::run_starter`].
    starter: Mutex<Option<Sender<StartRequest>>>,
    requests: Mutex<Option<Receiver<StartRequest>>>,
}

/// One try of one file in one worker.
enum Attempt {
    Done(Prepared),
    Killed(Kill),
    /// The worker died on its own: how, and its last words.
    Died(String, Option<String>),
}

/// The outcome of one file.
pub enum FileOutcome {
    Prepared(Prepared),
    /// The run is stopping; the file was cut short and is not a failure.
    CutShort,
}

impl Pool {
    pub fn new(
        setup: Setup,
        memory_limit_bytes: u64,
        timeout: Duration,
        slots: usize,
        low_priority_slots: usize,
    ) -> Pool {
        let (requests, incoming) = bounded(slots);
        Pool {
            setup,
            memory_limit_bytes,
            timeout,
            slots: (0..slots).map(|_| Mutex::new(SlotWatch::default())).collect(),
            low_priority_slots,
            turns: DecodeTurns(RwLock::new(())),
            stopping: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            slots_running: AtomicUsize::new(slots),
            counts: Mutex::new(PoolCounts::default()),
            crashed_in_a_row: Mutex::new(Vec::new()),
            broken: Mutex::new(None),
            starter: Mutex::new(Some(requests)),
            requests: Mutex::new(Some(incoming)),
        }
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Runs the thread that starts every worker: it must outlive them (`PR_SET_PDEATHSIG`).
    /// Returns when [`Pool::finish`] has been called and every slot has let go of it.
    pub fn run_starter(&self) {
        let Some(incoming) = lock(&self.requests).take() else { return };
        for request in incoming {
            let _ = request.reply.send(start_worker(request.low_priority));
        }
    }

    /// Runs the watchdog until [`Pool::finish`].
    pub fn run_watchdog(&self) {
        while !self.finished.load(Ordering::SeqCst) {
            let stopping = self.is_stopping();
            let mut live_ticks = 0;
            for slot in &self.slots {
                let mut slot = lock(slot);
                let Some(worker) = slot.worker.as_mut() else { continue };
                if worker.killed.is_some() {
                    continue;
                }
                let resident = resident_bytes(worker.pid).unwrap_or(0);
                worker.cpu_ticks = cpu_ticks(worker.pid).unwrap_or(worker.cpu_ticks);
                live_ticks += worker.cpu_ticks;
                // Only a worker holding a file is killed, so a kill always names that file; an
                // idle worker's memory is checked when its file comes back (`Slot::attempt`).
                let kill = match worker.answer_due {
                    None => None,
                    Some(_) if resident > self.memory_limit_bytes => Some(Kill::Memory { resident_bytes: resident }),
                    Some((due, allowed)) if Instant::now() > due => Some(Kill::Deadline { allowed }),
                    Some(_) if stopping => Some(Kill::Stopping),
                    Some(_) => None,
                };
                if let Some(kill) = kill {
                    worker.kill(kill);
                }
                slot.peak_resident_bytes = slot.peak_resident_bytes.max(resident);
            }
            LIVE_WORKERS_CPU_TICKS.store(live_ticks, Ordering::Relaxed);
            std::thread::sleep(WATCH_EVERY);
        }
    }

    /// Ends the starter and the watchdog; called once every slot is done.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
        lock(&self.starter).take();
    }

    /// Whether the run is stopping: a signal, or a broken decoder.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst) || crate::interrupt::was_requested()
    }

    /// Asks every slot to stop (another stage failed).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Stops everything at once (the thread that consumes outcomes panicked): every worker is
    /// killed, busy or not, and the starter and the watchdog end.
    pub fn abandon(&self) {
        self.stop();
        for slot in &self.slots {
            let mut slot = lock(slot);
            if let Some(worker) = slot.worker.as_mut()
                && worker.killed.is_none()
            {
                worker.kill(Kill::Stopping);
            }
        }
        self.finish();
    }

    /// Why the decoders were found broken, if they were.
    pub fn broken(&self) -> Option<String> {
        lock(&self.broken).clone()
    }

    pub fn counts(&self) -> PoolCounts {
        *lock(&self.counts)
    }

    /// Each slot's peak resident memory (its workers', as the watchdog read it).
    pub fn peak_resident_bytes(&self) -> Vec<u64> {
        self.slots.iter().map(|s| lock(s).peak_resident_bytes).collect()
    }

    /// One slot's handle, for the thread that decodes through it.
    pub fn slot(&self, index: usize) -> Slot<'_> {
        Slot { pool: self, index, low_priority: index >= self.slots.len() - self.low_priority_slots, worker: None }
    }

    /// Records one file's outcome in the run of crashes, and returns what to hand on now: the
    /// crashed files held back, once a file decodes, and this one.
    pub fn after_file(&self, file: VideoFile, outcome: Prepared) -> Vec<(VideoFile, Prepared)> {
        let mut held = lock(&self.crashed_in_a_row);
        if let Prepared::Failed(rejection) = &outcome
            && rejection.kind == FailureKind::CrashedDecoder
        {
            held.push((file, rejection.clone()));
            if held.len() >= CRASHES_IN_A_ROW {
                let message = format!(
                    "{} files in a row killed their decode workers, twice each (the last: {}): the decoders, not the files, are broken; check the GStreamer plugins, then run again (these files were not recorded as failures)",
                    held.len(),
                    rejection.message
                );
                *lock(&self.broken) = Some(message);
                self.stop();
                held.clear();
            }
            return Vec::new();
        }
        let mut out: Vec<_> = held.drain(..).map(|(f, r)| (f, Prepared::Failed(r))).collect();
        out.push((file, outcome));
        out
    }

    /// Called by each slot's thread as it ends: the last one gets the crashed files still
    /// held back (fewer than stop a run), to be recorded.
    pub fn slot_ended(&self) -> Vec<(VideoFile, Prepared)> {
        if self.slots_running.fetch_sub(1, Ordering::SeqCst) != 1 {
            return Vec::new();
        }
        lock(&self.crashed_in_a_row).drain(..).map(|(f, r)| (f, Prepared::Failed(r))).collect()
    }
}

/// One decode slot: its thread's handle on the pool and its current worker.
pub struct Slot<'a> {
    pool: &'a Pool,
    index: usize,
    low_priority: bool,
    worker: Option<Worker>,
}

impl Slot<'_> {
    /// Decodes the file at `path` (of `size_bytes`), `alone` if it is a suspect of an earlier
    /// crash of the parent: its outcome, a typed failure when its worker was killed or died on both tries,
    /// or `CutShort` when the run is stopping. An `Err` is a worker that cannot start.
    /// `started` is called once the file's turn has come and `finished` before its last turn
    /// ends, so that the crash journal never shows a file in flight that waits for its turn,
    /// nor one done while the next suspect already runs alone.
    pub fn prepare(
        &mut self,
        path: &Path,
        size_bytes: u64,
        alone: bool,
        started: impl FnOnce(),
        finished: impl FnOnce(),
    ) -> Result<FileOutcome, String> {
        let allowed = self.pool.timeout.saturating_add(grace(size_bytes));
        let mut finished = Some(finished);
        let mut finish = || finished.take().map(|f| f());
        let first = {
            let _turn = self.pool.turns.take(alone);
            started();
            let first = self.attempt(path, 1, allowed);
            if !matches!(first, Ok(Attempt::Died(..))) {
                finish();
            }
            first?
        };
        let (how, last_words) = match first {
            Attempt::Done(prepared) => return Ok(FileOutcome::Prepared(prepared)),
            Attempt::Killed(kill) => return Ok(self.killed(kill)),
            Attempt::Died(how, last_words) => (how, last_words),
        };
        lock(&self.pool.counts).retries += 1;
        // Alone, so that nothing but this file is decoding while its second worker runs.
        let second = {
            let _alone = self.pool.turns.take(true);
            let second = self.attempt(path, 2, allowed);
            finish();
            second?
        };
        match second {
            Attempt::Done(prepared) => Ok(FileOutcome::Prepared(prepared)),
            Attempt::Killed(kill) => Ok(self.killed(kill)),
            Attempt::Died(again, last_words_again) => {
                let said = last_words_again
                    .or(last_words)
                    .map_or(String::from("it wrote nothing before it died"), |w| format!("its last words: {w}"));
                let message = format!("the decode worker {how}, then a fresh one decoding it alone {again}; {said}");
                let rejection = Rejection::new(Stage::Decode, FailureKind::CrashedDecoder, message);
                Ok(FileOutcome::Prepared(Prepared::Failed(rejection)))
            }
        }
    }

    /// What a kill by the parent means for the file.
    fn killed(&self, kill: Kill) -> FileOutcome {
        let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
        let (kind, message) = match kill {
            Kill::Stopping => return FileOutcome::CutShort,
            Kill::Memory { resident_bytes } => {
                lock(&self.pool.counts).memory_kills += 1;
                let message = format!(
                    "the decode worker used {:.0} MiB, over --decode-memory-mib {:.0}, and was stopped (raise the limit if the file is merely large)",
                    mib(resident_bytes),
                    mib(self.pool.memory_limit_bytes)
                );
                (FailureKind::MemoryLimit, message)
            }
            Kill::Deadline { allowed } => {
                lock(&self.pool.counts).deadline_kills += 1;
                let message = format!(
                    "the decode worker did not answer within --decode-timeout ({} s) plus {} s and was stopped (raise --decode-timeout if the file is merely slow)",
                    self.pool.timeout.as_secs_f64(),
                    allowed.saturating_sub(self.pool.timeout).as_secs()
                );
                (FailureKind::Timeout, message)
            }
        };
        FileOutcome::Prepared(Prepared::Failed(Rejection::new(Stage::Decode, kind, message)))
    }

    /// Starts a worker through the pool's starter thread and hands it the run's setup.
    fn start(&mut self) -> Result<Worker, String> {
        let ended = || "the decode workers' starter has ended".to_string();
        let (reply, answer) = bounded(1);
        let starter = lock(&self.pool.starter).clone().ok_or_else(ended)?;
        starter.send(StartRequest { low_priority: self.low_priority, reply }).map_err(|_| ended())?;
        let child = answer.recv().map_err(|_| ended())?.map_err(|e| start_error(&e))?;
        let mut worker = Worker::attach(child, format!("worker-{}-stderr", self.index))?;
        lock(&self.pool.slots[self.index]).worker =
            Some(Watched { pid: worker.child.id() as i32, answer_due: None, killed: None, cpu_ticks: 0 });
        lock(&self.pool.counts).started += 1;
        // A worker that cannot take its setup is found dead at its first file.
        if let Some(to) = worker.to.as_mut() {
            let _ = worker::send_setup(to, &self.pool.setup);
        }
        Ok(worker)
    }

    /// Sends `path` to a worker (a fresh one for a retry) and reads its answer, which is due
    /// within `allowed`.
    fn attempt(&mut self, path: &Path, attempt: u32, allowed: Duration) -> Result<Attempt, String> {
        if attempt > 1 {
            self.close();
        }
        let mut worker = match self.worker.take() {
            Some(worker) => worker,
            None => self.start()?,
        };
        *lock(&worker.last_words) = None;
        self.set_answer_due(allowed);
        let sent = match worker.to.as_mut() {
            Some(to) => worker::send_task(to, path, attempt),
            None => Err(io::ErrorKind::BrokenPipe.into()),
        };
        let error = match sent.and_then(|()| worker::receive_prepared(&mut worker.from, &self.pool.setup)) {
            Ok(prepared) => {
                let keep = {
                    let mut slot = lock(&self.pool.slots[self.index]);
                    let watched = slot.worker.as_mut().expect("a worker is registered until it is reaped");
                    watched.answer_due = None;
                    // Killed just as it answered, or holding more than half the limit after its
                    // file (a decoder's caches): the answer stands, the next file gets a fresh
                    // worker, and no file is blamed for what this one kept.
                    watched.killed.is_none()
                        && resident_bytes(watched.pid).is_some_and(|bytes| bytes <= self.pool.memory_limit_bytes / 2)
                };
                self.worker = Some(worker);
                if !keep {
                    self.close();
                }
                return Ok(Attempt::Done(prepared));
            }
            Err(error) => error,
        };
        // The pipe ended: the worker is dying. Anything else is an answer that cannot be read
        // from a live worker, which is stopped.
        let ending = matches!(error.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe);
        if !ending {
            let _ = worker.child.kill();
        }
        // Still registered while it ends, so the watchdog's deadline holds over a worker that
        // closed its output and lingers; unregistered before it is reaped.
        wait_without_reaping(worker.child.id() as i32);
        let killed = lock(&self.pool.slots[self.index]).worker.take().and_then(|w| w.killed);
        let status = worker.reap();
        let last_words = lock(&worker.last_words).take();
        match killed {
            Some(kill) => Ok(Attempt::Killed(kill)),
            // A death once the run is stopping is never counted as a crash.
            None if self.pool.is_stopping() => Ok(Attempt::Killed(Kill::Stopping)),
            None => {
                lock(&self.pool.counts).deaths += 1;
                let how = if ending {
                    how_it_ended(status)
                } else {
                    format!("was stopped after an answer that could not be read ({error})")
                };
                Ok(Attempt::Died(how, last_words))
            }
        }
    }

    /// Marks the slot's worker as holding a file whose answer is due within `allowed`.
    fn set_answer_due(&self, allowed: Duration) {
        if let Some(watched) = lock(&self.pool.slots[self.index]).worker.as_mut() {
            watched.answer_due = Some((Instant::now() + allowed, allowed));
        }
    }

    /// Takes the slot's worker off the watchdog's list (before it is reaped, so the watchdog
    /// never signals a pid that may have been reused).
    fn unregister(&self) {
        lock(&self.pool.slots[self.index]).worker = None;
    }

    /// Ends the current worker, which holds no file, and reaps it.
    fn close(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            self.unregister();
            // Killed rather than asked to end: it holds nothing, and a decoder library that
            // hangs in its exit handlers must not hold the run.
            let _ = worker.child.kill();
            worker.reap();
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.close();
    }
}
