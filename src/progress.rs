//! What a person watching a run sees: a progress bar on a terminal, plain periodic lines in
//! logs, one line per failed input (`vtr-index: PATH: KIND: message`); a stderr nobody reads
//! any more loses these lines, never the run ([`say`]).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    videos: u64,
    frames: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// A bar when stderr is a terminal; periodic lines otherwise.
    pub fn new(total_videos: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_videos);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} videos  {msg}  ETA {eta}")
                    .expect("a valid template"),
            );
            bar
        });
        let now = Instant::now();
        Progress { bar, total: total_videos, videos: 0, frames: 0, started: now, last_line: now }
    }

    pub fn frames_per_second(&self) -> f64 {
        self.frames as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    /// One input done (indexed or failed), with the frames it contributed.
    pub fn advance(&mut self, frames: u64) {
        self.videos += 1;
        self.frames += frames;
        let fps = self.frames_per_second();
        if let Some(bar) = &self.bar {
            bar.set_position(self.videos);
            bar.set_message(format!("{} frames  {fps:.1} frames/s", self.frames));
        } else if self.last_line.elapsed() >= LOG_EVERY {
            self.last_line = Instant::now();
            say(&format!(
                "vtr-index: ingest: {}/{} videos, {} frames, {fps:.1} frames/s",
                self.videos, self.total, self.frames
            ));
        }
    }

    /// Prints a line without breaking the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => say(line),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// One line on stderr; a stderr nobody reads any more (`ingest … 2>&1 | head`) loses the line
/// instead of failing the run, as `eprintln!` would by panicking.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
