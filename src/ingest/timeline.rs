//! Where one ingest run's time went: each stage's busy time, its waits, and the CPU time of
//! the process and its decode workers, in total and as a timeline of at most [`SLOTS`] equal slots for the run report
//! (`runs/TAG.json`). The timeline shows what totals hide: cores left idle while the model
//! loads or builds, the encoder waiting for frames, decoders held back by a busy encoder.
//!
//! A run of any length fits the same slots: when the next interval would end past the last
//! slot, neighbouring slots are merged in pairs and the slot width doubles.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

/// Slots in a run's timeline at most.
pub const SLOTS: usize = 120;
/// The first slot width; doubled as often as a long run needs.
const FIRST_SLOT_S: f64 = 0.5;

/// What a stage's thread spent an interval on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// A decode slot with one file in its worker process (decoding, sampling, preprocessing
    /// and hashing it).
    Decode,
    /// A decode slot holding a finished file the encoder has no room for yet.
    DecodeWaiting,
    /// One model batch (the encoder).
    Encode,
    /// The encoder waiting for frames to embed.
    EncodeWaiting,
    /// Writing one file's rows (the writer).
    Write,
    /// Building the model's towers from the weights read (the encoder, while the first files
    /// decode).
    BuildModel,
}

const ACTIVITIES: usize = 6;

/// One run's clock: totals per activity, and the timeline.
pub struct StageClock {
    started: Instant,
    nanos: [AtomicU64; ACTIVITIES],
    timeline: Mutex<Slots>,
}

struct Slots {
    width_s: f64,
    /// Per slot: seconds of each activity, summed over threads, and CPU seconds.
    busy: Vec<[f64; ACTIVITIES]>,
    cpu: Vec<f64>,
    /// When the process's CPU time was last read, and what it was.
    cpu_read: (f64, f64),
}

/// The timeline as the run report records it: slot `i` covers
/// `[i · slot_s, (i + 1) · slot_s)` seconds from the start of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TimelineReport {
    pub slot_s: f64,
    /// Seconds per slot that decode workers and the encoder decoded (up to `slot_s` ×
    /// (workers + 1)).
    pub decode: Vec<f64>,
    /// Seconds per slot that decode workers waited for the encoder to take their files.
    pub decode_waiting: Vec<f64>,
    /// Seconds per slot that the encoder ran the model.
    pub encode: Vec<f64>,
    /// Seconds per slot that the encoder waited for frames.
    pub encode_waiting: Vec<f64>,
    pub write: Vec<f64>,
    /// Seconds per slot that the encoder built the model's towers.
    pub build_model: Vec<f64>,
    /// CPU seconds the whole process used per slot (up to `slot_s` × cores): the cores a run
    /// leaves idle are the difference.
    pub cpu: Vec<f64>,
}

impl StageClock {
    /// A clock whose time 0 is `started`, the start of the run. The CPU time used before now
    /// (opening the index, loading the model, the walk and the plan) is spread evenly over the
    /// slots before now.
    pub fn new(started: Instant) -> StageClock {
        let (now, cpu) = (started.elapsed().as_secs_f64(), process_cpu_seconds());
        let mut slots = Slots { width_s: FIRST_SLOT_S, busy: Vec::new(), cpu: Vec::new(), cpu_read: (now, cpu) };
        if now > 0.0 {
            slots.spread(0.0, now, |_, _| {});
            slots.spread_cpu(0.0, now, cpu / now);
        }
        StageClock { started, nanos: Default::default(), timeline: Mutex::new(slots) }
    }

    /// Records that `activity` ran from `since` until now.
    pub fn add(&self, activity: Activity, since: Instant) {
        let now = Instant::now();
        self.nanos[activity as usize].fetch_add(now.duration_since(since).as_nanos() as u64, Ordering::Relaxed);
        let from = since.saturating_duration_since(self.started).as_secs_f64();
        let to = now.saturating_duration_since(self.started).as_secs_f64();
        let cpu = process_cpu_seconds();
        let mut slots = self.timeline.lock().unwrap_or_else(|e| e.into_inner());
        slots.spread(from, to, |cell, seconds| cell[activity as usize] += seconds);
        let (read_at, read) = slots.cpu_read;
        if to > read_at {
            let rate = (cpu - read).max(0.0) / (to - read_at);
            // The slots up to `to` were made by the `spread` above.
            slots.spread_cpu(read_at, to, rate);
            slots.cpu_read = (to, cpu);
        }
    }

    /// Seconds of `activity` over the run, summed over threads.
    pub fn seconds(&self, activity: Activity) -> f64 {
        self.nanos[activity as usize].load(Ordering::Relaxed) as f64 / 1e9
    }

    pub fn report(&self) -> TimelineReport {
        let slots = self.timeline.lock().unwrap_or_else(|e| e.into_inner());
        let column = |activity: Activity| slots.busy.iter().map(|cell| round_ms(cell[activity as usize])).collect();
        TimelineReport {
            slot_s: slots.width_s,
            decode: column(Activity::Decode),
            decode_waiting: column(Activity::DecodeWaiting),
            encode: column(Activity::Encode),
            encode_waiting: column(Activity::EncodeWaiting),
            write: column(Activity::Write),
            build_model: column(Activity::BuildModel),
            cpu: slots.cpu.iter().copied().map(round_ms).collect(),
        }
    }
}

impl Slots {
    /// Makes room for time `to`, then hands `f` each slot that `[from, to)` overlaps with the
    /// seconds of overlap.
    fn spread(&mut self, from: f64, to: f64, mut f: impl FnMut(&mut [f64; ACTIVITIES], f64)) {
        while to > self.width_s * SLOTS as f64 {
            self.merge_pairs();
        }
        let last = ((to / self.width_s) as usize).min(SLOTS - 1);
        if self.busy.len() <= last {
            self.busy.resize(last + 1, [0.0; ACTIVITIES]);
            self.cpu.resize(last + 1, 0.0);
        }
        let first = ((from / self.width_s) as usize).min(last);
        for (i, cell) in self.busy.iter_mut().enumerate().take(last + 1).skip(first) {
            let start = (i as f64 * self.width_s).max(from);
            let end = ((i + 1) as f64 * self.width_s).min(to);
            if end > start {
                f(cell, end - start);
            }
        }
    }

    /// Adds CPU time used at `rate` cores over `[from, to)` (slots already made by `spread`).
    fn spread_cpu(&mut self, from: f64, to: f64, rate: f64) {
        let width = self.width_s;
        for (i, cpu) in self.cpu.iter_mut().enumerate() {
            let start = (i as f64 * width).max(from);
            let end = ((i + 1) as f64 * width).min(to);
            if end > start {
                *cpu += (end - start) * rate;
            }
        }
    }

    fn merge_pairs(&mut self) {
        self.busy =
            self.busy.chunks(2).map(|pair| std::array::from_fn(|a| pair.iter().map(|cell| cell[a]).sum())).collect();
        self.cpu = self.cpu.chunks(2).map(|pair| pair.iter().sum()).collect();
        self.width_s *= 2.0;
    }
}

fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// `getrusage(who)`: `RUSAGE_SELF` for this process, `RUSAGE_CHILDREN` for its reaped children.
pub(super) fn rusage(who: libc::c_int) -> libc::rusage {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is given, and `who` is one of the two it takes.
    unsafe {
        libc::getrusage(who, usage.as_mut_ptr());
        usage.assume_init()
    }
}

/// User and system CPU time of the whole process, every thread included, and of its decode
/// workers: the reaped ones as its children, the live ones as the watchdog read them.
fn process_cpu_seconds() -> f64 {
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let cpu = |usage: libc::rusage| seconds(usage.ru_utime) + seconds(usage.ru_stime);
    cpu(rusage(libc::RUSAGE_SELF)) + cpu(rusage(libc::RUSAGE_CHILDREN)) + super::process::live_workers_cpu_seconds()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Slots {
        Slots { width_s: 1.0, busy: Vec::new(), cpu: Vec::new(), cpu_read: (0.0, 0.0) }
    }

    #[test]
    fn an_interval_is_spread_over_the_slots_it_overlaps() {
        let mut slots = slots();
        slots.spread(0.5, 2.25, |cell, s| cell[0] += s);
        let column: Vec<f64> = slots.busy.iter().map(|c| c[0]).collect();
        assert_eq!(column, vec![0.5, 1.0, 0.25]);
        slots.spread_cpu(0.0, 3.0, 2.0);
        assert_eq!(slots.cpu, vec![2.0, 2.0, 2.0]);
    }

    #[test]
    fn a_long_run_merges_slots_and_keeps_every_second() {
        let mut slots = slots();
        slots.spread(0.0, 300.0, |cell, s| cell[1] += s);
        assert_eq!(slots.width_s, 4.0, "300 s fit 120 slots of 4 s, not of 1 or 2");
        assert_eq!(slots.busy.len(), 76, "slot 75 holds the end, at 300 s");
        let total: f64 = slots.busy.iter().map(|c| c[1]).sum();
        assert!((total - 300.0).abs() < 1e-9, "{total}");
        slots.spread(299.0, 1000.0, |cell, s| cell[1] += s);
        assert_eq!(slots.width_s, 16.0);
        assert!(slots.busy.len() <= SLOTS);
        let total: f64 = slots.busy.iter().map(|c| c[1]).sum();
        assert!((total - 1001.0).abs() < 1e-9, "{total}");
    }
}
