//! Ingest end to end: good videos indexed, hostile files recorded as typed failures, the
//! tables readable with their contract §4 schemas, re-runs and refusals.

use std::collections::HashMap;
use std::path::Path;

use arrow::datatypes::{DataType, TimeUnit};
use gstreamer as gst;
use gstreamer::prelude::*;
use vtr_index::store::{Manifest, VideoRow, read_table};

use crate::util::*;

/// Makes an audio-only Matroska file with GStreamer.
fn write_audio_only(path: &Path) {
    gst::init().unwrap();
    let description = format!(
        "audiotestsrc num-buffers=20 ! audioconvert ! vorbisenc ! matroskamux ! filesink location={}",
        path.display()
    );
    let pipeline = gst::parse::launch(&description).unwrap().downcast::<gst::Pipeline>().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let msg =
        bus.timed_pop_filtered(gst::ClockTime::from_seconds(20), &[gst::MessageType::Eos, gst::MessageType::Error]);
    pipeline.set_state(gst::State::Null).unwrap();
    assert!(matches!(msg.map(|m| m.type_()), Some(gst::MessageType::Eos)), "made the audio-only file");
}

/// The fixture corpus plus one file of every hostile kind; returns the expected failures.
fn hostile_corpus(dir: &Dir) -> HashMap<&'static str, &'static str> {
    let root = dir.copy(&fixtures().join("videos"), "corpus");
    dir.create("corpus/bad/empty.mp4", b"");
    let noise: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    dir.create("corpus/bad/random.mp4", &noise);
    dir.create("corpus/bad/notes.mkv", "this is a text file, not a video\n".repeat(50).as_bytes());
    dir.copy(&fixtures().join("reference/images/carphone_176x144.png"), "corpus/bad/still.mp4");
    write_audio_only(&dir.join("corpus/bad/audio_only.mkv"));
    let whole = std::fs::read(fixtures().join("videos/long_h264.mp4")).unwrap();
    dir.create("corpus/bad/truncated.mp4", &whole[..whole.len() / 2]);
    // The same id as a good video: the first in sorted order wins.
    dir.copy(&fixtures().join("videos/short_h264.mp4"), "corpus/testsrc2_h264.mkv");
    std::os::unix::fs::symlink("..", root.join("bad/loop")).unwrap();
    dir.create("corpus/readme.txt", b"not a video, skipped");
    HashMap::from([
        ("bad/empty.mp4", "empty"),
        ("bad/random.mp4", "not_a_video"),
        ("bad/notes.mkv", "not_a_video"),
        ("bad/still.mp4", "not_a_video"),
        ("bad/audio_only.mkv", "no_video_stream"),
        ("bad/truncated.mp4", "corrupt"),
        ("testsrc2_h264.mp4", "duplicate_id"),
        ("bad/loop", "symlink_loop"),
    ])
}

fn failures_by_path(index: &Path) -> HashMap<String, (String, String)> {
    let manifest = Manifest::load(index).unwrap().unwrap();
    let mut out = HashMap::new();
    for shard in manifest.shards("failures") {
        for batch in read_parquet(&index.join(&shard.path)) {
            let paths = strings(&batch, "path");
            let kinds = strings(&batch, "kind");
            let messages = strings(&batch, "message");
            for ((p, k), m) in paths.into_iter().zip(kinds).zip(messages) {
                out.insert(p, (k, m));
            }
        }
    }
    out
}

fn indexed_ids(index: &Path) -> Vec<String> {
    let manifest = Manifest::load(index).unwrap().unwrap();
    let mut ids: Vec<String> = manifest
        .shards("videos")
        .iter()
        .flat_map(|s| read_parquet(&index.join(&s.path)))
        .flat_map(|b| strings(&b, "video_id"))
        .collect();
    ids.sort();
    ids
}

#[test]
fn hostile_files_become_typed_failures_and_the_run_goes_on() {
    let dir = Dir::new();
    let expected = hostile_corpus(&dir);
    let index = dir.join("index");
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&dir.join("corpus")], &["--decode-timeout", "60"]);
    assert_eq!(code, 2, "{stderr}");

    let ids = indexed_ids(&index);
    assert_eq!(ids.len(), 12, "{ids:?}\n{stderr}");
    assert!(ids.contains(&"nested/deeper/gradient_h264".to_string()));

    let failures = failures_by_path(&index);
    // Two files share the id `testsrc2_h264`: the first in the walk's sorted order is indexed
    // (".mkv" < ".mp4": the copy of short_h264), the other is the duplicate.
    let state = snapshot(&index).unwrap();
    let manifest = Manifest::load(&index).unwrap().unwrap();
    let rows = read_table::<VideoRow>(&index, manifest.shards("videos")).unwrap();
    let winner = rows.iter().find(|r| r.video_id == "testsrc2_h264").unwrap();
    assert_eq!(winner.path, "testsrc2_h264.mkv");
    assert_eq!(state.videos["testsrc2_h264"], state.videos["short_h264"], "the same bytes as short_h264");
    assert!(failures["testsrc2_h264.mp4"].1.contains("testsrc2_h264.mkv"), "{:?}", failures["testsrc2_h264.mp4"]);
    for (path, kind) in &expected {
        let (got, message) =
            failures.get(*path).unwrap_or_else(|| panic!("{path} not in failures: {failures:?}\n{stderr}"));
        assert_eq!(got, kind, "{path}: {message}");
        assert!(!message.is_empty());
        assert!(stderr.contains(&format!("{path}: {kind}")), "stderr names {path}:\n{stderr}");
    }
    assert_eq!(failures.len(), expected.len(), "{failures:?}");
    assert!(!stderr.contains("readme.txt"), "non-video files are skipped silently");
}

#[test]
fn tables_have_the_design_schema_and_are_listed_by_the_manifest() {
    let dir = Dir::new();
    hostile_corpus(&dir);
    let index = dir.join("index");
    ingest_exit_and_stderr(&index, &[&dir.join("corpus")], &[]);
    let manifest = Manifest::load(&index).unwrap().unwrap();
    assert_eq!(manifest.format_version, vtr_index::store::FORMAT_VERSION);
    assert_eq!(manifest.model.embed_dim, 32);
    assert!((manifest.model.logit_scale.exp() - 100.0).abs() < 1e-3);
    assert_eq!(manifest.sampling.max_frames, 12);
    assert_eq!(manifest.model.sha256.len(), 64);
    let embedding = |d| {
        DataType::FixedSizeList(
            std::sync::Arc::new(arrow::datatypes::Field::new_list_field(DataType::Float32, false)),
            d,
        )
    };
    let expect = |table: &str, columns: &[(&str, DataType)]| {
        let shards = manifest.shards(table);
        assert!(!shards.is_empty(), "{table} has shards");
        for shard in shards {
            let batches = read_parquet(&index.join(&shard.path));
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            assert_eq!(rows as u64, shard.rows, "{}", shard.path);
            let schema = batches[0].schema();
            for (name, ty) in columns {
                let field = schema.field_with_name(name).unwrap_or_else(|_| panic!("{table}.{name} missing"));
                assert_eq!(field.data_type(), ty, "{table}.{name}");
            }
        }
    };
    expect(
        "videos",
        &[
            ("video_id", DataType::Utf8),
            ("root", DataType::Utf8),
            ("path", DataType::Utf8),
            ("size_bytes", DataType::UInt64),
            ("mtime_ns", DataType::Int64),
            ("content_hash", DataType::Utf8),
            ("duration_s", DataType::Float64),
            ("width", DataType::UInt32),
            ("height", DataType::UInt32),
            ("fps", DataType::Float64),
            ("n_frames", DataType::UInt32),
            ("stream_index", DataType::UInt32),
            ("embedding", embedding(32)),
        ],
    );
    expect(
        "frames",
        &[
            ("video_id", DataType::Utf8),
            ("frame_index", DataType::UInt32),
            ("pts_s", DataType::Float64),
            ("embedding", embedding(32)),
        ],
    );
    expect(
        "failures",
        &[
            ("root", DataType::Utf8),
            ("path", DataType::Utf8),
            ("stage", DataType::Utf8),
            ("kind", DataType::Utf8),
            ("message", DataType::Utf8),
            ("first_seen", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))),
            ("attempts", DataType::UInt32),
        ],
    );

    // Displayed sizes: the rotated clip is portrait, frame counts follow the sampling.
    let videos: Vec<vtr_index::store::VideoRow> =
        vtr_index::store::read_table(&index, manifest.shards("videos")).unwrap();
    let by_id: HashMap<_, _> = videos.iter().map(|v| (v.video_id.as_str(), v)).collect();
    let rotated = by_id["rotated90_h264"];
    assert_eq!((rotated.width, rotated.height), (160, 240));
    assert_eq!(by_id["long_h264"].n_frames, 12);
    assert_eq!(by_id["short_h264"].n_frames, 1);
    assert!((by_id["long_h264"].duration_s - 20.5).abs() < 0.01, "{}", by_id["long_h264"].duration_s);
    assert_eq!(by_id["carphone_pristine"].content_hash.len(), 64);
}

#[test]
fn rerun_without_changes_commits_nothing_and_keeps_everything() {
    let dir = Dir::new();
    let root = dir.copy(&fixtures().join("videos"), "corpus");
    let index = dir.join("index");
    assert_eq!(ingest_exit_and_stderr(&index, &[&root], &[]).0, 0);
    let first = std::fs::read_to_string(index.join("manifest.json")).unwrap();
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("0 new, 0 changed, 0 reused, 12 unchanged"), "{stderr}");
    assert_eq!(std::fs::read_to_string(index.join("manifest.json")).unwrap(), first);

    // A deleted file is dropped; a copy of an indexed file reuses its rows; the rest stays.
    std::fs::remove_file(root.join("short_h264.mp4")).unwrap();
    dir.copy(&fixtures().join("videos/vfr_h264.mp4"), "corpus/more/vfr_copy.mp4");
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("0 new, 0 changed, 1 reused, 11 unchanged, 1 removed"), "{stderr}");
    let ids = indexed_ids(&index);
    assert!(ids.contains(&"more/vfr_copy".to_string()) && !ids.contains(&"short_h264".to_string()), "{ids:?}");
    assert_eq!(ids.len(), 12);
    TestCommand::new(&["verify", "--index"]).arg(&index).expect_code(0);
}

#[test]
fn missing_root_stops_the_run_and_changes_nothing() {
    let dir = Dir::new();
    let root = dir.copy(&fixtures().join("videos/nested"), "corpus");
    let index = dir.join("index");
    assert_eq!(ingest_exit_and_stderr(&index, &[&root], &[]).0, 0);
    let before = std::fs::read_to_string(index.join("manifest.json")).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert_eq!(std::fs::read_to_string(index.join("manifest.json")).unwrap(), before);
}

#[test]
fn other_sampling_or_no_model_is_refused() {
    let dir = Dir::new();
    let root = dir.copy(&fixtures().join("videos/nested"), "corpus");
    let index = dir.join("index");
    let (_, stderr) = TestCommand::new(&["ingest"]).arg(&root).arg("--index").arg(&index).expect_code(1);
    assert!(stderr.contains("needs --model"), "{stderr}");
    assert_eq!(ingest_exit_and_stderr(&index, &[&root], &[]).0, 0);
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &["--frames", "4"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--frames 12"), "{stderr}");
}

#[test]
fn a_file_past_its_deadline_is_a_timeout_failure_and_the_run_goes_on() {
    let dir = Dir::new();
    let root = dir.copy(&fixtures().join("videos/nested"), "corpus");
    let index = dir.join("index");
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &["--decode-timeout", "0.001"]);
    assert_eq!(code, 2, "{stderr}");
    let failures = failures_by_path(&index);
    assert_eq!(failures["deeper/gradient_h264.mp4"].0, "timeout", "{failures:?}");
    // The failure is retried once the deadline is reasonable again.
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &["--retry-failed"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(indexed_ids(&index), vec!["deeper/gradient_h264".to_string()]);
    assert!(failures_by_path(&index).is_empty());
}

/// A copy of the committed index `tests/data/NAME` as `DIR/index`, with the videos it lists
/// under `DIR/videos` as it saw them: the fixtures' bytes and the recorded modification times.
fn committed_index(dir: &Dir, name: &str) -> std::path::PathBuf {
    let old = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name);
    for (rel, bytes) in file_tree(&old) {
        dir.create(&format!("index/{rel}"), &bytes);
    }
    let index = dir.join("index");
    let manifest = Manifest::load(&index).unwrap().unwrap();
    for row in read_table::<VideoRow>(&index, manifest.shards("videos")).unwrap() {
        let copy = dir.copy(&fixtures().join("videos").join(&row.path), &format!("videos/{}", row.path));
        std::fs::File::open(copy).unwrap().set_modified(mtime(row.mtime_ns)).unwrap();
    }
    index
}

/// A recorded `mtime_ns` as a time to set.
fn mtime(ns: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns as u64)
}

/// An index written in format 1 (before `videos.stream_index`), kept in `tests/data/index-v1`
/// as that version wrote it over `short_h264.mp4` and `bars_mpeg4.avi` under the root `videos`:
/// every reader reads it, and the next ingest moves it to the current format in its commit,
/// keeping every embedding (the old rows' stream is unknown: null).
#[test]
fn an_index_of_format_1_is_read_and_upgraded_by_the_next_ingest() {
    let dir = Dir::new();
    let index = committed_index(&dir, "index-v1");
    let before = snapshot(&index).unwrap();
    assert_eq!(before.videos.len(), 2);
    assert!(before.streams.values().all(Option::is_none), "{:?}", before.streams);
    TestCommand::new(&["verify", "--index"]).arg(&index).expect_code(0);
    TestCommand::new(&["info", "--index"]).arg(&index).expect_code(0);

    let ingest_v1 = || {
        TestCommand::new(&["ingest", "videos", "--index", "index", "--model"])
            .arg(sample().join("model"))
            .current_dir(dir.path())
    };
    // Killed before the upgrading commit lands: still the old index, whole.
    let out = ingest_v1().env("VTR_INDEX_KILL_AT", "manifest-written").output();
    assert_eq!(out.status.code(), None, "killed: {}", stderr_text(&out));
    assert_eq!(Manifest::load(&index).unwrap().unwrap().format_version, 1);
    assert_eq!(snapshot(&index).unwrap(), before);
    TestCommand::new(&["verify", "--index"]).arg(&index).expect_code(0);

    // A run with nothing else to do upgrades all the same.
    let (_, stderr) = ingest_v1().expect_code(0);
    assert!(stderr.contains("0 new, 0 changed, 0 reused, 2 unchanged"), "{stderr}");
    assert_eq!(Manifest::load(&index).unwrap().unwrap().format_version, vtr_index::store::FORMAT_VERSION);
    assert_eq!(snapshot(&index).unwrap(), before);

    dir.copy(&fixtures().join("videos/testsrc2_h264.mp4"), "videos/testsrc2_h264.mp4");
    ingest_v1().expect_code(0);
    let manifest = Manifest::load(&index).unwrap().unwrap();
    assert_eq!(manifest.format_version, vtr_index::store::FORMAT_VERSION);
    let after = snapshot(&index).unwrap();
    assert_eq!(after.streams.len(), 3);
    assert_eq!(after.streams["testsrc2_h264"], Some(0), "a new video records its stream");
    for (id, embedding) in &before.videos {
        assert_eq!(after.streams[id], None, "{id}: not decoded again");
        assert_eq!(&after.videos[id], embedding, "{id}: the embedding is kept as it was");
    }
    for (key, frame) in &before.frames {
        assert_eq!(&after.frames[key], frame, "{key:?}");
    }
    for shard in manifest.shards("videos") {
        let schema = read_parquet(&index.join(&shard.path))[0].schema();
        assert!(schema.field_with_name("stream_index").is_ok(), "{}: upgraded", shard.path);
    }
    let videos = dir.path().join("videos").canonicalize().unwrap().to_str().unwrap().to_string();
    assert_eq!(manifest.roots, [videos], "the root, recorded as typed in format 1, is canonical");
    assert!(manifest.shards("videos").iter().all(|s| s.segment.is_some()), "search segments written");
    assert_verifies(&index);
}

/// An index written in format 2, kept in `tests/data/index-v2` as that version wrote it, run
/// from its folder as `vtr-index ingest videos --index index --model model` over
/// `videos/short_h264.mp4` and a file that is not a video, `videos/broken.mp4`: the root and
/// the model are recorded as typed (relative). The next ingest, run from that folder with
/// nothing to do, makes them canonical in the manifest and in every row that carries them,
/// embeds nothing again and keeps the failure; afterwards every command works from any folder.
#[test]
fn an_index_of_format_2_gets_canonical_paths_from_its_next_writer() {
    let dir = Dir::new();
    let index = committed_index(&dir, "index-v2");
    dir.copy(&sample().join("model"), "model");
    let manifest = Manifest::load(&index).unwrap().unwrap();
    assert_eq!((manifest.format_version, manifest.roots.as_slice()), (2, &["videos".to_string()][..]));
    assert_eq!(manifest.model.source, "model");
    // The failed file as that index saw it: any bytes of its size, its modification time.
    let failures: Vec<vtr_index::failure::Failure> = read_table(&index, manifest.shards("failures")).unwrap();
    assert_eq!(failures.len(), 1);
    let broken = dir.create(&format!("videos/{}", failures[0].path), &vec![b'x'; failures[0].size_bytes as usize]);
    std::fs::File::options().write(true).open(broken).unwrap().set_modified(mtime(failures[0].mtime_ns)).unwrap();
    let before = snapshot(&index).unwrap();

    // A writer run from an unrelated folder that holds another `videos` upgrades the format but
    // keeps the root as recorded: its files are not there.
    let decoy = Dir::new();
    decoy.create("videos/other.mp4", b"not this index's file");
    let copy = decoy.copy(&index, "index");
    let captions = decoy.create("captions.csv", b"video_id,sentence\nshort_h264,a short clip\n");
    TestCommand::new(&["encode-text"])
        .arg(&captions)
        .arg("--index")
        .arg(&copy)
        .arg("--model")
        .arg(dir.join("model"))
        .current_dir(decoy.path())
        .expect_code(0);
    let upgraded = Manifest::load(&copy).unwrap().unwrap();
    assert_eq!(upgraded.format_version, vtr_index::store::FORMAT_VERSION);
    assert_eq!(upgraded.roots, ["videos"], "not the decoy's folder");
    assert_eq!(upgraded.model.source, "model", "no model at the decoy's ./model");

    let (_, stderr) =
        TestCommand::new(&["ingest", "videos", "--index", "index"]).current_dir(dir.path()).expect_code(2);
    assert!(stderr.contains("0 new, 0 changed, 0 reused, 1 unchanged, 0 removed, 1 failed"), "{stderr}");
    let manifest = Manifest::load(&index).unwrap().unwrap();
    assert_eq!(manifest.format_version, vtr_index::store::FORMAT_VERSION);
    let canonical = |rel: &str| dir.path().join(rel).canonicalize().unwrap().to_str().unwrap().to_string();
    assert_eq!(manifest.roots, [canonical("videos")]);
    assert_eq!(manifest.model.source, canonical("model"));
    let videos: Vec<VideoRow> = read_table(&index, manifest.shards("videos")).unwrap();
    let failures: Vec<vtr_index::failure::Failure> = read_table(&index, manifest.shards("failures")).unwrap();
    assert!(videos.iter().all(|v| v.root == canonical("videos")), "{videos:?}");
    assert!(failures.iter().all(|f| f.root == canonical("videos") && f.attempts == 1), "{failures:?}");
    assert_eq!(snapshot(&index).unwrap(), before, "nothing embedded again");

    // From any folder, with the root spelled another way: the same root, nothing to do.
    let elsewhere = Dir::new();
    let (_, stderr) = TestCommand::new(&["ingest"])
        .arg(dir.path().join("index/../videos"))
        .arg("--index")
        .arg(&index)
        .current_dir(elsewhere.path())
        .expect_code(2);
    assert!(stderr.contains("0 new, 0 changed, 0 reused, 1 unchanged, 0 removed"), "{stderr}");
    let (stdout, _) =
        TestCommand::new(&["search", "a clip", "--index"]).arg(&index).current_dir(elsewhere.path()).expect_code(0);
    assert!(stdout.contains("short_h264"), "{stdout}");
}

/// The README's own commands with relative paths (`ingest videos --index index --model
/// model`), then every reader and writer run from another folder (a cron job's home, a
/// notebook): the index records absolute paths, so each finds the model and the roots.
#[test]
fn commands_run_from_another_folder_find_the_model_and_the_roots() {
    let dir = Dir::new();
    corpus(&dir, "videos", &["short_h264.mp4", "bars_mpeg4.avi"]);
    dir.copy(&sample().join("model"), "model");
    let captions = dir.create("captions.csv", b"video_id,sentence\nshort_h264,a short clip\nbars_mpeg4,colour bars\n");
    TestCommand::new(&["ingest", "videos", "--index", "index", "--model", "model"])
        .current_dir(dir.path())
        .expect_code(0);
    let index = dir.join("index");
    let manifest = Manifest::load(&index).unwrap().unwrap();
    let canonical = |rel: &str| dir.path().join(rel).canonicalize().unwrap().to_str().unwrap().to_string();
    assert_eq!(manifest.roots, [canonical("videos")]);
    assert_eq!(manifest.model.source, canonical("model"));

    let elsewhere = Dir::new();
    let run = |args: &[&str]| TestCommand::new(args).current_dir(elsewhere.path());
    run(&["encode-text"]).arg(&captions).arg("--index").arg(&index).expect_code(0);
    run(&["score", "--texts", "captions", "--out", "scores", "--index"]).arg(&index).expect_code(0);
    assert!(elsewhere.join("scores/metrics.json").is_file());
    let (stdout, _) = run(&["search", "colour bars", "--index"]).arg(&index).expect_code(0);
    assert!(stdout.contains("bars_mpeg4"), "{stdout}");
    let (_, stderr) = run(&["ingest"]).arg(dir.join("videos")).arg("--index").arg(&index).expect_code(0);
    assert!(stderr.contains("0 new, 0 changed, 0 reused, 2 unchanged"), "{stderr}");
}

/// Format 4 differs from 3 only in the failure kind `memory_limit`, and 5 from 4 in the search
/// segments beside the `videos` shards: an index of format 3 or 4 (made here by removing the
/// segments and writing the number into a manifest, which is all that tells them apart) is read
/// as it is, searched from its tables, and brought to format 5 by its next writer, which writes
/// the segments from the tables without a shard rewritten; an index of a format newer than this
/// build's is refused by every command, naming the versions.
#[test]
fn an_index_of_format_3_or_4_is_upgraded_in_place_and_a_newer_format_is_refused() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..3]);
    let index = dir.join("index");
    assert_eq!(ingest_output(&index, &root, &[], None).status.code(), Some(0));
    let with_version = |version: u32| {
        let path = index.join("manifest.json");
        let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        manifest["format_version"] = version.into();
        std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    };
    let search = || TestCommand::new(&["search", "a clock", "--json", "--index"]).arg(&index).expect_code(0).0;
    let before = Manifest::load(&index).unwrap().unwrap();
    let searched = search();
    for version in [3, 4] {
        as_older_format(&index, version);
        assert!(!index.join("segments").read_dir().unwrap().any(|_| true));
        TestCommand::new(&["verify", "--deep", "--index"]).arg(&index).expect_code(0);
        // Answered from the tables: the same videos and frames, scores as the segments' within f16.
        assert_same_search(&search(), &searched, f64::from(before.model.logit_scale).exp());
        let out = ingest_output(&index, &root, &[], None);
        assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
        let after = Manifest::load(&index).unwrap().unwrap();
        assert_eq!(after.format_version, vtr_index::store::FORMAT_VERSION);
        assert_eq!(after.tables, before.tables, "no shard rewritten; the segments written again are the same bytes");
        assert_verifies(&index);
        assert_eq!(search(), searched);
    }

    with_version(vtr_index::store::FORMAT_VERSION + 1);
    for command in [&["verify", "--index"][..], &["info", "--index"][..]] {
        let (_, stderr) = TestCommand::new(command).arg(&index).expect_code(1);
        assert!(stderr.contains("is not supported by this vtr-index"), "{stderr}");
    }
    let out = ingest_output(&index, &root, &[], None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_text(&out));
}

/// The failure kinds and stages are the contract's lists (§4), as the tolerances are §6's: a kind
/// added, renamed or dropped on one side fails here.
#[test]
fn the_failure_kinds_and_stages_are_the_contracts() {
    use vtr_index::failure::{FailureKind, Stage};
    let contract = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/contract.md")).unwrap();
    let paragraph =
        contract.split("Failure kinds: ").nth(1).unwrap().split(". Every failure is retried").next().unwrap();
    // The list's items are separated by `;` outside parentheses; each starts with its kind.
    let (mut items, mut item, mut depth) = (Vec::new(), String::new(), 0);
    for c in paragraph.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ';' if depth == 0 => items.push(std::mem::take(&mut item)),
            _ => {}
        }
        if !(c == ';' && depth == 0) {
            item.push(c);
        }
    }
    items.push(item);
    let kinds: Vec<String> = items.iter().map(|i| i.trim().split('`').nth(1).unwrap().to_string()).collect();
    let ours: Vec<String> = FailureKind::ALL.iter().map(|k| k.as_str().to_string()).collect();
    assert_eq!(kinds, ours, "contract §4's failure kinds, in order");
    let stages = contract.split("`stage` (").nth(1).unwrap().split(')').next().unwrap();
    let stages: Vec<&str> = stages.split(", ").collect();
    assert_eq!(stages, Stage::ALL.map(Stage::as_str), "contract §4's failure stages, in order");
}
