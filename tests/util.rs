//! Helpers shared by the integration tests: temporary folders, the binary, fixtures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Float64Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use vtr_index::store::{FrameRow, Manifest, VideoRow, read_table};

/// The fixtures (`tests/fixtures/`, see its README), or `VTR_INDEX_FIXTURES` where a test
/// binary runs away from its checkout (the GPU machines).
pub fn fixtures() -> PathBuf {
    std::env::var_os("VTR_INDEX_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

/// The bundled sample corpus and model.
pub fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sample")
}

/// A temporary folder that disappears with the test.
pub struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir { tmp: tempfile::tempdir().expect("a temporary folder") }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Writes a file, creating its folders.
    pub fn create(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let path = self.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Copies a file or a folder tree into this folder under `rel`.
    pub fn copy(&self, from: &Path, rel: &str) -> PathBuf {
        let to = self.join(rel);
        copy_tree(from, &to);
        to
    }
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

/// The `vtr-index` binary with arguments, run to completion.
pub struct TestCommand {
    cmd: Command,
}

impl TestCommand {
    pub fn new(args: &[&str]) -> TestCommand {
        TestCommand::of_binary(Path::new(env!("CARGO_BIN_EXE_vtr-index")), args)
    }

    /// Another build of the binary (the `--no-default-features` one, say).
    pub fn of_binary(binary: &Path, args: &[&str]) -> TestCommand {
        let mut cmd = Command::new(binary);
        cmd.args(args);
        TestCommand { cmd }
    }

    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> TestCommand {
        self.cmd.arg(arg);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> TestCommand {
        self.cmd.env(key, value);
        self
    }

    /// Runs the command without the variable `key`, whatever the test runner's environment.
    pub fn env_remove(mut self, key: &str) -> TestCommand {
        self.cmd.env_remove(key);
        self
    }

    /// Runs the command from `dir` (relative roots are resolved against it).
    pub fn current_dir(mut self, dir: &Path) -> TestCommand {
        self.cmd.current_dir(dir);
        self
    }

    pub fn args(mut self, args: &[&str]) -> TestCommand {
        self.cmd.args(args);
        self
    }

    /// Runs the command in a process group of its own, as a terminal runs a foreground job.
    pub fn own_process_group(mut self) -> TestCommand {
        std::os::unix::process::CommandExt::process_group(&mut self.cmd, 0);
        self
    }

    /// Starts the command with stderr captured, for a test that signals it while it runs.
    pub fn spawn(mut self) -> std::process::Child {
        self.cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
        self.cmd.spawn().expect("the binary starts")
    }

    /// Runs with stdout a pipe whose reader is already gone (`… | head -1` once head is done).
    pub fn output_to_a_closed_pipe(mut self) -> Output {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        self.cmd.stdout(writer).stderr(std::process::Stdio::piped());
        self.cmd.spawn().expect("the binary starts").wait_with_output().unwrap()
    }

    /// Runs with stderr a pipe whose reader is already gone (`… 2>&1 | head` once head is done).
    pub fn stderr_to_a_closed_pipe(mut self) -> std::process::ExitStatus {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        self.cmd.stdout(std::process::Stdio::null()).stderr(writer);
        self.cmd.status().expect("the binary starts")
    }

    pub fn output(mut self) -> Output {
        self.cmd.output().expect("the binary runs")
    }

    /// Runs and asserts the exit code; returns stdout and stderr.
    pub fn expect_code(self, code: i32) -> (String, String) {
        let out = self.output();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "exit code\nstdout:\n{stdout}\nstderr:\n{stderr}");
        (stdout, stderr)
    }
}

/// Every file under `dir` with its bytes, by path relative to `dir`: what a test compares
/// before and after a command to prove it touched none of them.
pub fn file_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                files.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// Every record batch of a Parquet file.
pub fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap().map(|b| b.unwrap()).collect()
}

pub fn strings(batch: &RecordBatch, name: &str) -> Vec<String> {
    let a = batch.column_by_name(name).unwrap().as_string::<i32>();
    (0..a.len()).map(|i| a.value(i).to_string()).collect()
}

/// A `list<double>` column as one vector per row, in f32.
pub fn double_lists_as_f32(batch: &RecordBatch, name: &str) -> Vec<Vec<f32>> {
    let lists = batch.column_by_name(name).unwrap().as_list::<i32>();
    (0..lists.len())
        .map(|i| lists.value(i).as_primitive::<Float64Type>().values().iter().map(|&v| v as f32).collect())
        .collect()
}

/// A `list<list<double>>` column.
pub fn double_list_lists_as_f32(batch: &RecordBatch, name: &str) -> Vec<Vec<Vec<f32>>> {
    let lists = batch.column_by_name(name).unwrap().as_list::<i32>();
    (0..lists.len())
        .map(|i| {
            let inner = lists.value(i);
            let inner = inner.as_list::<i32>();
            (0..inner.len())
                .map(|j| inner.value(j).as_primitive::<Float64Type>().values().iter().map(|&v| v as f32).collect())
                .collect()
        })
        .collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "embedding widths differ");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Ingests `roots` into `index` with the bundled tiny model and returns the exit code.
pub fn ingest_exit_and_stderr(index: &Path, roots: &[&Path], extra: &[&str]) -> (i32, String) {
    let mut cmd = TestCommand::new(&["ingest"]);
    for root in roots {
        cmd = cmd.arg(root);
    }
    cmd = cmd.arg("--index").arg(index).arg("--model").arg(sample().join("model"));
    for e in extra {
        cmd = cmd.arg(e);
    }
    let out = cmd.output();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A NumPy `.npy` array (little-endian `<f4`, `<f8` or `<i8`, C order) as f64 values and its shape.
pub fn read_npy(path: &Path) -> (Vec<f64>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: not an npy file", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape_text = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> =
        shape_text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let data = &bytes[start + header_len..];
    let values: Vec<f64> = if header.contains("'<f4'") {
        data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
    } else if header.contains("'<f8'") {
        data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
    } else if header.contains("'<i8'") {
        data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
    } else {
        panic!("{}: unsupported dtype in {header}", path.display())
    };
    assert_eq!(values.len(), shape.iter().product::<usize>());
    (values, shape)
}

/// Small, quick clips of the fixture corpus.
pub const CLIPS: [&str; 5] =
    ["short_h264.mp4", "rotated90_h264.mp4", "nested/deeper/gradient_h264.mp4", "vfr_h264.mp4", "bars_mpeg4.avi"];

/// The sample model with one weight changed: the same architecture, another model (its SHA-256
/// differs), in `DIR/other-model`.
pub fn other_model(dir: &Dir) -> PathBuf {
    let other = dir.copy(&sample().join("model"), "other-model");
    let weights = other.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&weights, bytes).unwrap();
    other
}

/// Copies `clips` into `DIR/rel`, writable (the fixtures are read-only).
pub fn corpus(dir: &Dir, rel: &str, clips: &[&str]) -> PathBuf {
    for clip in clips {
        let to = dir.copy(&fixtures().join("videos").join(clip), &format!("{rel}/{clip}"));
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }
    dir.join(rel)
}

/// What an index holds, as its manifest lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub videos: BTreeMap<String, Vec<f32>>,
    pub frames: BTreeMap<(String, u32), (f64, Vec<f32>)>,
    pub failures: BTreeSet<(String, String)>,
    /// The container stream each video was indexed from.
    pub streams: BTreeMap<String, Option<u32>>,
}

pub fn snapshot(index: &Path) -> Option<Snapshot> {
    let manifest = Manifest::load(index).unwrap()?;
    let videos: Vec<VideoRow> = read_table(index, manifest.shards("videos")).unwrap();
    let frames: Vec<FrameRow> = read_table(index, manifest.shards("frames")).unwrap();
    let failures: Vec<vtr_index::failure::Failure> = read_table(index, manifest.shards("failures")).unwrap();
    Some(Snapshot {
        streams: videos.iter().map(|v| (v.video_id.clone(), v.stream_index)).collect(),
        videos: videos.into_iter().map(|v| (v.video_id, v.embedding)).collect(),
        frames: frames.into_iter().map(|f| ((f.video_id, f.frame_index), (f.pts_s, f.embedding))).collect(),
        failures: failures.into_iter().map(|f| (f.path, f.kind.as_str().to_string())).collect(),
    })
}

/// Two embeddings with the same bits (contract §6: on one machine, whatever the batching).
pub fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(got) == bits(want), "{what}: other bits (cosine {})", cosine(got, want));
}

/// `got` holds the same videos and frames as `want` (batches may be composed differently), with
/// the same frame times and embeddings equal to the bit, as runs on one machine give.
pub fn assert_same_index(got: &Snapshot, want: &Snapshot, what: &str) {
    assert_same_index_within(got, want, what, None);
}

/// As [`assert_same_index`], with embeddings at cosine ≥ `cosine` where given instead of equal
/// bits: indexes made by other products (another CPU kind, or the build without OpenBLAS).
pub fn assert_same_index_within(got: &Snapshot, want: &Snapshot, what: &str, cosine_at_least: Option<f64>) {
    let same = |got: &[f32], want: &[f32], what: String| match cosine_at_least {
        None => assert_same_bits(got, want, &what),
        Some(bound) => {
            let c = cosine(got, want);
            assert!(c >= bound, "{what}: cosine {c}");
        }
    };
    assert_eq!(got.videos.keys().collect::<Vec<_>>(), want.videos.keys().collect::<Vec<_>>(), "{what}: videos");
    assert_eq!(got.frames.keys().collect::<Vec<_>>(), want.frames.keys().collect::<Vec<_>>(), "{what}: frames");
    assert_eq!(got.failures, want.failures, "{what}: failures");
    assert_eq!(got.streams, want.streams, "{what}: streams");
    for (id, embedding) in &got.videos {
        same(embedding, &want.videos[id], format!("{what}: {id}"));
    }
    for (key, (pts, embedding)) in &got.frames {
        let (want_pts, want_embedding) = &want.frames[key];
        assert_eq!(pts, want_pts, "{what}: {key:?}");
        same(embedding, want_embedding, format!("{what}: {key:?}"));
    }
}

/// `ingest ROOT --index INDEX` with the sample model and one decode worker (beside the
/// low-priority one every run has), unless `extra` asks for another count.
pub fn ingest_command(index: &Path, root: &Path, extra: &[&str]) -> TestCommand {
    let workers: &[&str] = if extra.contains(&"--decode-workers") { &[] } else { &["--decode-workers", "1"] };
    TestCommand::new(&["ingest"])
        .arg(root)
        .arg("--index")
        .arg(index)
        .arg("--model")
        .arg(sample().join("model"))
        .args(workers)
        .args(extra)
}

pub fn ingest_output(index: &Path, root: &Path, extra: &[&str], kill_at: Option<&str>) -> Output {
    let mut cmd = ingest_command(index, root, extra);
    if let Some(point) = kill_at {
        cmd = cmd.env("VTR_INDEX_KILL_AT", point);
    }
    cmd.output()
}

/// `verify --deep` passes: every listed file is whole, and every search segment holds what its
/// shard and the frames table hold.
pub fn assert_verifies(index: &Path) {
    let out = TestCommand::new(&["verify", "--deep", "--index"]).arg(index).output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_text(&out));
}

/// Makes `index` what a build of format `version` (< 5) wrote: no search segments (their
/// entries and files removed) and that version in its manifest.
pub fn as_older_format(index: &Path, version: u32) {
    let path = index.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["format_version"] = version.into();
    for shard in manifest["tables"]["videos"].as_array_mut().unwrap() {
        let segment = shard.as_object_mut().unwrap().remove("segment").expect("a format-5 index");
        std::fs::remove_file(index.join(segment["path"].as_str().unwrap())).unwrap();
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

pub fn stderr_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One line of `search --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub video_id: String,
    pub score: f64,
    pub best_frame_s: Option<f64>,
}

pub fn search_hits(stdout: &str) -> Vec<SearchHit> {
    let hits = stdout.lines().map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap());
    hits.map(|h| SearchHit {
        video_id: h["video_id"].as_str().unwrap().to_string(),
        score: h["score"].as_f64().unwrap(),
        best_frame_s: h["best_frame_s"].as_f64(),
    })
    .collect()
}

/// A video as a brute-force reference ranks it: its exact score (`scale · cosine` of the f32
/// embeddings) and each frame's exact cosine and time, in the frames table's order.
pub struct ReferenceVideo {
    pub video_id: String,
    pub score: f64,
    pub frames: Vec<(f64, f64)>,
}

/// `got`, the top `k` that search answered from the f16 search segments, is the exact top `k` of
/// `reference` (every video of the index) up to f16 rounding (contract §6): each score within
/// `scale ·` [`F16_COSINE_ERROR`](vtr_index::store::segment::F16_COSINE_ERROR) of the exact
/// one; the order the exact one, ties by ascending id, except between videos whose exact scores
/// are closer than twice that; no video left out that beats the last one kept by more; and each
/// best frame the exact best, or one within twice the cosine error of it.
pub fn assert_search_matches(got: &[SearchHit], reference: &[ReferenceVideo], k: usize, scale: f64) {
    let error = vtr_index::store::segment::F16_COSINE_ERROR;
    let mut exact: Vec<&ReferenceVideo> = reference.iter().collect();
    exact.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.video_id.as_bytes().cmp(b.video_id.as_bytes())));
    assert_eq!(got.len(), k.min(exact.len()), "{got:?}");
    let by_id: std::collections::HashMap<&str, &ReferenceVideo> =
        reference.iter().map(|v| (v.video_id.as_str(), v)).collect();
    let slack = 2.0 * scale * error;
    for (rank, hit) in got.iter().enumerate() {
        let want = by_id.get(hit.video_id.as_str()).unwrap_or_else(|| panic!("{} is no video", hit.video_id));
        assert!(
            (hit.score - want.score).abs() <= scale * error,
            "{}: {} against {}",
            hit.video_id,
            hit.score,
            want.score
        );
        if exact[rank].video_id != hit.video_id {
            assert!(
                (exact[rank].score - want.score).abs() <= slack,
                "rank {}: {} (exact {}) where the exact order has {} ({})",
                rank + 1,
                hit.video_id,
                want.score,
                exact[rank].video_id,
                exact[rank].score
            );
        }
        let best = want.frames.iter().map(|f| f.0).fold(f64::NEG_INFINITY, f64::max);
        match hit.best_frame_s {
            Some(time) => {
                let chosen = want.frames.iter().find(|f| f.1 == time).expect("a frame of the video");
                assert!(chosen.0 >= best - 2.0 * error, "{}: frame at {time} s, not the best", hit.video_id);
                if want.frames.iter().filter(|f| f.0 >= best - 2.0 * error).count() == 1 {
                    assert_eq!(chosen.0, best, "{}: the one best frame", hit.video_id);
                }
            }
            None => assert!(want.frames.is_empty(), "{}: its best frame is missing", hit.video_id),
        }
    }
    if let Some(last) = got.last() {
        let last = by_id[last.video_id.as_str()].score;
        let kept: std::collections::HashSet<&str> = got.iter().map(|h| h.video_id.as_str()).collect();
        for video in exact.iter().filter(|v| v.score > last + slack) {
            assert!(kept.contains(video.video_id.as_str()), "{} (score {}) is left out", video.video_id, video.score);
        }
    }
}

/// Two searches of one index whose logit scale is `scale`, one from its tables (f32) and one
/// from its segments (f16): the same videos and best frames, scores up to the f16 rounding.
pub fn assert_same_search(got: &str, want: &str, scale: f64) {
    let (got, want) = (search_hits(got), search_hits(want));
    let reference: Vec<ReferenceVideo> = want
        .iter()
        .map(|h| ReferenceVideo {
            video_id: h.video_id.clone(),
            score: h.score,
            frames: h.best_frame_s.map(|t| (1.0, t)).into_iter().collect(),
        })
        .collect();
    assert_eq!(got.len(), want.len());
    assert_search_matches(&got, &reference, got.len(), scale);
}
