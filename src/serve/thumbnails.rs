//! The service's thumbnails: frames of indexed videos decoded on demand in decode worker
//! processes (`ingest/worker.rs`), a fixed number at a time, each within its own deadline, and
//! kept in a cache bounded in bytes.
//!
//! Each of the [`DECODERS`] threads starts and drives one worker (`PR_SET_PDEATHSIG` follows
//! the thread that started a process, so the thread lives as long as the service). Requests
//! wait in a queue of [`QUEUED`]; a request that finds it full is refused at once (the service
//! answers 503), never queued without bound. A worker that passes the deadline is killed and
//! replaced; one that dies on a file takes only that request with it.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use lru::LruCache;

use crate::failure::Rejection;
use crate::ingest::process::{Worker, how_it_ended, start_error, start_worker};
use crate::ingest::worker::{Setup, receive_thumbnail, send_setup, send_thumbnail_task};
use crate::preprocess::PreprocessConfig;
use crate::sampling::SamplingConfig;
use crate::thumbnail::{THUMBNAIL_MAX_SIDE, Thumbnail};

/// How long one thumbnail may take in its worker (ingest allows a whole file 300 s).
pub const THUMBNAIL_TIMEOUT: Duration = Duration::from_secs(10);
/// Past the deadline, what a worker is given to answer with its own timeout before it is killed.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Decodes at once: each a worker process.
pub const DECODERS: usize = 2;
/// Requests waiting for a decoder, beyond which one is refused: a page's grid at a time.
pub const QUEUED: usize = 48;

/// Why a thumbnail was not made.
#[derive(Debug, Clone)]
pub enum ThumbnailError {
    /// Every decoder is busy and the queue is full.
    Busy,
    /// The file gave no frame: its typed failure.
    Failed(Rejection),
    /// The worker died or broke the protocol on this file.
    WorkerDied(String),
    /// The worker passed [`THUMBNAIL_TIMEOUT`] and was killed.
    TimedOut,
}

/// A cached thumbnail's key: the file as the index recorded it, and the time asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ThumbnailKey {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub mtime_ns: i64,
    /// The time asked for, in milliseconds.
    pub time_ms: u64,
}

struct Job {
    path: PathBuf,
    time_s: f64,
    reply: tokio::sync::oneshot::Sender<Result<Thumbnail, ThumbnailError>>,
}

struct Cache {
    entries: LruCache<ThumbnailKey, Arc<Thumbnail>>,
    bytes: usize,
    max_bytes: usize,
}

/// The decoders and the cache.
pub struct Thumbnails {
    jobs: Sender<Job>,
    cache: Mutex<Cache>,
}

impl Thumbnails {
    /// Starts the decoder threads (their workers start on their first request) with a cache of
    /// at most `cache_bytes` of JPEG.
    pub fn start(cache_bytes: usize) -> std::io::Result<Thumbnails> {
        let (jobs, queue) = bounded(QUEUED);
        for n in 0..DECODERS {
            let queue = queue.clone();
            std::thread::Builder::new().name(format!("thumbnails-{n}")).spawn(move || run_decoder(n, &queue))?;
        }
        let cache = Cache { entries: LruCache::unbounded(), bytes: 0, max_bytes: cache_bytes };
        Ok(Thumbnails { jobs, cache: Mutex::new(cache) })
    }

    /// The cached thumbnail for `key`, if there is one.
    pub fn cached(&self, key: &ThumbnailKey) -> Option<Arc<Thumbnail>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).entries.get(key).cloned()
    }

    /// Makes the thumbnail for `key` (the file at `key.path`, checked by the caller against its
    /// row) in a worker, and caches it.
    pub async fn make(&self, key: ThumbnailKey) -> Result<Arc<Thumbnail>, ThumbnailError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job { path: key.path.clone(), time_s: key.time_ms as f64 / 1000.0, reply };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(ThumbnailError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(ThumbnailError::WorkerDied("no decoder".into())),
        }
        let made = answer.await.map_err(|_| ThumbnailError::WorkerDied("the decoder ended".into()))??;
        let made = Arc::new(made);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let bytes = made.jpeg.len();
        if bytes <= cache.max_bytes {
            if let Some(old) = cache.entries.put(key, Arc::clone(&made)) {
                cache.bytes -= old.jpeg.len();
            }
            cache.bytes += bytes;
            while cache.bytes > cache.max_bytes {
                let Some((_, evicted)) = cache.entries.pop_lru() else { break };
                cache.bytes -= evicted.jpeg.len();
            }
        }
        Ok(made)
    }

    /// The bytes of JPEG the cache holds now.
    pub fn cached_bytes(&self) -> usize {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).bytes
    }
}

/// One decoder thread: takes requests until the service ends, keeping one worker across them.
fn run_decoder(n: usize, queue: &Receiver<Job>) {
    let setup = Setup {
        // A thumbnail task uses neither; a worker's setup carries them for ingest's tasks.
        sampling: SamplingConfig { fps: 1.0, max_frames: 1 },
        preprocess: PreprocessConfig::clip(1),
        timeout_s: THUMBNAIL_TIMEOUT.as_secs_f64(),
    };
    let mut worker: Option<Worker> = None;
    for job in queue {
        // Its requester left (a page moved on): the decoder goes to the next one.
        if job.reply.is_closed() {
            continue;
        }
        let made = thumbnail_in_worker(n, &setup, &mut worker, &job.path, job.time_s);
        // The requester may have gone (its client closed the connection): nothing to do.
        let _ = job.reply.send(made);
    }
    if let Some(mut worker) = worker.take() {
        worker.reap();
    }
}

/// What became of one task handed to a worker.
enum Asked {
    Answered(Result<Thumbnail, ThumbnailError>),
    /// The task never reached a live worker (it had died while idle): why.
    NotDelivered(String),
}

fn thumbnail_in_worker(
    n: usize,
    setup: &Setup,
    slot: &mut Option<Worker>,
    path: &Path,
    time_s: f64,
) -> Result<Thumbnail, ThumbnailError> {
    match ask_worker(n, setup, slot, path, time_s) {
        Asked::Answered(made) => made,
        // A worker that died while idle (the OOM killer's first choice) costs no request: the
        // task never reached it, so a fresh one takes it.
        Asked::NotDelivered(_) => match ask_worker(n, setup, slot, path, time_s) {
            Asked::Answered(made) => made,
            Asked::NotDelivered(why) => Err(ThumbnailError::WorkerDied(why)),
        },
    }
}

/// Hands the task to the slot's worker, started first if there is none, and waits for its
/// answer until the deadline; a worker that dies, breaks the protocol or passes the deadline
/// is killed and the slot emptied.
fn ask_worker(n: usize, setup: &Setup, slot: &mut Option<Worker>, path: &Path, time_s: f64) -> Asked {
    if slot.is_none() {
        let started = start_worker(false)
            .map_err(|e| start_error(&e))
            .and_then(|child| Worker::attach(child, format!("thumbnails-{n}-stderr")));
        let mut worker = match started {
            Ok(worker) => worker,
            Err(why) => return Asked::Answered(Err(ThumbnailError::WorkerDied(why))),
        };
        if let Some(to) = worker.to.as_mut() {
            // A worker that cannot take its setup is found dead below.
            let _ = send_setup(to, setup);
        }
        *slot = Some(worker);
    }
    let worker = slot.as_mut().expect("started above");
    let sent = worker
        .to
        .as_mut()
        .is_some_and(|to| send_thumbnail_task(to, path, time_s, THUMBNAIL_MAX_SIDE).and_then(|()| to.flush()).is_ok());
    let ended = |slot: &mut Option<Worker>| {
        let mut worker = slot.take().expect("present");
        let _ = worker.child.kill();
        format!("the decode worker {}", how_it_ended(worker.reap()))
    };
    if !sent {
        return Asked::NotDelivered(ended(slot));
    }
    if !wait_readable(worker, THUMBNAIL_TIMEOUT + KILL_GRACE) {
        ended(slot);
        return Asked::Answered(Err(ThumbnailError::TimedOut));
    }
    match receive_thumbnail(&mut worker.from) {
        Ok(made) => Asked::Answered(made.map_err(ThumbnailError::Failed)),
        Err(_) => Asked::Answered(Err(ThumbnailError::WorkerDied(ended(slot)))),
    }
}

/// Waits until the worker's answer can be read (or it closed its output), at most `limit`.
fn wait_readable(worker: &Worker, limit: Duration) -> bool {
    if !worker.from.buffer().is_empty() {
        return true;
    }
    let fd = worker.from.get_ref().as_raw_fd();
    let due = Instant::now() + limit;
    loop {
        let left = due.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let millis = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        // SAFETY: one pollfd, ours, for the call's duration.
        let ready = unsafe { libc::poll(&mut poll, 1, millis) };
        if ready > 0 {
            return true;
        }
        if ready < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return true;
        }
    }
}
