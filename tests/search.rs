//! Search segments and the query engine: a kill between any two writes of a commit leaves
//! segments that agree with the manifest, the engine's answers against a brute-force reference
//! over the f32 embeddings, and `verify --deep` finding a segment that differs from its shard.

use std::path::Path;

use vtr_index::search_engine::SearchEngine;
use vtr_index::store::segment::{F16_COSINE_ERROR, SegmentWriter, Values};
use vtr_index::store::{FrameRow, Manifest, ShardInfo, ShardWriter, read_table};

use crate::util::*;

/// The search for `query` on `index`, as `--json` lines.
fn search(index: &Path, query: &str) -> String {
    TestCommand::new(&["search", query, "--json", "--index"]).arg(index).expect_code(0).0
}

/// The writes of one commit, each a kill point (`src/fault.rs`): the temporary shard or
/// segment synced, then renamed, then the manifest's temporary written. The run below writes
/// one segment and two shards (videos, frames; no failure, so no failures shard); on an index
/// of format 4 the upgrade's segment comes first, so the run's own is the second.
const COMMIT_WRITES: [&str; 7] = [
    "segment-written:1",
    "segment-renamed:1",
    "shard-written:1",
    "shard-renamed:1",
    "shard-written:2",
    "shard-renamed:2",
    "manifest-written:1",
];

/// A run that adds a file, drops one and finds one renamed (its rows reused under the new id,
/// its frames copied from the old segment) is killed at each write of its commit in turn, on a
/// fresh copy of the index: the index is the one before, whole (`verify --deep`), and searches
/// as before. The same is done to an index of format 4, whose upgrade writes its segments in the
/// same commit. The run let through makes the index a run from scratch makes.
#[test]
fn a_kill_between_any_two_writes_of_a_commit_leaves_the_index_as_it_was() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..3]);
    let base = dir.join("base");
    assert_eq!(ingest_output(&base, &root, &[], None).status.code(), Some(0));
    dir.copy(&fixtures().join("videos").join(CLIPS[3]), &format!("videos/{}", CLIPS[3]));
    std::fs::remove_file(root.join(CLIPS[0])).unwrap();
    std::fs::rename(root.join(CLIPS[1]), root.join("renamed.mp4")).unwrap();
    let reference = dir.join("reference");
    assert_eq!(ingest_output(&reference, &root, &[], None).status.code(), Some(0));
    let want = snapshot(&reference).unwrap();

    for format in [5, 4] {
        let upgrade_writes: &[&str] = if format == 4 { &["segment-written:2", "segment-renamed:2"] } else { &[] };
        for &point in COMMIT_WRITES.iter().chain(upgrade_writes) {
            let index = dir.copy(&base, &format!("killed-{format}-{}", point.replace(':', "-")));
            if format == 4 {
                as_older_format(&index, 4);
            }
            let (before, searched) = (snapshot(&index).unwrap(), search(&index, "a clock"));
            let manifest = std::fs::read(index.join("manifest.json")).unwrap();
            let out = ingest_output(&index, &root, &[], Some(point));
            assert_eq!(out.status.code(), None, "format {format}: killed at {point}: {}", stderr_text(&out));
            assert_eq!(std::fs::read(index.join("manifest.json")).unwrap(), manifest, "{point}");
            assert_eq!(snapshot(&index).unwrap(), before, "{point}");
            assert_verifies(&index);
            assert_eq!(search(&index, "a clock"), searched, "{point}");

            let out = ingest_output(&index, &root, &[], None);
            assert_eq!(out.status.code(), Some(0), "{point}: {}", stderr_text(&out));
            assert_same_index(&snapshot(&index).unwrap(), &want, point);
            assert_verifies(&index);
            let upgraded = Manifest::load(&index).unwrap().unwrap();
            assert!(upgraded.shards("videos").iter().all(|s| s.segment.is_some()));
        }
    }
}

/// `verify` checks each segment's size and checksum against the manifest; `--deep` also its
/// contents against its shard and the frames table, so a segment written wrong (here: a frame
/// changed and the manifest's record made to match) is found and named.
#[test]
fn verify_deep_finds_a_segment_that_differs_from_its_shard() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..2]);
    let index = dir.join("index");
    assert_eq!(ingest_output(&index, &root, &[], None).status.code(), Some(0));
    assert_verifies(&index);
    let mut manifest = Manifest::load(&index).unwrap().unwrap();
    let segment = manifest.tables.get_mut("videos").unwrap()[0].segment.as_mut().unwrap();
    let path = index.join(&segment.path);
    let mut bytes = std::fs::read(&path).unwrap();
    // The first frame's first half (the frame embeddings start right after the 128-byte header).
    bytes[128] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let (_, stderr) = TestCommand::new(&["verify", "--index"]).arg(&index).expect_code(1);
    assert!(stderr.contains(&segment.path) && stderr.contains("checksum"), "{stderr}");
    let (size, sha256) = vtr_index::checksum::sha256_file(&path).unwrap();
    (segment.bytes, segment.sha256) = (size, sha256);
    manifest.commit(&index).unwrap();
    TestCommand::new(&["verify", "--index"]).arg(&index).expect_code(0);
    let (_, stderr) = TestCommand::new(&["verify", "--deep", "--index"]).arg(&index).expect_code(1);
    assert!(stderr.contains("frame 0 of") && stderr.contains("differs from the frames table's"), "{stderr}");
}

/// A video's frames split over frames shards and out of order there (as a rewrite of one shard
/// that a video straddles leaves them): its segment holds them by `frame_index`, so `verify
/// --deep` passes, and the segments an upgrade writes from such tables are the same bytes as
/// those ingest wrote.
#[test]
fn frames_out_of_order_across_shards_make_the_same_segments() {
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &CLIPS[..2]);
    let index = dir.join("index");
    assert_eq!(ingest_output(&index, &root, &[], None).status.code(), Some(0));
    let mut manifest = Manifest::load(&index).unwrap().unwrap();
    let segments = manifest.tables["videos"].clone();
    let mut frames: Vec<FrameRow> = read_table(&index, manifest.shards("frames")).unwrap();
    assert!(frames.len() >= 4, "{} frames", frames.len());
    // Last frame first, two rows a shard: every video straddles shards, backwards.
    frames.reverse();
    let mut writer = ShardWriter::<FrameRow>::new(&index, "frames", "7", manifest.model.embed_dim, 2).unwrap();
    for frame in frames {
        writer.push(frame).unwrap();
    }
    manifest.tables.insert("frames".into(), writer.finish().unwrap());
    manifest.commit(&index).unwrap();
    assert_verifies(&index);

    as_older_format(&index, 4);
    assert_eq!(ingest_output(&index, &root, &[], None).status.code(), Some(0));
    let upgraded = Manifest::load(&index).unwrap().unwrap();
    assert_eq!(upgraded.tables["videos"], segments, "the same segments, byte for byte");
    assert_verifies(&index);
}

/// A deterministic stream of numbers in [-1, 1) (xorshift), for synthetic embeddings.
struct Numbers(u64);

impl Numbers {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn unit(&mut self, dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim).map(|_| self.next()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect()
    }
}

/// The engine against a brute-force reference (f64 sums of the f32 embeddings, every video
/// scored and sorted, ties by ascending id): 3,000 videos in three segments of uneven sizes,
/// with exact duplicates under other ids (ties), near-duplicates closer than the f16 error, a
/// video without frames, and ids that are not ASCII; for several queries and every k from 0 to
/// more than there are videos.
#[test]
fn the_engine_answers_as_a_brute_force_reference_does() {
    let dir = Dir::new();
    let index = dir.path();
    let dim = 64;
    let mut numbers = Numbers(0x9e37_79b9_7f4a_7c15);
    // (id, embedding, frames as (time, embedding)).
    type Video = (String, Vec<f32>, Vec<(f64, Vec<f32>)>);
    let mut videos: Vec<Video> = Vec::new();
    for i in 0..3000 {
        let embedding = match i % 10 {
            // A copy of an earlier video: a tie, broken by id.
            3 => videos[i - 3].1.clone(),
            // An earlier video moved by far less than the f16 error.
            7 => {
                let moved: Vec<f32> = videos[i - 1].1.iter().map(|x| x + 1e-6 * numbers.next()).collect();
                let norm = moved.iter().map(|x| x * x).sum::<f32>().sqrt();
                moved.into_iter().map(|x| x / norm).collect()
            }
            _ => numbers.unit(dim),
        };
        let frames = (0..i % 5).map(|f| (f as f64 * 0.5, numbers.unit(dim))).collect();
        let id = if i % 11 == 0 { format!("é/vidéo {i:04}") } else { format!("video-{:04}", (i * 7919) % 3000) };
        videos.push((id, embedding, frames));
    }
    // Any manifest will do for the model's identity; the videos table is replaced below.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/index-v1");
    let mut manifest = Manifest::load(&fixture).unwrap().unwrap();
    manifest.model.embed_dim = dim;
    manifest.format_version = vtr_index::store::FORMAT_VERSION;
    let mut shards = Vec::new();
    let mut start = 0;
    for (n, rows) in [1200, 1, 1799].into_iter().enumerate() {
        let shard = format!("videos/part-1-{n:05}.parquet");
        let mut writer = SegmentWriter::create(index, &shard, dim).unwrap();
        for (id, embedding, frames) in &videos[start..start + rows] {
            let frames = frames.iter().map(|(t, e)| (*t, Values::F32(e)));
            writer.push(id, Values::F32(embedding), frames).unwrap();
        }
        let segment = Some(writer.finish().unwrap());
        shards.push(ShardInfo { path: shard, rows: rows as u64, bytes: 0, sha256: String::new(), segment });
        start += rows;
    }
    manifest.tables.insert("videos".into(), shards);
    let engine = SearchEngine::open(index, &manifest).unwrap().expect("every shard has its segment");
    assert_eq!(engine.videos(), 3000);
    assert!(engine.first_not_unit().is_none());

    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum::<f64>();
    for q in 0..4 {
        // One query is a video's own embedding: its copies tie at the top.
        let query = if q == 0 { videos[3].1.clone() } else { numbers.unit(dim) };
        let reference: Vec<ReferenceVideo> = videos
            .iter()
            .map(|(id, e, frames)| ReferenceVideo {
                video_id: id.clone(),
                score: dot(&query, e),
                frames: frames.iter().map(|(t, f)| (dot(&query, f), *t)).collect(),
            })
            .collect();
        for k in [0, 1, 2, 10, 100, 2999, 3000, 5000] {
            let hits: Vec<SearchHit> = engine
                .search(&query, k)
                .unwrap()
                .into_iter()
                .map(|h| SearchHit {
                    video_id: h.video_id.to_string(),
                    score: f64::from(h.cosine),
                    best_frame_s: h.best_frame.map(|b| b.time_s),
                })
                .collect();
            assert_search_matches(&hits, &reference, k, 1.0);
            if q == 0 && k >= 2 {
                // The copies of the query's video tie exactly: in ascending id order.
                let (first, second) = (&hits[0], &hits[1]);
                assert_eq!(first.score, second.score);
                assert!(first.video_id.as_bytes() < second.video_id.as_bytes(), "{first:?} {second:?}");
            }
        }
    }
    // The error bound holds on every video, not only the top ones.
    let query = numbers.unit(dim);
    let all = engine.search(&query, 3000).unwrap();
    let exact: std::collections::HashMap<&str, f64> =
        videos.iter().map(|(id, e, _)| (id.as_str(), dot(&query, e))).collect();
    let worst = all.iter().map(|h| (f64::from(h.cosine) - exact[h.video_id]).abs()).fold(0.0, f64::max);
    assert!(worst <= F16_COSINE_ERROR, "{worst}");
    assert!(worst > 0.0, "f16 rounding shows");
}
