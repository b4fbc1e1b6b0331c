//! Interrupted runs keep their work: SIGINT (Ctrl-C) and SIGTERM (a scheduler's time limit)
//! during decode, during encoding and during a commit. What was finished before the signal is
//! committed, `verify` passes, no file is blamed as `crashed_decoder`, the exit code is 128 +
//! the signal, and the process ends within seconds. `score` leaves no partial output.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use vtr_index::store::Manifest;

use crate::util::*;

/// Ingest with `signal` raised at the fault point `at` (see `src/fault.rs`).
fn ingest_signalled(index: &Path, root: &Path, extra: &[&str], at: &str, signal: &str) -> Output {
    ingest_command(index, root, extra).env("VTR_INDEX_KILL_AT", at).env("VTR_INDEX_KILL_WITH", signal).output()
}

fn leftover_journals(index: &Path) -> Vec<String> {
    std::fs::read_dir(index.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".inflight"))
        .collect()
}

/// The index an uninterrupted run makes of `clips`.
fn reference(dir: &Dir, clips: &[&str]) -> Snapshot {
    let root = corpus(dir, "reference-videos", clips);
    let index = dir.join("reference-index");
    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    snapshot(&index).unwrap()
}

fn ids(snapshot: &Snapshot) -> Vec<&str> {
    snapshot.videos.keys().map(String::as_str).collect()
}

#[test]
fn a_signal_during_decode_commits_the_files_before_it_and_blames_none() {
    let clips = &CLIPS[..4];
    for (signal, code) in [("SIGINT", 130), ("SIGTERM", 143)] {
        let dir = Dir::new();
        let want = reference(&dir, clips);
        let root = corpus(&dir, "videos", clips);
        let index = dir.join("index");
        // Files start in walk order: nested/deeper/gradient_h264, rotated90_h264, short_h264,
        // vfr_h264. Two decode slots (the worker asked for and the low-priority one): the slot
        // starting short_h264 has finished its file before it, and the other may still have
        // one in flight, which the signal cuts short.
        let out = ingest_signalled(&index, &root, &[], "decode:short_h264.mp4", signal);
        assert_eq!(out.status.code(), Some(code), "{signal}\n{}", stderr_text(&out));
        assert!(stderr_text(&out).contains(&format!("interrupted by {signal}")), "{}", stderr_text(&out));
        let kept = snapshot(&index).unwrap();
        let before = ["nested/deeper/gradient_h264", "rotated90_h264"];
        assert!(!kept.videos.is_empty(), "{signal}: {}", stderr_text(&out));
        assert!(ids(&kept).iter().all(|id| before.contains(id)), "{signal}: {:?}", ids(&kept));
        let not_processed = format!("{} files were not processed", clips.len() - kept.videos.len());
        assert!(stderr_text(&out).contains(&not_processed), "{}", stderr_text(&out));
        assert!(kept.failures.is_empty(), "the file cut short is no failure: {:?}", kept.failures);
        assert_verifies(&index);
        assert!(leftover_journals(&index).is_empty(), "an interruption closes its journal");

        // Interrupted on the same file again: still no quarantine.
        let out = ingest_signalled(&index, &root, &[], "decode:short_h264.mp4", signal);
        assert_eq!(out.status.code(), Some(code), "{}", stderr_text(&out));
        let kept = snapshot(&index).unwrap().videos.len();
        let out = ingest_output(&index, &root, &[], None);
        assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
        let counts = format!("{} new, 0 changed, 0 reused, {kept} unchanged", clips.len() - kept);
        assert!(stderr_text(&out).contains(&counts), "{}", stderr_text(&out));
        assert_same_index(&snapshot(&index).unwrap(), &want, signal);
        assert!(Manifest::load(&index).unwrap().unwrap().suspects.is_empty());
    }
}

/// `clips` three times over, in folders `1`, `2` and `3` of `rel`: more files than the bounded
/// channels and the threads that decode hold, so the first batch comes with files not started.
fn three_copies(dir: &Dir, rel: &str, clips: &[&str]) -> PathBuf {
    for copy in 1..=3 {
        corpus(dir, &format!("{rel}/{copy}"), clips);
    }
    dir.join(rel)
}

#[test]
fn a_signal_during_encoding_or_a_commit_keeps_what_was_finished() {
    let clips = &CLIPS[..4];
    let dir = Dir::new();
    let reference_index = dir.join("reference-index");
    let out = ingest_output(&reference_index, &three_copies(&dir, "reference-videos", clips), &[], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    let want = snapshot(&reference_index).unwrap();
    for (at, extra) in [("encode", &["--batch", "4"][..]), ("manifest-written", &["--commit-every", "1"][..])] {
        let root = three_copies(&dir, &format!("videos-{at}"), clips);
        let index = dir.join(&format!("index-{at}"));
        let out = ingest_signalled(&index, &root, extra, at, "SIGTERM");
        assert_eq!(out.status.code(), Some(143), "{at}\n{}", stderr_text(&out));
        let kept = snapshot(&index).unwrap();
        // Every video the run reports as finished is in the index, as the reference has it.
        let new: usize =
            stderr_text(&out).split("ingest: ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        assert_eq!(kept.videos.len(), new, "{at}: {}", stderr_text(&out));
        assert!(new >= 1, "{at}: {}", stderr_text(&out));
        if at == "encode" {
            // The first batch: the files behind it were dropped, not finished.
            assert!(new < 3 * clips.len(), "{at}: the signal came mid-run ({new} finished)");
        }
        for (id, embedding) in &kept.videos {
            assert_same_bits(embedding, &want.videos[id], &format!("{at}: {id}"));
        }
        assert_verifies(&index);
        let out = ingest_output(&index, &root, &[], None);
        assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
        assert_same_index(&snapshot(&index).unwrap(), &want, at);
    }
}

/// Polls until a new run has a file in flight (a journal that was not there before says so),
/// or panics after 60 s.
fn wait_for_a_file_in_flight(index: &Path, before: &[String]) {
    let started = Instant::now();
    loop {
        let journals = std::fs::read_dir(index.join("runs")).into_iter().flatten().flatten();
        let in_flight = journals
            .filter(|e| e.file_name().to_string_lossy().ends_with(".inflight"))
            .filter(|e| !before.contains(&e.file_name().to_string_lossy().into_owned()))
            .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.starts_with('+')));
        if in_flight {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no file went in flight");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send(child: &std::process::Child, signal: i32) {
    // SAFETY: kill(2) on a child process we started; it touches no memory of ours.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

/// A signal before the first file starts (during the walk, the plan or the model load): no
/// file is started, a changed file keeps its old rows until a run re-indexes it, and the run
/// still ends 130 with nothing blamed.
#[test]
fn a_signal_before_any_file_starts_keeps_what_the_index_had() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..2]);
    let index = dir.join("index");
    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    let before = snapshot(&index).unwrap();
    // One file changes (another clip's bytes under its name), one is new.
    std::fs::copy(fixtures().join("videos/vfr_h264.mp4"), root.join(CLIPS[0])).unwrap();
    corpus(&dir, "videos", &CLIPS[4..5]);

    let out = ingest_signalled(&index, &root, &[], "planned", "SIGINT");
    assert_eq!(out.status.code(), Some(130), "{}", stderr_text(&out));
    assert!(stderr_text(&out).contains("2 files were not processed"), "{}", stderr_text(&out));
    assert_eq!(snapshot(&index).unwrap(), before, "the changed file keeps its old rows");
    assert_verifies(&index);

    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    assert!(stderr_text(&out).contains("1 new, 1 changed, 0 reused, 1 unchanged"), "{}", stderr_text(&out));
}

/// A failed file that changed is queued for a retry; a signal before the retry starts leaves
/// its failure recorded as it was, not forgotten.
#[test]
fn a_failure_queued_for_retry_stays_recorded_when_the_run_is_interrupted() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..1]);
    dir.create("videos/z-broken.mp4", b"not a video");
    let index = dir.join("index");
    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_text(&out));
    // Both change; the walk's order puts the broken file last.
    std::fs::copy(fixtures().join("videos/vfr_h264.mp4"), root.join(CLIPS[0])).unwrap();
    dir.create("videos/z-broken.mp4", b"still not a video");
    let out = ingest_signalled(&index, &root, &[], &format!("decode:{}", CLIPS[0]), "SIGINT");
    assert_eq!(out.status.code(), Some(130), "{}", stderr_text(&out));
    let failures = snapshot(&index).unwrap().failures;
    assert!(failures.contains(&("z-broken.mp4".to_string(), "not_a_video".to_string())), "{failures:?}");
}

/// A real signal from outside, as a scheduler sends it: SIGTERM ends the run within 10 s with
/// its work committed. A second SIGINT stops a run at once (raised right after the first has
/// been seen, so the run cannot finish in between), and twice on the same file in flight it
/// blames no file.
#[test]
fn signals_end_the_run_within_seconds_and_a_second_stops_it_at_once() {
    let dir = Dir::new();
    let root = dir.copy(&sample().join("videos"), "videos");
    let index = dir.join("index");
    let child = TestCommand::new(&["ingest"])
        .arg(&root)
        .arg("--index")
        .arg(&index)
        .arg("--model")
        .arg(sample().join("model"))
        .spawn();
    wait_for_a_file_in_flight(&index, &[]);
    send(&child, libc::SIGTERM);
    let signalled = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(signalled.elapsed() < Duration::from_secs(10), "took {:?}", signalled.elapsed());
    assert_eq!(out.status.code(), Some(143), "{}", stderr_text(&out));
    assert_verifies(&index);

    for _ in 0..2 {
        // A run stopped at once leaves its journal (marked interrupted) for the next run.
        let before = leftover_journals(&index);
        let out = ingest_signalled(&index, &root, &[], "decode:vfr_h264.mp4", "SIGINT*2");
        assert_eq!(out.status.code(), Some(130), "{}", stderr_text(&out));
        assert!(stderr_text(&out).contains("stopped at once"), "{}", stderr_text(&out));
        let after = leftover_journals(&index);
        assert!(after.iter().any(|j| !before.contains(j)), "the stopped run's journal stays, marked: {after:?}");
        assert_verifies(&index);
    }
    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    assert!(!stderr_text(&out).contains("crashed_decoder"), "{}", stderr_text(&out));
    let indexed = snapshot(&index).unwrap();
    assert!(indexed.failures.is_empty(), "{:?}", indexed.failures);
    assert_eq!(indexed.videos.len(), 12);
    assert!(Manifest::load(&index).unwrap().unwrap().suspects.is_empty());
}

#[test]
fn interrupted_encode_text_and_score_leave_no_partial_output() {
    let dir = Dir::new();
    let index = dir.join("index");
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&sample().join("videos")], &[]);
    assert_eq!(code, 0, "{stderr}");
    let captions = sample().join("captions.csv");
    let before = file_tree(&index);
    let out = TestCommand::new(&["encode-text", "--batch", "2"])
        .arg(&captions)
        .arg("--index")
        .arg(&index)
        .env("VTR_INDEX_KILL_AT", "encode:2")
        .env("VTR_INDEX_KILL_WITH", "SIGINT")
        .output();
    assert_eq!(out.status.code(), Some(130), "{}", stderr_text(&out));
    assert!(stderr_text(&out).contains("texts/captions was not changed"), "{}", stderr_text(&out));
    assert_eq!(file_tree(&index), before, "the index is as it was");

    let out = TestCommand::new(&["encode-text"]).arg(&captions).arg("--index").arg(&index).output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    let scores = dir.join("scores");
    let score = || {
        TestCommand::new(&["score", "--texts", "captions", "--dense", "--index"]).arg(&index).arg("--out").arg(&scores)
    };
    let out = score().output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    let before = file_tree(&scores);
    let out = score()
        .args(&["--revise", "dsl"])
        .env("VTR_INDEX_KILL_AT", "scored")
        .env("VTR_INDEX_KILL_WITH", "SIGTERM")
        .output();
    assert_eq!(out.status.code(), Some(143), "{}", stderr_text(&out));
    assert_eq!(file_tree(&scores), before, "the earlier outputs, and no temporary file");
}
