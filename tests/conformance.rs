//! Real video files: the conformance corpus that `tests/media/conformance.sh` builds with ffmpeg
//! at test time. Every good file (any container, with audio, subtitles, timecode, cover art or
//! a second video stream) is indexed exactly as its video-only twin; every odd encoding gives
//! the RGB frames ffmpeg's own conversion gives; no file waits for the deadline; hostile files
//! stay typed failures; a file whose decoder is missing is `unsupported_codec`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use vtr_index::decode::{DecodeConfig, decode_video};
use vtr_index::sampling::SamplingConfig;

use crate::tolerance::*;
use crate::util::*;

/// One line of `corpus.tsv`.
pub(crate) struct Entry {
    pub(crate) kind: String,
    pub(crate) file: String,
    twin: String,
    note: String,
}

/// The corpus, built once per test process.
pub(crate) fn conformance() -> &'static (PathBuf, Vec<Entry>) {
    static CORPUS: OnceLock<(PathBuf, Vec<Entry>)> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/media/conformance.sh");
        let out = std::process::Command::new("bash").arg(script).arg(&dir).output().expect("bash runs");
        assert!(
            out.status.success(),
            "the conformance corpus needs ffmpeg (scripts/setup-system.sh --tests installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let table = std::fs::read_to_string(dir.join("corpus.tsv")).unwrap();
        let entries = table
            .lines()
            .map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                Entry { kind: fields[0].into(), file: fields[1].into(), twin: fields[2].into(), note: fields[3].into() }
            })
            .collect();
        (dir, entries)
    })
}

fn entries(kind: &str) -> impl Iterator<Item = &'static Entry> {
    conformance().1.iter().filter(move |e| e.kind == kind)
}

/// Ingests `root` into a new index with a 30 s deadline; returns (exit code, stderr).
fn ingest_strict(index: &Path, root: &Path, env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = TestCommand::new(&["ingest", "--decode-timeout", "30", "--index"])
        .arg(index)
        .arg("--model")
        .arg(sample().join("model"))
        .arg(root);
    for (key, value) in env {
        cmd = cmd.env(key, value);
    }
    let out = cmd.output();
    (out.status.code().unwrap_or(-1), stderr_text(&out))
}

#[test]
fn every_good_file_is_indexed_like_its_video_only_twin() {
    let (dir, _) = conformance();
    let work = Dir::new();
    let (good, twins) = (work.join("good-index"), work.join("twins-index"));
    let (code, stderr) = ingest_strict(&good, &dir.join("good"), &[]);
    assert_eq!(code, 0, "every good file indexes, none times out:\n{stderr}");
    let (code, stderr) = ingest_strict(&twins, &dir.join("twins"), &[]);
    assert_eq!(code, 0, "{stderr}");
    let (good, twins) = (snapshot(&good).unwrap(), snapshot(&twins).unwrap());
    let mut checked = 0;
    for entry in entries("good") {
        let id = Path::new(&entry.file).file_stem().unwrap().to_string_lossy().into_owned();
        let twin_id = Path::new(&entry.twin).file_stem().unwrap().to_string_lossy().into_owned();
        let (frames, twin_frames): (Vec<_>, Vec<_>) = (
            good.frames.iter().filter(|((v, _), _)| *v == id).collect(),
            twins.frames.iter().filter(|((v, _), _)| *v == twin_id).collect(),
        );
        assert!(!frames.is_empty(), "{}: not indexed", entry.file);
        assert_eq!(frames.len(), twin_frames.len(), "{}: frames sampled", entry.file);
        for ((key, (pts, embedding)), (_, (twin_pts, twin_embedding))) in frames.iter().zip(&twin_frames) {
            assert!(
                (pts - twin_pts).abs() <= EXTRA_STREAMS_TIME_S,
                "{}: frame {key:?} at {pts} s, twin {twin_pts} s",
                entry.file
            );
            let c = cosine(embedding, twin_embedding);
            assert!(c >= EXTRA_STREAMS_COSINE, "{}: frame {key:?}: cosine {c}", entry.file);
        }
        let c = cosine(&good.videos[&id], &twins.videos[&twin_id]);
        assert!(c >= EXTRA_STREAMS_COSINE, "{}: video cosine {c}", entry.file);
        // The note names the stream ffprobe numbers as the chosen one; the twin holds it alone.
        let stream: u32 = entry.note.strip_prefix("stream ").unwrap().parse().unwrap();
        assert_eq!(good.streams[&id], Some(stream), "{}: stream_index", entry.file);
        assert_eq!(twins.streams[&twin_id], Some(0), "{}: the twin's stream_index", entry.file);
        checked += 1;
    }
    assert!(checked >= 38, "only {checked} good files");
}

/// ffmpeg's RGB of every frame of `file`, by its time from the first frame.
fn ffmpeg_frames(file: &Path) -> (u32, u32, Vec<(f64, Vec<u8>)>) {
    let probe = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries", "frame=best_effort_timestamp_time"])
        .args(["-of", "csv=p=0"])
        .arg(file)
        .output()
        .unwrap();
    let times: Vec<f64> = String::from_utf8_lossy(&probe.stdout)
        .lines()
        .filter_map(|l| l.trim().trim_end_matches(',').parse().ok())
        .collect();
    // PPM frames carry their size: ffmpeg rotates by the display matrix, as ingest does.
    let raw = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args([
            "-map",
            "0:v:0",
            "-fps_mode",
            "passthrough",
            "-f",
            "image2pipe",
            "-c:v",
            "ppm",
            "-pix_fmt",
            "rgb24",
            "-",
        ])
        .output()
        .unwrap();
    let (mut frames, mut rest, mut size) = (Vec::new(), &raw.stdout[..], (0, 0));
    while !rest.is_empty() {
        let mut fields = Vec::new();
        let mut at = 0;
        // "P6", width, height, maxval, each followed by one whitespace byte.
        while fields.len() < 4 {
            let end = at + rest[at..].iter().position(u8::is_ascii_whitespace).unwrap();
            fields.push(std::str::from_utf8(&rest[at..end]).unwrap().to_string());
            at = end + 1;
        }
        let (width, height): (u32, u32) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
        let bytes = (width * height * 3) as usize;
        frames.push(rest[at..at + bytes].to_vec());
        size = (width, height);
        rest = &rest[at + bytes..];
    }
    let (width, height) = size;
    assert_eq!(frames.len(), times.len(), "{}: ffmpeg's frames and ffprobe's times", file.display());
    let first = times.iter().copied().fold(f64::INFINITY, f64::min);
    (width, height, times.iter().map(|t| t - first).zip(frames).collect())
}

#[test]
fn odd_encodings_give_the_rgb_frames_ffmpeg_gives() {
    let (dir, _) = conformance();
    vtr_index::decode::init().unwrap();
    let config = DecodeConfig::new(SamplingConfig::default(), Duration::from_secs(30));
    let mut measured = BTreeMap::new();
    for entry in entries("odd") {
        let path = dir.join(&entry.file);
        let video = decode_video(&path, &config).unwrap_or_else(|e| panic!("{}: {e:?}", entry.file));
        let (width, height, reference) = ffmpeg_frames(&path);
        let tolerance = if entry.note == "8bit" { RGB_MEAN_ABS_8BIT } else { RGB_MEAN_ABS_OTHER };
        let mut worst = 0f64;
        for frame in &video.frames {
            assert_eq!((frame.image.width, frame.image.height), (width, height), "{}: frame size", entry.file);
            let (_, rgb) = reference
                .iter()
                .find(|(t, _)| (t - frame.pts_s).abs() < 1e-3)
                .unwrap_or_else(|| panic!("{}: ffmpeg has no frame at {} s", entry.file, frame.pts_s));
            let sum: u64 = frame.image.data.iter().zip(rgb).map(|(a, b)| u64::from(a.abs_diff(*b))).sum();
            worst = worst.max(sum as f64 / rgb.len() as f64);
        }
        assert!(!video.frames.is_empty(), "{}", entry.file);
        measured.insert(entry.file.clone(), (worst, tolerance));
    }
    eprintln!("mean absolute RGB difference against ffmpeg, worst frame per file (value, tolerance): {measured:#?}");
    let over: Vec<_> = measured.iter().filter(|(_, (worst, tolerance))| worst > tolerance).collect();
    assert!(over.is_empty(), "over the tolerance: {over:?}");
    assert!(measured.len() >= 15);
}

#[test]
fn hostile_files_stay_typed_failures_beside_good_ones() {
    let (dir, _) = conformance();
    let work = Dir::new();
    let root = work.join("mixed");
    for entry in entries("hostile").chain(entries("limit")).chain(entries("good").take(3)) {
        let name = Path::new(&entry.file).file_name().unwrap().to_string_lossy().into_owned();
        std::fs::create_dir_all(&root).unwrap();
        std::fs::copy(dir.join(&entry.file), root.join(name)).unwrap();
    }
    let index = work.join("index");
    let (code, stderr) = ingest_strict(&index, &root, &[]);
    assert_eq!(code, 2, "{stderr}");
    let state = snapshot(&index).unwrap();
    assert_eq!(state.videos.len(), 3, "{stderr}");
    let kinds: BTreeMap<String, String> = state.failures.into_iter().collect();
    assert_eq!(kinds["ps-h264-ac3.mpg"], "not_a_video", "the known limit stays a typed failure");
    assert_eq!(kinds["empty.webm"], "empty");
    assert_eq!(kinds["audio-only.mp4"], "no_video_stream");
    assert_eq!(kinds["text.mkv"], "not_a_video");
    assert!(["corrupt", "not_a_video"].contains(&kinds["truncated.mp4"].as_str()), "{kinds:?}");
    assert!(!stderr.contains("timeout"), "{stderr}");
}

#[test]
fn a_file_whose_decoder_is_missing_is_unsupported_codec() {
    let (dir, _) = conformance();
    let work = Dir::new();
    let root = work.join("videos");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(dir.join("good/ogg-theora-vorbis.ogv"), root.join("theora.ogv")).unwrap();
    let index = work.join("index");
    // GStreamer's own switch: no Theora decoder may be plugged.
    let ranks = ("GST_PLUGIN_FEATURE_RANK", "theoradec:NONE,avdec_theora:NONE");
    let (code, stderr) = ingest_strict(&index, &root, &[ranks]);
    assert_eq!(code, 2, "{stderr}");
    let failures: BTreeMap<String, String> = snapshot(&index).unwrap().failures.into_iter().collect();
    assert_eq!(failures["theora.ogv"], "unsupported_codec", "{stderr}");
}
