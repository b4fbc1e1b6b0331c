//! Decode worker processes: a worker that aborts, segfaults, exits mid-answer, hangs or bloats
//! costs its file only (faults injected inside the worker by `VTR_INDEX_WORKER_FAULT`, see
//! `src/ingest/worker.rs`); a crash on the first try is retried and indexed; a run of deaths
//! stops the run; workers killed from outside, signals sent to the whole process group or to
//! every process, and a SIGKILL of the parent leave no worker running and blame no file; and a
//! seeded fuzz run over damaged files with sound never ends an ingest.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use vtr_index::store::Manifest;

use crate::util::*;

const FAULT: &str = "VTR_INDEX_WORKER_FAULT";
/// The clip the faults hit; the others are indexed beside it.
const VICTIM: &str = "rotated90_h264.mp4";

/// The newest run report of `index`.
fn last_report(index: &Path) -> serde_json::Value {
    let mut reports: Vec<_> = std::fs::read_dir(index.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    reports.sort();
    serde_json::from_slice(&std::fs::read(reports.last().expect("a run report")).unwrap()).unwrap()
}

fn workers_count(report: &serde_json::Value, what: &str) -> u64 {
    report["decode_workers"][what].as_u64().unwrap_or_else(|| panic!("{what} in {report}"))
}

/// The ids the index holds, and its failures.
fn contents(index: &Path) -> (BTreeSet<String>, BTreeSet<(String, String)>) {
    let state = snapshot(index).expect("a committed index");
    (state.videos.keys().cloned().collect(), state.failures)
}

fn ids(clips: &[&str]) -> BTreeSet<String> {
    clips.iter().map(|c| c.rsplit_once('.').unwrap().0.to_string()).collect()
}

/// One process as `/proc` shows it.
struct Process {
    pid: i32,
    folder: std::path::PathBuf,
    parent: u32,
    zombie: bool,
}

/// Every process `/proc` lists now (those that end while it is read are left out).
fn processes() -> Vec<Process> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The command name may hold spaces and parentheses; the state and parent follow it.
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(&state), Some(Ok(parent))) = (fields.first(), fields.get(1).map(|p| p.parse())) else { continue };
        found.push(Process { pid, folder: entry.path(), parent, zombie: state == "Z" });
    }
    found
}

/// The pids of `parent`'s live decode workers.
fn workers_of(parent: u32) -> Vec<i32> {
    let is_worker = |p: &Process| {
        let cmdline = std::fs::read(p.folder.join("cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains("decode-worker")
    };
    processes().into_iter().filter(|p| p.parent == parent && !p.zombie && is_worker(p)).map(|p| p.pid).collect()
}

/// An ingest of `root` whose files are committed one by one, with `fault` (a hang) in its
/// workers: what the tests that signal or kill a running ingest start.
fn ingest_committing_each_file(index: &Path, root: &Path, fault: &str) -> crate::util::TestCommand {
    ingest_command(index, root, &["--commit-every", "1", "--batch", "1", "--decode-timeout", "120"]).env(FAULT, fault)
}

/// A running ingest, killed if the test fails before it ends.
struct Running(Option<Child>);

impl Running {
    fn id(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    fn finish(mut self) -> Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (at most a minute, polling) until `index` has committed `count` videos.
fn wait_for_committed_videos(index: &Path, count: usize, running: &mut Running) {
    let child = running.0.as_mut().unwrap();
    let started = Instant::now();
    loop {
        if let Ok(Some(manifest)) = Manifest::load(index) {
            let rows: u64 = manifest.shards("videos").iter().map(|s| s.rows).sum();
            if rows as usize >= count {
                return;
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before {count} videos were committed");
        assert!(started.elapsed() < Duration::from_secs(60), "no {count} videos committed within a minute");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn each_worker_fault_costs_its_file_only() {
    let clips = &CLIPS[..3];
    let faults = [
        ("abort", "crashed_decoder", "SIGABRT", &[][..]),
        ("segv", "crashed_decoder", "SIGSEGV", &[][..]),
        ("exit-mid-frames", "crashed_decoder", "exited (status 0) while holding the file", &[][..]),
        ("alloc", "memory_limit", "over --decode-memory-mib 300", &["--decode-memory-mib", "300"][..]),
        ("hang", "timeout", "did not answer within --decode-timeout", &["--decode-timeout", "5"][..]),
    ];
    for (fault, kind, said, extra) in faults {
        let dir = Dir::new();
        let root = corpus(&dir, "videos", clips);
        let index = dir.join("index");
        let out = ingest_command(&index, &root, extra).env(FAULT, &format!("{fault}:{VICTIM}")).output();
        assert_eq!(out.status.code(), Some(2), "{fault}: {}", stderr_text(&out));
        assert!(stderr_text(&out).contains(said), "{fault}: {}", stderr_text(&out));
        let (videos, failures) = contents(&index);
        assert_eq!(videos, ids(&[CLIPS[0], CLIPS[2]]), "{fault}: {}", stderr_text(&out));
        assert_eq!(failures, BTreeSet::from([(VICTIM.to_string(), kind.to_string())]), "{fault}");
        assert_verifies(&index);
        let report = last_report(&index);
        let (deaths, retries) = if kind == "crashed_decoder" { (2, 1) } else { (0, 0) };
        assert_eq!(workers_count(&report, "deaths"), deaths, "{fault}: {report}");
        assert_eq!(workers_count(&report, "retries"), retries, "{fault}: {report}");
    }
}

#[test]
fn a_crash_on_the_first_try_only_is_retried_and_indexed_as_any_other() {
    let clips = &CLIPS[..3];
    let dir = Dir::new();
    let reference = dir.join("reference");
    let root = corpus(&dir, "videos", clips);
    assert_eq!(ingest_output(&reference, &root, &[], None).status.code(), Some(0));
    let index = dir.join("index");
    let out = ingest_command(&index, &root, &[]).env(FAULT, &format!("abort:{VICTIM}:1")).output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    assert_same_index(&snapshot(&index).unwrap(), &snapshot(&reference).unwrap(), "retried");
    let report = last_report(&index);
    assert_eq!((workers_count(&report, "deaths"), workers_count(&report, "retries")), (1, 1), "{report}");
    // Memory: the parent's and each slot's (one worker asked for, one at low priority).
    let parent = report["memory"]["parent_peak_mib"].as_f64().unwrap();
    let slots: Vec<f64> =
        report["decode_workers"]["peak_resident_mib"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(slots.len(), 2, "{report}");
    assert!(parent > 10.0 && slots.iter().all(|&mib| mib > 10.0), "{report}");
    let total = report["memory"]["total_peak_mib"].as_f64().unwrap();
    assert!((total - parent - slots.iter().sum::<f64>()).abs() < 0.2, "{report}");
}

#[test]
fn files_that_kill_their_workers_in_a_row_stop_the_run_without_blaming_them() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS);
    let index = dir.join("index");
    let out = ingest_command(&index, &root, &[]).env(FAULT, "abort:*").output();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_text(&out));
    let stderr = stderr_text(&out);
    assert!(stderr.contains("5 files in a row killed their decode workers"), "{stderr}");
    assert!(stderr.contains("SIGABRT"), "{stderr}");
    // Nothing is quarantined: a run with working decoders indexes every file.
    if let Some(state) = snapshot(&index) {
        assert!(state.failures.is_empty(), "{:?}", state.failures);
    }
    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    assert_eq!(contents(&index).0, ids(&CLIPS));
}

#[test]
fn a_worker_killed_from_outside_mid_file_costs_a_retry() {
    let clips = &CLIPS[..3];
    let dir = Dir::new();
    let root = corpus(&dir, "videos", clips);
    let index = dir.join("index");
    // The victim's first worker hangs; the others finish and are committed one by one.
    let mut child = Running(Some(ingest_committing_each_file(&index, &root, &format!("hang:{VICTIM}:1")).spawn()));
    wait_for_committed_videos(&index, 2, &mut child);
    let workers = workers_of(child.id());
    assert!(!workers.is_empty());
    for pid in workers {
        // SAFETY: signalling a process of this test's own.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let out = child.finish();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    assert_eq!(contents(&index).0, ids(clips));
    assert!(workers_count(&last_report(&index), "deaths") >= 1);
    assert_verifies(&index);
}

#[test]
fn signals_to_the_group_or_to_every_process_stop_the_run_and_blame_no_file() {
    let clips = &CLIPS[..3];
    for (how, signal, code) in [("process group", libc::SIGINT, 130), ("every process", libc::SIGTERM, 143)] {
        let dir = Dir::new();
        let root = corpus(&dir, "videos", clips);
        let index = dir.join("index");
        let fault = format!("hang:{VICTIM}");
        let mut child = Running(Some(ingest_committing_each_file(&index, &root, &fault).own_process_group().spawn()));
        wait_for_committed_videos(&index, 2, &mut child);
        let parent = child.id() as i32;
        // SAFETY: signalling processes of this test's own.
        unsafe {
            if how == "process group" {
                // As a terminal's Ctrl-C: the parent and its workers at once.
                libc::killpg(parent, signal);
            } else {
                // As Slurm's scancel: every process of the step, workers first. The workers
                // outlive it (they leave signals to their parent), whoever hears it first.
                let workers = workers_of(parent as u32);
                assert!(!workers.is_empty());
                for &pid in &workers {
                    libc::kill(pid, signal);
                }
                std::thread::sleep(Duration::from_millis(300));
                assert_eq!(workers_of(parent as u32), workers, "{how}: the workers ignore the signal");
                libc::kill(parent, signal);
            }
        }
        let out = child.finish();
        assert_eq!(out.status.code(), Some(code), "{how}: {}", stderr_text(&out));
        let (videos, failures) = contents(&index);
        assert_eq!(videos, ids(&[CLIPS[0], CLIPS[2]]), "{how}");
        assert!(failures.is_empty(), "{how}: {failures:?}");
        let manifest = Manifest::load(&index).unwrap().unwrap();
        assert!(manifest.suspects.is_empty(), "{how}: {:?}", manifest.suspects);
        assert_eq!(workers_count(&last_report(&index), "deaths"), 0, "{how}");
        assert_verifies(&index);
        let out = ingest_output(&index, &root, &[], None);
        assert_eq!(out.status.code(), Some(0), "{how}: {}", stderr_text(&out));
        assert_eq!(contents(&index).0, ids(clips), "{how}");
    }
}

/// Processes (not zombies) whose environment holds `marker`, after waiting up to 10 s for them
/// to end; zombies among this process's children are reaped.
fn still_running_with(marker: &str) -> Vec<i32> {
    let started = Instant::now();
    loop {
        let mut running = Vec::new();
        for process in processes() {
            let environ = std::fs::read(process.folder.join("environ")).unwrap_or_default();
            if !environ.split(|&b| b == 0).any(|v| v == marker.as_bytes()) {
                continue;
            }
            if process.zombie {
                // SAFETY: reaping a child of this (subreaper) process, without blocking.
                unsafe {
                    libc::waitpid(process.pid, std::ptr::null_mut(), libc::WNOHANG);
                }
            } else {
                running.push(process.pid);
            }
        }
        if running.is_empty() || started.elapsed() > Duration::from_secs(10) {
            return running;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn no_worker_outlives_a_normal_an_interrupted_or_a_killed_run() {
    // Orphaned workers become this process's children, so they can be found and reaped.
    // SAFETY: prctl on this process with plain integers.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let clips = &CLIPS[..4];
    let marked = |name: &str| format!("VTR_INDEX_TEST_MARK={name}-{}", std::process::id());
    type Run<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<i32>);
    let runs: [Run; 2] = [
        ("normal", &[], Some(0)),
        (
            "interrupted",
            &[("VTR_INDEX_KILL_AT", "decode:short_h264.mp4"), ("VTR_INDEX_KILL_WITH", "SIGINT")],
            Some(130),
        ),
    ];
    for (name, env, code) in runs {
        let dir = Dir::new();
        let root = corpus(&dir, "videos", clips);
        let marker = marked(name);
        let mut cmd = ingest_command(&dir.join("index"), &root, &["--decode-workers", "2"])
            .env("VTR_INDEX_TEST_MARK", &marker[20..]);
        for (key, value) in env {
            cmd = cmd.env(key, value);
        }
        let out = cmd.output();
        assert_eq!(out.status.code(), code, "{name}: {}", stderr_text(&out));
        assert_eq!(still_running_with(&marker), Vec::<i32>::new(), "{name}: workers left running");
    }

    // SIGKILL of the parent while every worker holds a file that never ends (a worker with no
    // file would end at its closed input anyway; these only end by their parent's death).
    let dir = Dir::new();
    let root = corpus(&dir, "videos", clips);
    let marker = marked("killed");
    let child = Running(Some(
        ingest_command(&dir.join("index"), &root, &["--decode-workers", "2"])
            .env("VTR_INDEX_TEST_MARK", &marker[20..])
            .env(FAULT, "hang:*")
            .spawn(),
    ));
    let started = Instant::now();
    while workers_of(child.id()).len() < 3 {
        assert!(started.elapsed() < Duration::from_secs(60), "3 workers within a minute");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Time to be handed their files.
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling a process of this test's own.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    assert_eq!(child.finish().status.code(), None);
    assert_eq!(still_running_with(&marker), Vec::<i32>::new(), "killed: workers left running");
}

#[test]
fn a_worker_that_cannot_start_is_a_run_error_naming_the_limit() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..2]);
    let index = dir.join("index");
    // As a pod's or a Slurm step's process limit refuses a fork: EAGAIN.
    let out = ingest_command(&index, &root, &[])
        .env("VTR_INDEX_FAIL_AT", "spawn")
        .env("VTR_INDEX_FAIL_WITH", "EAGAIN")
        .output();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_text(&out));
    let stderr = stderr_text(&out);
    assert!(stderr.contains("cannot start a decode worker process") && stderr.contains("process limit"), "{stderr}");
    assert!(snapshot(&index).is_none_or(|state| state.failures.is_empty()), "no file is blamed");
}

/// A decoder that writes megabytes to stderr (`GST_DEBUG`) never fills a pipe nobody reads.
#[test]
fn a_chatty_decoder_is_drained_not_taken_for_a_hang() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..2]);
    let index = dir.join("index");
    let out = ingest_command(&index, &root, &["--decode-timeout", "60"]).env("GST_DEBUG", "*:5").output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out).lines().last().unwrap_or_default());
    assert!(out.stderr.len() > 1 << 20, "GST_DEBUG wrote only {} bytes", out.stderr.len());
    assert_eq!(contents(&index).0, ids(&CLIPS[..2]));
}

/// Lines to a stderr nobody reads (`ingest … 2>&1 | head`, head done) are lost, not fatal: the
/// run, its failure lines and the workers' own stderr included, ends and commits as usual.
#[test]
fn a_closed_stderr_neither_stops_nor_hangs_a_run() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..2]);
    dir.create("videos/broken.mp4", b"not a video at all");
    let index = dir.join("index");
    let status = ingest_command(&index, &root, &[]).env("GST_DEBUG", "*:3").stderr_to_a_closed_pipe();
    assert_eq!(status.code(), Some(2));
    let (videos, failures) = contents(&index);
    assert_eq!(videos, ids(&CLIPS[..2]));
    assert_eq!(failures, BTreeSet::from([("broken.mp4".to_string(), "not_a_video".to_string())]));
}

#[test]
fn zero_decode_workers_is_refused() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..1]);
    let out = ingest_command(&dir.join("index"), &root, &["--decode-workers", "0"]).output();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_text(&out));
    assert!(stderr_text(&out).contains("--decode-workers"), "{}", stderr_text(&out));
    assert!(!dir.join("index").exists());
}

/// splitmix64: the fuzz test's mutations from a printed seed.
struct Mutator(u64);

impl Mutator {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// One damage of the kinds real corpora hold: bit flips, a zeroed or random range, a
    /// truncation, a dropped or a duplicated chunk.
    fn damage(&mut self, bytes: &mut Vec<u8>) {
        let len = bytes.len();
        let (at, span) = (self.below(len), 1 + self.below(len / 8 + 1));
        let end = (at + span).min(len);
        match self.below(6) {
            0 => {
                for _ in 0..1 + self.below(16) {
                    let i = self.below(len);
                    bytes[i] ^= 1 << self.below(8);
                }
            }
            1 => bytes[at..end].fill(0),
            2 => {
                for byte in &mut bytes[at..end] {
                    *byte = self.next() as u8;
                }
            }
            3 => bytes.truncate(len / 4 + self.below(len * 3 / 4)),
            4 => {
                bytes.drain(at..end);
            }
            _ => {
                let chunk = bytes[at..end].to_vec();
                let to = self.below(bytes.len());
                bytes.splice(to..to, chunk);
            }
        }
    }
}

#[test]
fn damaged_files_with_sound_never_end_a_run() {
    let seed: u64 = std::env::var("VTR_INDEX_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261207);
    let mutants_per_file = 12;
    eprintln!("fuzz seed {seed} (VTR_INDEX_FUZZ_SEED), {mutants_per_file} mutants per file with sound");
    let (corpus_dir, entries) = crate::conformance::conformance();
    // The good files but the two kinds the corpus makes without an audio track.
    let silent = |file: &str| {
        file.contains("-h264-subtitles.") || file.contains("-vp9-subtitles.") || file.contains("-timecode.")
    };
    let with_sound: Vec<_> = entries.iter().filter(|e| e.kind == "good" && !silent(&e.file)).collect();
    assert!(with_sound.len() >= 10, "{} good files", with_sound.len());
    let dir = Dir::new();
    let root = dir.join("damaged");
    std::fs::create_dir_all(&root).unwrap();
    let mut mutator = Mutator(seed);
    let mut names = BTreeSet::new();
    for entry in &with_sound {
        let original = std::fs::read(corpus_dir.join(&entry.file)).unwrap();
        let name = Path::new(&entry.file).file_name().unwrap().to_string_lossy().into_owned();
        let (stem, extension) = name.rsplit_once('.').unwrap();
        for i in 0..mutants_per_file {
            let mut bytes = original.clone();
            for _ in 0..1 + mutator.below(2) {
                mutator.damage(&mut bytes);
            }
            let mutant = format!("{stem}-{i:02}.{extension}");
            std::fs::write(root.join(&mutant), bytes).unwrap();
            names.insert(mutant);
        }
    }
    let index = dir.join("index");
    let started = Instant::now();
    let out = ingest_command(&index, &root, &["--decode-timeout", "10", "--decode-workers", "2"]).output();
    let stderr = stderr_text(&out);
    assert!(matches!(out.status.code(), Some(0 | 2)), "seed {seed}: {:?}\n{stderr}", out.status);
    let manifest = Manifest::load(&index).unwrap().unwrap();
    let videos: Vec<vtr_index::store::VideoRow> =
        vtr_index::store::read_table(&index, manifest.shards("videos")).unwrap();
    let failures: Vec<vtr_index::failure::Failure> =
        vtr_index::store::read_table(&index, manifest.shards("failures")).unwrap();
    let mut seen: Vec<String> =
        videos.iter().map(|v| v.path.clone()).chain(failures.iter().map(|f| f.path.clone())).collect();
    seen.sort();
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), unique.len(), "seed {seed}: a file with two rows");
    assert_eq!(unique, names, "seed {seed}: every mutant is one row or one failure\n{stderr}");
    assert_verifies(&index);
    eprintln!(
        "fuzz: {} mutants, {} indexed, {} failed, {:?}, in {:.0} s",
        names.len(),
        videos.len(),
        failures.len(),
        last_report(&index)["failed"],
        started.elapsed().as_secs_f64()
    );
}
