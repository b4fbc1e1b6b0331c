//! One decode worker process seen from the parent: its start (`posix_spawn` of this binary
//! through `/proc/self/exe`), its resident memory and CPU time read from `/proc`, its end in
//! words, and its stderr forwarded with its last line kept.

use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::pool::lock;
use super::worker;

/// The last line a worker wrote about a file is kept up to this many bytes.
const LAST_WORDS_BYTES: usize = 400;

/// CPU time of the workers alive now, in clock ticks (the reaped ones are the process's
/// children's, `getrusage(RUSAGE_CHILDREN)`).
pub(super) static LIVE_WORKERS_CPU_TICKS: AtomicU64 = AtomicU64::new(0);

/// CPU seconds of the decode workers alive now (as last read by the watchdog).
pub fn live_workers_cpu_seconds() -> f64 {
    LIVE_WORKERS_CPU_TICKS.load(Ordering::Relaxed) as f64 / clock_ticks_per_second()
}

pub(super) fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

pub(super) fn page_bytes() -> u64 {
    // SAFETY: sysconf reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 { page as u64 } else { 4096 }
}

/// Resident bytes of a process (`/proc/PID/statm`), if it can still be read.
pub fn resident_bytes(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_bytes())
}

/// User plus system CPU time of a process in clock ticks (`/proc/PID/stat`).
pub(super) fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields after it do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Starts one worker. `posix_spawn` (no `pre_exec`, an absolute program) never copies the
/// parent's address space; the worker sets up the rest itself (`worker::serve`).
pub(crate) fn start_worker(low_priority: bool) -> io::Result<Child> {
    let mut command = Command::new("/proc/self/exe");
    command.arg0("vtr-index").arg(worker::SUBCOMMAND).arg("--parent").arg(std::process::id().to_string());
    if low_priority {
        command.arg("--low-priority");
    }
    // The parent brought the registry up to date when it initialised GStreamer.
    command.env("GST_REGISTRY_UPDATE", "no");
    for variable in crate::fault::PARENT_ONLY_VARIABLES {
        command.env_remove(variable);
    }
    crate::fault::io_step("spawn")?;
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()
}

/// What a worker that cannot start means for the user: usually a process limit.
pub(crate) fn start_error(e: &io::Error) -> String {
    let mut limit = std::mem::MaybeUninit::<libc::rlimit>::zeroed();
    // SAFETY: getrlimit writes the struct it is given.
    let nproc =
        unsafe { (libc::getrlimit(libc::RLIMIT_NPROC, limit.as_mut_ptr()) == 0).then(|| limit.assume_init().rlim_cur) };
    let limit = match nproc {
        Some(n) if n != libc::RLIM_INFINITY => format!("the process limit (ulimit -u) is {n}"),
        _ => "the process limit (ulimit -u) is unlimited".to_string(),
    };
    format!(
        "cannot start a decode worker process: {e} ({limit}; a container or a Slurm step may also cap processes through its cgroup's pids.max): raise the limit or lower --decode-workers"
    )
}

/// How a worker's process ended, in words.
pub(crate) fn how_it_ended(status: Option<ExitStatus>) -> String {
    match status {
        Some(status) => match (status.signal(), status.code()) {
            (Some(signal), _) => format!("was killed by {}", crate::interrupt::signal_name(signal)),
            (None, Some(code)) => format!("exited (status {code}) while holding the file"),
            _ => "ended".to_string(),
        },
        None => "was lost".to_string(),
    }
}

/// Waits until the child `pid` has ended, leaving it unreaped (its pid stays ours).
pub(super) fn wait_without_reaping(pid: i32) {
    loop {
        let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
        // SAFETY: waitid writes the struct it is given; WNOWAIT leaves the child waitable.
        let waited =
            unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, info.as_mut_ptr(), libc::WEXITED | libc::WNOWAIT) };
        if waited == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// The parent's end of one worker process.
pub(crate) struct Worker {
    pub(crate) child: Child,
    pub(crate) to: Option<BufWriter<ChildStdin>>,
    pub(crate) from: BufReader<ChildStdout>,
    drain: Option<JoinHandle<()>>,
    /// The last line the worker wrote to stderr since it was handed its current file.
    pub(crate) last_words: Arc<Mutex<Option<String>>>,
}

impl Worker {
    /// Takes over a started worker's pipes, draining its stderr on a thread named `name`; on
    /// failure the process is killed and reaped.
    pub(crate) fn attach(mut child: Child, name: String) -> Result<Worker, String> {
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            unreachable!("the three standard streams are piped");
        };
        let last_words = Arc::new(Mutex::new(None));
        let drain = {
            let last_words = Arc::clone(&last_words);
            std::thread::Builder::new().name(name).spawn(move || drain_stderr(stderr, last_words))
        };
        let mut worker = Worker {
            child,
            to: Some(BufWriter::new(stdin)),
            from: BufReader::with_capacity(1 << 20, stdout),
            drain: None,
            last_words,
        };
        match drain {
            Ok(drain) => {
                worker.drain = Some(drain);
                Ok(worker)
            }
            Err(e) => {
                let _ = worker.child.kill();
                worker.reap();
                Err(format!("cannot start a thread: {e}"))
            }
        }
    }

    /// Waits for the process and its stderr, whose last line is then complete.
    pub(crate) fn reap(&mut self) -> Option<ExitStatus> {
        self.to = None;
        let status = self.child.wait().ok();
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
        status
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.drain.is_some() {
            // Not reaped: a panic unwinding. No worker outlives its handle.
            let _ = self.child.kill();
            self.reap();
        }
    }
}

/// Forwards a worker's stderr to ours line by line (a chatty `GST_DEBUG` must never fill the
/// pipe and stall the worker) and keeps its last line.
pub(crate) fn drain_stderr(from: impl io::Read, last_words: Arc<Mutex<Option<String>>>) {
    let mut from = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match from.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let _ = io::stderr().lock().write_all(&line);
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if !text.is_empty() {
                    let mut end = text.len().min(LAST_WORDS_BYTES);
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    *lock(&last_words) = Some(text[..end].to_string());
                }
            }
        }
    }
}
