//! Nightly jobs: incremental re-runs (add, modify, delete, rename, touch), periodic commits,
//! crash safety under `SIGKILL` at every point of the write path, decoder crashes, the writer
//! lock, and job files.

use std::path::Path;

use vtr_index::store::Manifest;

use crate::util::*;

fn set_mtime(path: &Path, seconds_later: u64) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    file.set_modified(mtime + std::time::Duration::from_secs(seconds_later)).unwrap();
}

#[test]
fn reruns_add_modify_delete_rename_and_touch() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..3]);
    let index = dir.join("index");
    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    let first = snapshot(&index).unwrap();
    assert_eq!(first.videos.len(), 3);

    // Rename: the bytes are known, so the rows are reused under the new id; nothing is decoded.
    std::fs::rename(root.join("short_h264.mp4"), root.join("renamed.mp4")).unwrap();
    let out = ingest_output(&index, &root, &[], None);
    assert!(stderr_text(&out).contains("0 new, 0 changed, 1 reused, 2 unchanged, 1 removed"), "{}", stderr_text(&out));
    let renamed = snapshot(&index).unwrap();
    assert!(!renamed.videos.contains_key("short_h264"));
    assert_eq!(renamed.videos["renamed"], first.videos["short_h264"], "the embedding moved as it was");
    assert_eq!(renamed.frames[&("renamed".to_string(), 0)], first.frames[&("short_h264".to_string(), 0)]);

    // Touch: same bytes, new mtime → reused in place.
    set_mtime(&root.join("rotated90_h264.mp4"), 60);
    let out = ingest_output(&index, &root, &[], None);
    assert!(stderr_text(&out).contains("0 new, 0 changed, 1 reused, 2 unchanged, 0 removed"), "{}", stderr_text(&out));
    assert_eq!(snapshot(&index).unwrap().videos["rotated90_h264"], first.videos["rotated90_h264"]);

    // Modify: other bytes under the same name replace the old rows.
    std::fs::copy(fixtures().join("videos/vfr_h264.mp4"), root.join("rotated90_h264.mp4")).unwrap();
    let out = ingest_output(&index, &root, &[], None);
    assert!(stderr_text(&out).contains("0 new, 1 changed, 0 reused, 2 unchanged"), "{}", stderr_text(&out));
    let modified = snapshot(&index).unwrap();
    assert!(cosine(&modified.videos["rotated90_h264"], &first.videos["rotated90_h264"]) < 0.999);

    // Add and delete.
    std::fs::remove_file(root.join("renamed.mp4")).unwrap();
    dir.copy(&fixtures().join("videos/bars_mpeg4.avi"), "videos/bars_mpeg4.avi");
    let out = ingest_output(&index, &root, &[], None);
    assert!(stderr_text(&out).contains("1 new, 0 changed, 0 reused, 2 unchanged, 1 removed"), "{}", stderr_text(&out));
    let last = snapshot(&index).unwrap();
    assert_eq!(last.videos.keys().collect::<Vec<_>>(), ["bars_mpeg4", "nested/deeper/gradient_h264", "rotated90_h264"]);
    assert!(last.frames.keys().all(|(id, _)| last.videos.contains_key(id)), "no orphan frames");
    TestCommand::new(&["verify", "--index"]).arg(&index).expect_code(0);
}

/// Every failure-injection point of the write path, each hit early and late. After the kill
/// the index must open, verify, and hold exactly a committed state (the one before the run,
/// or a periodic commit of it: only whole videos, each as an uninterrupted run makes it); a
/// re-run must then end where an uninterrupted run ends.
#[test]
fn sigkill_at_any_point_keeps_the_last_commit_and_a_rerun_completes() {
    let reference_dir = Dir::new();
    let reference_root = corpus(&reference_dir, "videos", &CLIPS);
    let reference_index = reference_dir.join("index");
    let out = ingest_output(&reference_index, &reference_root, &[], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    let reference = snapshot(&reference_index).unwrap();

    let points = [
        ("decode:vfr_h264.mp4", false),
        ("shard-written", true),
        ("shard-written:3", false),
        ("shard-renamed", true),
        ("shard-renamed:4", false),
        ("manifest-written", true),
        ("manifest-written:2", false),
        ("committed", false),
    ];
    for (point, nothing_committed_yet) in points {
        let dir = Dir::new();
        // The index before the run: two videos, committed by an earlier run.
        let root = corpus(&dir, "videos", &CLIPS[..2]);
        let index = dir.join("index");
        assert_eq!(ingest_output(&index, &root, &[], None).status.code(), Some(0));
        let before = snapshot(&index).unwrap();
        corpus(&dir, "videos", &CLIPS[2..]);

        // One frame per model batch, so each video finishes, and is committed, on its own.
        let out = ingest_output(&index, &root, &["--commit-every", "1", "--batch", "1"], Some(point));
        assert_eq!(out.status.code(), None, "{point}: the process was killed\n{}", stderr_text(&out));
        TestCommand::new(&["verify", "--index"]).arg(&index).expect_code(0);
        let after = snapshot(&index).unwrap();
        for (id, embedding) in &before.videos {
            assert_eq!(after.videos.get(id), Some(embedding), "{point}: {id} was indexed and must stay");
        }
        for (id, embedding) in &after.videos {
            assert_same_bits(embedding, &reference.videos[id], &format!("{point}: {id}"));
            let frames = after.frames.keys().filter(|(v, _)| v == id).count();
            let want = reference.frames.keys().filter(|(v, _)| v == id).count();
            assert_eq!(frames, want, "{point}: {id} has all its frames or none");
        }
        if nothing_committed_yet {
            assert_eq!(after, before, "{point}: killed before the first commit");
        }

        let out = ingest_output(&index, &root, &[], None);
        assert_eq!(out.status.code(), Some(0), "{point}: re-run\n{}", stderr_text(&out));
        assert_same_index(&snapshot(&index).unwrap(), &reference, point);
        let leftovers: Vec<_> = ["videos", "frames", "failures"]
            .iter()
            .flat_map(|t| std::fs::read_dir(index.join(t)).unwrap())
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{point}: temporary files collected");
    }
}

/// A file the process dies on twice is set aside as `crashed_decoder`; everything else is
/// indexed, and `--retry-failed` tries it again.
#[test]
fn a_file_in_flight_at_two_crashes_is_a_crashed_decoder_failure() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..3]);
    let index = dir.join("index");
    for crash in 1..=2 {
        let out = ingest_output(&index, &root, &[], Some("decode:rotated90_h264.mp4"));
        assert_eq!(out.status.code(), None, "crash {crash}");
    }
    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_text(&out));
    assert!(stderr_text(&out).contains("rotated90_h264.mp4: crashed_decoder"), "{}", stderr_text(&out));
    let state = snapshot(&index).unwrap();
    assert_eq!(state.videos.keys().collect::<Vec<_>>(), ["nested/deeper/gradient_h264", "short_h264"]);
    assert!(state.failures.contains(&("rotated90_h264.mp4".to_string(), "crashed_decoder".to_string())));
    let manifest = Manifest::load(&index).unwrap().unwrap();
    assert!(manifest.suspects.is_empty(), "the crash counts became the failure: {:?}", manifest.suspects);

    // Unchanged, it stays set aside; retried on request, it indexes (it never really crashed).
    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(2));
    let out = ingest_output(&index, &root, &["--retry-failed"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    assert_eq!(snapshot(&index).unwrap().videos.len(), 3);
}

/// A crash blames every file in flight; from then on each of them is decoded alone, so the next
/// crash blames only the file it happens on.
#[test]
fn a_file_beside_a_crash_is_not_blamed_for_the_next_one() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..3]);
    let index = dir.join("index");
    // Four workers take the three files at once: without the rule, the others are in flight
    // when the crash comes.
    let workers = ["--decode-workers", "4"];
    let crashing = "rotated90_h264.mp4";
    let out = ingest_output(&index, &root, &workers, Some(&format!("decode:{crashing}")));
    assert_eq!(out.status.code(), None);
    // The first crash had every file in flight, whichever the workers had started.
    let journal = std::fs::read_dir(index.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "inflight"))
        .expect("the crashed run's journal");
    let text = std::fs::read_to_string(&journal).unwrap();
    let started = text.lines().find(|l| l.starts_with('+') && l.ends_with(crashing)).expect(&text);
    let root_name = started[1..].split('\t').next().unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).open(&journal).unwrap();
    for clip in &CLIPS[..3] {
        std::io::Write::write_all(&mut file, format!("+{root_name}\t{clip}\n").as_bytes()).unwrap();
    }

    let out = ingest_output(&index, &root, &workers, Some(&format!("decode:{crashing}")));
    assert_eq!(out.status.code(), None);
    let out = ingest_output(&index, &root, &workers, None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_text(&out));
    let state = snapshot(&index).unwrap();
    let failures: Vec<_> = state.failures.iter().cloned().collect();
    assert_eq!(failures, [(crashing.to_string(), "crashed_decoder".to_string())], "{}", stderr_text(&out));
    assert_eq!(state.videos.keys().collect::<Vec<_>>(), ["nested/deeper/gradient_h264", "short_h264"]);
}

#[test]
fn one_crash_is_forgiven_and_the_file_retried() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..2]);
    let index = dir.join("index");
    assert_eq!(ingest_output(&index, &root, &[], Some("decode:short_h264.mp4")).status.code(), None);
    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    assert_eq!(snapshot(&index).unwrap().videos.len(), 2);
    assert!(Manifest::load(&index).unwrap().unwrap().suspects.is_empty());
    let journals = std::fs::read_dir(index.join("runs")).unwrap();
    assert!(journals.filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "inflight")).count() == 0);
}

#[test]
fn a_second_writer_is_refused_and_a_stale_lock_taken_over() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..1]);
    let index = dir.join("index");
    assert_eq!(ingest_output(&index, &root, &[], None).status.code(), Some(0));
    corpus(&dir, "videos", &CLIPS[1..2]);
    let held = vtr_index::store::WriterLock::acquire(&index, "ingest").unwrap();
    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_text(&out).contains("another writer holds this index"), "{}", stderr_text(&out));
    drop(held);
    // A writer killed while holding the lock leaves its description behind; the next one
    // takes over and says so.
    assert_eq!(ingest_output(&index, &root, &[], Some("decode:rotated90_h264.mp4")).status.code(), None);
    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
    assert!(stderr_text(&out).contains("took over the lock"), "{}", stderr_text(&out));
}

#[test]
fn a_named_pipe_with_a_video_extension_cannot_hang_the_run() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..1]);
    let fifo = root.join("stuck.mp4");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path we own.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
    let index = dir.join("index");
    let started = std::time::Instant::now();
    let out = ingest_output(&index, &root, &["--decode-timeout", "3"], None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_text(&out));
    assert!(started.elapsed().as_secs() < 60);
    let state = snapshot(&index).unwrap();
    assert_eq!(state.videos.len(), 1);
    let kind = state.failures.iter().find(|(p, _)| p == "stuck.mp4").map(|(_, k)| k.clone());
    assert_eq!(kind.as_deref(), Some("io"), "not a regular file, found by the walk: {:?}", state.failures);
}

#[test]
fn a_run_report_counts_and_times_every_stage() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..2]);
    let index = dir.join("index");
    let out = ingest_output(&index, &root, &["--commit-every", "1"], None);
    assert_eq!(out.status.code(), Some(0));
    let manifest = Manifest::load(&index).unwrap().unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(index.join(manifest.last_run.unwrap())).unwrap()).unwrap();
    assert_eq!(report["new"], 2);
    assert_eq!(report["commits"], 3, "one per file and the last: {report}");
    // One decode worker: no stage's time (summed over its threads) can exceed the run's, but
    // decoding's, which the low-priority worker's slot adds to.
    let wall = report["wall_s"].as_f64().unwrap();
    let threads = |stage: &str| if stage == "decode" { 2.0 } else { 1.0 };
    let stages = ["walk", "plan", "decode", "decode_waiting", "encode", "encode_waiting", "write", "build_model"];
    for stage in stages {
        let seconds = report["stage_seconds"][stage].as_f64().unwrap_or_else(|| panic!("{stage}: {report}"));
        assert!((0.0..=wall * threads(stage)).contains(&seconds), "{stage}: {seconds} s of a {wall} s run");
    }
    for stage in ["decode", "encode", "build_model"] {
        assert!(report["stage_seconds"][stage].as_f64().unwrap() > 0.0, "{stage} did work: {report}");
    }
    // The timeline holds the same seconds, slot by slot, and the process's CPU time.
    let timeline = &report["timeline"];
    let slot = timeline["slot_s"].as_f64().unwrap();
    let column = |name: &str| -> Vec<f64> {
        let values = timeline[name].as_array().unwrap_or_else(|| panic!("{name}: {timeline}"));
        values.iter().map(|v| v.as_f64().unwrap()).collect()
    };
    for stage in &stages[2..] {
        let slots = column(stage);
        let total: f64 = slots.iter().sum();
        let seconds = report["stage_seconds"][stage].as_f64().unwrap();
        assert!(
            (total - seconds).abs() <= 0.001 * slots.len() as f64,
            "{stage}: {total} s in {slots:?}, {seconds} s in all"
        );
        assert!(
            slots.iter().all(|&s| (0.0..=slot * threads(stage) + 0.001).contains(&s)),
            "{stage}: {} threads, {slot} s slots: {slots:?}",
            threads(stage)
        );
        assert!(
            slots.len() as f64 * slot <= wall + slot,
            "{stage}: {} slots of {slot} s in a {wall} s run",
            slots.len()
        );
    }
    let cpu: f64 = column("cpu").iter().sum();
    assert!(
        cpu > 0.0 && cpu >= report["stage_seconds"]["encode"].as_f64().unwrap() * 0.5,
        "{cpu} s of CPU: {timeline}"
    );
    let frames = snapshot(&index).unwrap().frames.len() as f64;
    assert_eq!(report["frames"].as_f64().unwrap(), frames);
    let rate = report["frames_per_s"].as_f64().unwrap();
    assert!((rate - frames / wall).abs() <= 1e-6 * rate.max(1.0), "{rate} frames/s, {frames} frames in {wall} s");
}

#[test]
fn a_job_file_runs_ingest_encode_text_and_score() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..3]);
    let captions = dir.create(
        "captions.csv",
        b"video_id,sentence\nshort_h264,a short clip\nrotated90_h264,a rotated clip\nnested/deeper/gradient_h264,a gradient\n",
    );
    // Paths relative to the job file's folder, run from another folder (a cron job's home).
    let job = format!(
        "[ingest]\nroots = [\"videos\"]\nindex = \"index\"\nmodel = {model:?}\n\n[encode_text]\ncaptions = \"captions.csv\"\n\n[score]\ntexts = \"captions\"\nrevise = \"dsl\"\nout = \"scores\"\n",
        model = sample().join("model").to_str().unwrap(),
    );
    assert!(root.ends_with("videos") && captions.ends_with("captions.csv"));
    let job = dir.create("nightly.toml", job.as_bytes());
    let elsewhere = Dir::new();
    TestCommand::new(&["run"]).arg(&job).current_dir(elsewhere.path()).expect_code(0);
    assert!(std::fs::read_dir(elsewhere.path()).unwrap().next().is_none(), "nothing written where it ran");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("scores/metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["t2v"]["n"], 3);
    assert_eq!(metrics["revise"], "dsl");

    let bad = dir.create("bad.toml", b"[ingest]\nroots = [\"/x\"]\nindex = \"/i\"\nfps_sample = 2\n");
    let (_, stderr) = TestCommand::new(&["run"]).arg(&bad).expect_code(1);
    assert!(stderr.contains("unknown key \"fps_sample\""), "{stderr}");
}

/// An I/O error (a full disk here; the step does not care which) at every write step of an
/// ingest: the run fails with exit 1 naming it, the index is exactly its last commit, or at
/// the folder sync after the manifest's rename the new one whole; a re-run completes. Every
/// step is reached at least once, so the loop cannot pass by missing them.
#[test]
fn an_io_error_at_any_write_step_leaves_the_last_commit_and_a_rerun_completes() {
    let reference_dir = Dir::new();
    let reference_root = corpus(&reference_dir, "videos", &CLIPS[..3]);
    let reference_index = reference_dir.join("index");
    assert_eq!(ingest_output(&reference_index, &reference_root, &[], None).status.code(), Some(0));
    let reference = snapshot(&reference_index).unwrap();

    for step in ["write", "sync", "rename", "sync-dir"] {
        let mut failed_runs = 0;
        for hit in 1.. {
            let dir = Dir::new();
            let root = corpus(&dir, "videos", &CLIPS[..2]);
            let index = dir.join("index");
            assert_eq!(ingest_output(&index, &root, &[], None).status.code(), Some(0));
            let before = snapshot(&index).unwrap();
            corpus(&dir, "videos", &CLIPS[2..3]);
            let out = ingest_command(&index, &root, &[]).env("VTR_INDEX_FAIL_AT", &format!("{step}:{hit}")).output();
            if out.status.code() == Some(0) {
                break; // fewer than `hit` such steps in a run
            }
            failed_runs += 1;
            let what = format!("{step}:{hit}");
            assert_eq!(out.status.code(), Some(1), "{what}\n{}", stderr_text(&out));
            assert!(stderr_text(&out).contains("No space left on device"), "{what}: {}", stderr_text(&out));
            TestCommand::new(&["verify", "--index"]).arg(&index).expect_code(0);
            let after = snapshot(&index).unwrap();
            if after != before {
                // Only once the new manifest is renamed into place: then it is whole.
                assert_eq!(step, "sync-dir", "{what}: the index is its last commit");
                assert_same_index(&after, &reference, &what);
            }
            let out = ingest_output(&index, &root, &[], None);
            assert_eq!(out.status.code(), Some(0), "{what}: re-run\n{}", stderr_text(&out));
            assert_same_index(&snapshot(&index).unwrap(), &reference, &what);
            assert!(own_temporaries(&index).is_empty(), "{what}: {:?}", own_temporaries(&index));
        }
        assert!(failed_runs > 0, "{step}: no ingest step of this kind was reached");
    }
}

/// An I/O error at every write step of `score` leaves its output folder with all of the
/// earlier run's outputs and nothing else, or (at the folder sync after the renames) all of
/// the new run's.
#[test]
fn an_io_error_at_any_write_step_of_score_leaves_the_outputs_whole() {
    let dir = Dir::new();
    let index = dir.join("index");
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&sample().join("videos")], &[]);
    assert_eq!(code, 0, "{stderr}");
    TestCommand::new(&["encode-text"]).arg(sample().join("captions.csv")).arg("--index").arg(&index).expect_code(0);
    let score = |out: &Path| {
        TestCommand::new(&["score", "--texts", "captions", "--dense", "--index"]).arg(&index).arg("--out").arg(out)
    };
    let scores = dir.join("scores");
    score(&scores).expect_code(0);
    let old = file_tree(&scores);
    let fresh = dir.join("fresh");
    score(&fresh).args(&["--revise", "dsl"]).expect_code(0);
    let new = file_tree(&fresh);
    assert_ne!(old, new);
    for step in ["write", "sync", "rename", "sync-dir"] {
        let mut failed_runs = 0;
        for hit in 1.. {
            let what = format!("{step}:{hit}");
            let out = score(&scores).args(&["--revise", "dsl"]).env("VTR_INDEX_FAIL_AT", &what).output();
            if out.status.code() == Some(0) {
                assert_eq!(file_tree(&scores), new, "{what}");
                score(&scores).expect_code(0); // back to the old outputs
                break;
            }
            failed_runs += 1;
            assert_eq!(out.status.code(), Some(1), "{what}\n{}", stderr_text(&out));
            let tree = file_tree(&scores);
            assert!(
                tree == old || (step == "sync-dir" && tree == new),
                "{what}: {:?}",
                tree.keys().collect::<Vec<_>>()
            );
            if tree == new {
                score(&scores).expect_code(0);
            }
        }
        assert!(failed_runs > 0, "{step}: no score step of this kind was reached");
    }
}

/// Files of the index named as this crate's temporaries.
fn own_temporaries(index: &Path) -> Vec<String> {
    file_tree(index).into_keys().filter(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with(".tmp-"))).collect()
}
