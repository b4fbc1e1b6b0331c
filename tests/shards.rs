//! Many machines (contract §7): a sharded ingest (`--shard I/N`, `--shard auto/N` as Slurm and
//! Kubernetes array tasks set it) merged into one index equal to a single run's, what merge
//! refuses, and a re-merge after a part changed that keeps the merged index's texts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vtr_index::failure::Failure;
use vtr_index::store::{Manifest, VideoRow, read_table};

use crate::tolerance::*;
use crate::util::*;

/// Two roots holding the fixture clips (one of them twice: a `duplicate_id`), a broken file
/// and a nested folder: what a sharded run must split and merge exactly as a single run does.
pub fn two_roots(dir: &Dir) -> (PathBuf, PathBuf) {
    let a = dir.copy(&fixtures().join("videos"), "roots/a");
    std::fs::write(a.join("broken.mp4"), b"not a video at all").unwrap();
    let b = corpus(dir, "roots/b", &["short_h264.mp4", "vfr_h264.mp4"]);
    std::fs::rename(b.join("vfr_h264.mp4"), b.join("vfr_copy.mp4")).unwrap();
    (a, b)
}

pub fn ingest_roots(index: &Path, roots: &[&Path], extra: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut command = TestCommand::new(&["ingest"]);
    for root in roots {
        command = command.arg(root);
    }
    command = command.arg("--index").arg(index).arg("--model").arg(sample().join("model"));
    for e in extra {
        command = command.arg(e);
    }
    for (name, value) in env {
        command = command.env(name, value);
    }
    let out = command.output();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn merge(parts: &[PathBuf], out: &Path) -> (i32, String) {
    let out = parts.iter().fold(TestCommand::new(&["merge"]), |c, p| c.arg(p)).arg("--index").arg(out).output();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// An index's rows without the run-time columns: videos (embedding apart), frames by
/// (video, frame), failures by (root, path) with stage, kind and message.
pub struct Rows {
    videos: BTreeMap<String, VideoRow>,
    frames: BTreeMap<(String, u32), (f64, Vec<f32>)>,
    failures: BTreeMap<(String, String), (String, String, String)>,
}

pub fn rows(index: &Path) -> Rows {
    let manifest = Manifest::load(index).unwrap().expect("an index");
    let videos: Vec<VideoRow> = read_table(index, manifest.shards("videos")).unwrap();
    let failures: Vec<Failure> = read_table(index, manifest.shards("failures")).unwrap();
    let counts = (videos.len(), manifest.rows("frames") as usize, failures.len());
    let rows = Rows {
        videos: videos.into_iter().map(|v| (v.video_id.clone(), v)).collect(),
        frames: snapshot(index).unwrap().frames,
        failures: failures
            .into_iter()
            .map(|f| {
                let what = (format!("{:?}", f.stage), f.kind.as_str().to_string(), f.message);
                ((f.root, f.path), what)
            })
            .collect(),
    };
    // Keyed maps would hide a row held twice (two parts holding one file): none is.
    assert_eq!((rows.videos.len(), rows.frames.len(), rows.failures.len()), counts, "{}: a row twice", index.display());
    rows
}

/// The same rows in every table; frame times equal; embeddings equal to the bit (a part's
/// batches hold other videos' frames than the single run's, which moves no bit on one machine;
/// every test here runs its parts on the machine that runs the single run).
pub fn assert_same_rows(got: &Rows, want: &Rows, what: &str) {
    assert_eq!(got.failures, want.failures, "{what}: failures");
    assert_eq!(got.videos.keys().collect::<Vec<_>>(), want.videos.keys().collect::<Vec<_>>(), "{what}: videos");
    for (id, row) in &got.videos {
        let other = &want.videos[id];
        assert_same_bits(&row.embedding, &other.embedding, &format!("{what}: {id}"));
        let strip = |v: &VideoRow| VideoRow { embedding: Vec::new(), ..v.clone() };
        assert_eq!(strip(row), strip(other), "{what}: {id}");
    }
    assert_eq!(got.frames.keys().collect::<Vec<_>>(), want.frames.keys().collect::<Vec<_>>(), "{what}: frames");
    for (key, (pts, embedding)) in &got.frames {
        let (want_pts, want_embedding) = &want.frames[key];
        assert_eq!(pts, want_pts, "{what}: {key:?}");
        assert_same_bits(embedding, want_embedding, &format!("{what}: {key:?}"));
    }
}

#[test]
fn a_sharded_ingest_merged_equals_a_single_run() {
    let dir = Dir::new();
    let (a, b) = two_roots(&dir);
    let single = dir.join("single");
    let (code, stderr) = ingest_roots(&single, &[&a, &b], &[], &[]);
    assert_eq!(code, 2, "the broken file and the duplicate are failures: {stderr}");
    let parts: Vec<PathBuf> = (0..3).map(|i| dir.join(&format!("part-{i}"))).collect();
    let mut sizes = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let (code, stderr) = ingest_roots(part, &[&a, &b], &["--shard", &format!("{i}/3")], &[]);
        assert!(code == 0 || code == 2, "part {i}: {stderr}");
        sizes.push(rows(part).videos.len());
    }
    assert!(sizes.iter().all(|&n| n > 0), "every part holds some of the 13 videos: {sizes:?}");
    let out = dir.join("merged");
    let (code, stderr) = merge(&parts, &out);
    assert_eq!(code, 0, "{stderr}");
    assert_same_rows(&rows(&out), &rows(&single), "merged vs single");
    let (stdout, _) = TestCommand::new(&["info", "--index"]).arg(&out).expect_code(0);
    assert!(stdout.contains("merged:    3 parts"), "{stdout}");
    assert_verifies(&out);
    // The parts hold no file twice and the merge's shards and segments are links to theirs, not
    // copies; the merged index searches as the single run's.
    let part_videos = Manifest::load(&parts[0]).unwrap().unwrap().shards("videos")[0].clone();
    for file in [&part_videos.path, &part_videos.segment.as_ref().unwrap().path] {
        let linked = std::fs::metadata(parts[0].join(file)).unwrap();
        assert!(std::os::unix::fs::MetadataExt::nlink(&linked) >= 2, "{file} is linked into the merged index");
    }
    let search = |index: &Path| {
        TestCommand::new(&["search", "a fractal", "-k", "20", "--json", "--index"]).arg(index).expect_code(0).0
    };
    assert_eq!(search(&out), search(&single));
    // Scoring the merged index gives the single run's metrics.
    let captions = fixtures().join("videos_captions.csv");
    for index in [&out, &single] {
        TestCommand::new(&["encode-text"]).arg(&captions).arg("--index").arg(index).expect_code(0);
    }
    let metrics = |index: &Path| {
        let scored = dir.join(&format!("scored-{}", index.file_name().unwrap().to_string_lossy()));
        TestCommand::new(&["score", "--index"])
            .arg(index)
            .args(&["--texts", "videos_captions", "--revise", "dsl", "--out"])
            .arg(&scored)
            .expect_code(0);
        let value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(scored.join("metrics.json")).unwrap()).unwrap();
        (value["t2v"].clone(), value["v2t"].clone())
    };
    assert_eq!(metrics(&out), metrics(&single));
}

/// `--shard auto/N` as an Indexed Job runs it: N processes at once, each with its
/// `JOB_COMPLETION_INDEX` (Slurm's `SLURM_ARRAY_TASK_ID` alike), then the merge.
#[test]
fn parts_taken_from_the_scheduler_merge_like_given_ones() {
    let dir = Dir::new();
    let root = corpus(&dir, "root", &["short_h264.mp4", "vfr_h264.mp4", "testsrc2_h264.mp4", "bars_mpeg4.avi"]);
    let parts: Vec<PathBuf> = (0..2).map(|i| dir.join(&format!("part-{i}"))).collect();
    let children: Vec<_> = parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let variable = if i == 0 { "JOB_COMPLETION_INDEX" } else { "SLURM_ARRAY_TASK_ID" };
            TestCommand::new(&["ingest"])
                .arg(&root)
                .arg("--index")
                .arg(part)
                .arg("--model")
                .arg(sample().join("model"))
                .args(&["--shard", "auto/2"])
                .env(variable, &i.to_string())
                .spawn()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = dir.join("merged");
    assert_eq!(merge(&parts, &out).0, 0);
    let given = dir.join("given");
    let (code, stderr) = ingest_roots(&given, &[&root], &[], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_same_rows(&rows(&out), &rows(&given), "auto parts vs one run");
}

#[test]
fn merge_refuses_parts_that_are_not_one_ingest() {
    let dir = Dir::new();
    let root = corpus(&dir, "root", &["short_h264.mp4", "vfr_h264.mp4", "testsrc2_h264.mp4"]);
    let part = |name: &str, shard: &str, extra: &[&str]| {
        let path = dir.join(name);
        let mut args = vec!["--shard", shard];
        args.extend_from_slice(extra);
        let (code, stderr) = ingest_roots(&path, &[&root], &args, &[]);
        assert_eq!(code, 0, "{stderr}");
        path
    };
    let (p0, p1, p2) = (part("p0", "0/3", &[]), part("p1", "1/3", &[]), part("p2", "2/3", &[]));
    let out = dir.join("out");
    let refused = |parts: &[&PathBuf], says: &[&str]| {
        let parts: Vec<PathBuf> = parts.iter().map(|p| (*p).clone()).collect();
        let (code, stderr) = merge(&parts, &out);
        assert_eq!(code, 1, "{stderr}");
        for s in says {
            assert!(stderr.contains(s), "{s:?} in {stderr}");
        }
        assert!(!out.exists(), "a refused merge leaves no index");
    };
    refused(&[&p0, &p2], &["missing part 1/3"]);
    let older = dir.copy(&p1, "p1-format-4");
    as_older_format(&older, 4);
    refused(&[&p0, &older, &p2], &["format 4", "upgrade it first"]);
    refused(&[&p0, &p1, &p1, &p2], &["part 1/3 is given twice"]);
    let p3 = part("p2-frames", "2/3", &["--frames", "4"]);
    refused(&[&p0, &p1, &p3], &["another sampling"]);
    let other_model = other_model(&dir);
    let path = dir.join("p2-model");
    TestCommand::new(&["ingest"])
        .arg(&root)
        .arg("--index")
        .arg(&path)
        .arg("--model")
        .arg(&other_model)
        .args(&["--shard", "2/3"])
        .expect_code(0);
    refused(&[&p0, &p1, &path], &["another model"]);
    let other_root = corpus(&dir, "other-root", &["short_h264.mp4"]);
    let p4 = dir.join("p2-roots");
    assert_eq!(ingest_roots(&p4, &[&other_root], &["--shard", "2/3"], &[]).0, 0);
    refused(&[&p0, &p1, &p4], &["another roots"]);
    let whole = dir.join("whole");
    assert_eq!(ingest_roots(&whole, &[&root], &[], &[]).0, 0);
    refused(&[&p0, &p1, &whole], &["not a part of a sharded ingest"]);

    // What ingest refuses: another part, a whole run on a part, a merged index, auto outside
    // a scheduler.
    let (code, stderr) = ingest_roots(&p0, &[&root], &["--shard", "1/3"], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("part 0/3 of a sharded ingest") && stderr.contains("not 1/3"), "{stderr}");
    let (code, stderr) = ingest_roots(&p0, &[&root], &[], &[]);
    assert_eq!(code, 1, "{stderr}");
    let (code, stderr) = ingest_roots(&whole, &[&root], &["--shard", "1/3"], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("holds every file"), "{stderr}");
    let (_, stderr) = TestCommand::new(&["ingest"])
        .arg(&root)
        .arg("--index")
        .arg(dir.join("auto"))
        .args(&["--shard", "auto/3"])
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .expect_code(1);
    assert!(stderr.contains("SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX"), "{stderr}");
    let (code, stderr) = merge(&[p0.clone(), p1.clone(), p2.clone()], &out);
    assert_eq!(code, 0, "{stderr}");
    let (code, stderr) = ingest_roots(&out, &[&root], &[], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("merged index") && stderr.contains("vtr-index merge"), "{stderr}");
    let (code, stderr) = merge(&[p0, p1, p2], &whole);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("an index that `ingest` writes"), "{stderr}");
}

/// A nightly re-merge: one part changed; the merged index takes its new rows, keeps the other
/// parts' shard files, removes only the changed part's old ones, and keeps its text sets.
#[test]
fn a_re_merge_updates_the_changed_part_and_keeps_the_texts() {
    let dir = Dir::new();
    let root = corpus(&dir, "root", &["short_h264.mp4", "vfr_h264.mp4", "testsrc2_h264.mp4", "bars_mpeg4.avi"]);
    let parts: Vec<PathBuf> = (0..2).map(|i| dir.join(&format!("part-{i}"))).collect();
    let run_parts = || {
        for (i, part) in parts.iter().enumerate() {
            let (code, stderr) = ingest_roots(part, &[&root], &["--shard", &format!("{i}/2")], &[]);
            assert_eq!(code, 0, "{stderr}");
        }
    };
    run_parts();
    let out = dir.join("merged");
    assert_eq!(merge(&parts, &out).0, 0);
    TestCommand::new(&["encode-text"])
        .arg(fixtures().join("videos_captions.csv"))
        .arg("--index")
        .arg(&out)
        .expect_code(0);
    let files =
        |index: &Path| -> Vec<String> { file_tree(index).into_keys().filter(|k| k.ends_with(".parquet")).collect() };
    let before = files(&out);

    // A new file lands in one part; the other part's re-run changes nothing.
    std::fs::copy(fixtures().join("videos/mandelbrot_vp9.webm"), root.join("mandelbrot_vp9.webm")).unwrap();
    let changed = vtr_index::partition::part_of("mandelbrot_vp9", 2) as usize;
    let unchanged_manifest = std::fs::read_to_string(parts[1 - changed].join("manifest.json")).unwrap();
    run_parts();
    assert_eq!(std::fs::read_to_string(parts[1 - changed].join("manifest.json")).unwrap(), unchanged_manifest);
    let (code, stderr) = merge(&parts, &out);
    assert_eq!(code, 0, "{stderr}");
    let after = files(&out);
    let merged_shards = |list: &[String], part: usize| -> Vec<String> {
        list.iter()
            .filter(|f| !f.starts_with("texts/") && f.split('-').nth(2) == Some(&part.to_string()))
            .cloned()
            .collect()
    };
    assert_eq!(
        merged_shards(&after, 1 - changed),
        merged_shards(&before, 1 - changed),
        "the unchanged part's files stay"
    );
    for old in merged_shards(&before, changed) {
        assert!(!after.contains(&old), "{old}: the changed part's old shard is collected");
    }
    let manifest = Manifest::load(&out).unwrap().unwrap();
    assert_eq!(manifest.text_sets(), ["videos_captions"], "the texts survive the re-merge");
    assert!(rows(&out).videos.contains_key("mandelbrot_vp9"));
    TestCommand::new(&["verify", "--index"]).arg(&out).expect_code(0);
    TestCommand::new(&["search", "a fractal", "--index"]).arg(&out).expect_code(0);
}

/// `topk.parquet` as `(text_id, rank, video_id, score)` rows.
fn topk(out: &Path) -> Vec<(u64, u32, String, f64)> {
    use arrow::array::AsArray;
    use arrow::datatypes::{Float64Type, UInt32Type, UInt64Type};
    let mut rows = Vec::new();
    for batch in read_parquet(&out.join("topk.parquet")) {
        let text = batch.column_by_name("text_id").unwrap().as_primitive::<UInt64Type>().clone();
        let rank = batch.column_by_name("rank").unwrap().as_primitive::<UInt32Type>().clone();
        let score = batch.column_by_name("score").unwrap().as_primitive::<Float64Type>().clone();
        for (i, video) in strings(&batch, "video_id").into_iter().enumerate() {
            rows.push((text.value(i), rank.value(i), video, score.value(i)));
        }
    }
    rows
}

/// A split score's outputs against a single score's (contract §7): the same top-k ids in the
/// same order, values within [`SUM_TERMS_RELATIVE`] (sums merged in another order), the same
/// `metrics.json`.
pub fn assert_same_scores(split: &Path, single: &Path, what: &str) {
    let (got, want) = (topk(split), topk(single));
    assert_eq!(got.len(), want.len(), "{what}: top-k rows");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((g.0, g.1, &g.2), (w.0, w.1, &w.2), "{what}: the same top-k in the same order");
        assert!((g.3 - w.3).abs() <= SUM_TERMS_RELATIVE * w.3.abs(), "{what}: {g:?} vs {w:?}");
    }
    // Equal but for the run each belongs to.
    let metrics = |out: &Path| {
        let mut value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
        value.as_object_mut().unwrap().remove("run_id").expect("a run id");
        value
    };
    assert_eq!(metrics(split), metrics(single), "{what}: metrics");
    crate::score::assert_ranks_give_the_metrics(split);
    crate::score::assert_ranks_give_the_metrics(single);
}

/// The score split in three parts by stages, as the array tasks of a scheduler run them (in any
/// order, some twice, on other numbers of threads), gives the single score's `topk.parquet` and
/// `metrics.json` for every revision; a stage run early or after the index changed is refused.
#[test]
fn a_score_split_in_stages_equals_a_single_score() {
    let dir = Dir::new();
    let index = dir.join("index");
    assert_eq!(ingest_roots(&index, &[&sample().join("videos")], &[], &[]).0, 0);
    let captions = sample().join("captions.csv");
    TestCommand::new(&["encode-text"]).arg(&captions).arg("--index").arg(&index).expect_code(0);
    TestCommand::new(&["encode-text"])
        .arg(&captions)
        .arg("--index")
        .arg(&index)
        .args(&["--name", "bank"])
        .expect_code(0);
    let score = |extra: &[&str]| {
        TestCommand::new(&["score", "--index"]).arg(&index).args(&["--texts", "captions", "-k", "5"]).args(extra)
    };
    for revise in ["none", "dsl", "dsl-sym", "qbnorm"] {
        let mut settings = vec!["--revise", revise];
        if revise == "qbnorm" {
            settings.extend(["--bank", "bank"]);
        }
        let single = dir.join(&format!("single-{revise}"));
        score(&settings).arg("--out").arg(&single).expect_code(0);
        let work = dir.join(&format!("work-{revise}"));
        let stage = |name: &str, part: Option<&str>| {
            // Each stage on another number of threads than the single score, as on other nodes.
            let threads = if name == "stats" { "1" } else { "3" };
            let command =
                score(&settings).args(&["--stage", name]).arg("--work").arg(&work).env("RAYON_NUM_THREADS", threads);
            match part {
                Some(part) => command.args(&["--part", part]),
                None => command,
            }
        };
        let (_, stderr) = stage("rank", Some("1/3")).expect_code(1);
        assert!(stderr.contains("needs every part's stats stage done first"), "{stderr}");
        for part in ["2/3", "0/3", "1/3"] {
            stage("stats", Some(part)).expect_code(0);
        }
        let (_, stderr) = stage("stats", Some("0/3")).expect_code(0);
        assert!(stderr.contains("done already"), "{stderr}");
        for part in ["1/3", "0/3", "2/3"] {
            stage("rank", Some(part)).expect_code(0);
        }
        let split = dir.join(&format!("split-{revise}"));
        stage("finish", None).arg("--out").arg(&split).expect_code(0);
        assert_same_scores(&split, &single, revise);
    }
    // The index changed since the stats stage (a new text set): the rank stage refuses.
    let work = dir.join("work-changed");
    let stage = |name: &str, part: &str| {
        score(&["--revise", "dsl"]).args(&["--stage", name, "--part", part]).arg("--work").arg(&work)
    };
    stage("stats", "0/1").expect_code(0);
    TestCommand::new(&["encode-text"])
        .arg(&captions)
        .arg("--index")
        .arg(&index)
        .args(&["--name", "other"])
        .expect_code(0);
    let (_, stderr) = stage("rank", "0/1").expect_code(1);
    assert!(stderr.contains("manifest changed since the stats stage"), "{stderr}");
}

/// `--files-from`: the parts take their files from one list instead of walking the tree
/// (a listed file that is gone is left out, a file not listed is not indexed), and merge into
/// the index a walk gives.
#[test]
fn parts_take_their_files_from_a_list() {
    let dir = Dir::new();
    let root = corpus(
        &dir,
        "root",
        &["short_h264.mp4", "vfr_h264.mp4", "testsrc2_h264.mp4", "nested/deeper/gradient_h264.mp4"],
    );
    std::fs::write(root.join("notes.txt"), "not a video").unwrap();
    let list = dir.join("files.txt");
    let listed =
        "short_h264.mp4\nvfr_h264.mp4\n\ntestsrc2_h264.mp4\nnested/deeper/gradient_h264.mp4\nnotes.txt\ngone.mp4\n";
    std::fs::write(&list, listed).unwrap();
    let list_arg = list.to_string_lossy().into_owned();
    let parts: Vec<PathBuf> = (0..2).map(|i| dir.join(&format!("part-{i}"))).collect();
    for (i, part) in parts.iter().enumerate() {
        let (code, stderr) =
            ingest_roots(part, &[&root], &["--shard", &format!("{i}/2"), "--files-from", &list_arg], &[]);
        assert_eq!(code, 0, "{stderr}");
    }
    let out = dir.join("merged");
    assert_eq!(merge(&parts, &out).0, 0);
    let walked = dir.join("walked");
    assert_eq!(ingest_roots(&walked, &[&root], &[], &[]).0, 0);
    assert_same_rows(&rows(&out), &rows(&walked), "listed parts vs a walk");

    std::fs::write(&list, "short_h264.mp4\n").unwrap();
    let one = dir.join("one");
    assert_eq!(ingest_roots(&one, &[&root], &["--files-from", &list_arg], &[]).0, 0);
    assert_eq!(rows(&one).videos.keys().collect::<Vec<_>>(), ["short_h264"], "only the listed file");
    let (code, stderr) =
        ingest_roots(&dir.join("two"), &[&root, &root.join("nested")], &["--files-from", &list_arg], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("exactly one root"), "{stderr}");
}
