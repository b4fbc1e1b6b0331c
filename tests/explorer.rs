//! The score explorer of `vtr-index serve --scores`, over real HTTP: a labelled index where dual
//! softmax helps (`tests/fixtures/reference/explorer`, made with its Python reference of the
//! ranks and their changes by `tests/fixtures/make/explorer_reference.py`), scored by the
//! command line with `--revise none` and `--revise dsl`; each folder's metrics, its queries
//! paged, filtered and sorted, each caption's top k against `topk.parquet`, the comparison
//! against the reference's rank changes, and the folders it refuses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::array::AsArray;
use serde_json::Value;

use crate::serve::Service;
use crate::util::{Dir, TestCommand, fixtures, read_npy, read_parquet, sample};
use vtr_index::store::segment::{F16_COSINE_ERROR, add_missing_segments};
use vtr_index::store::{FrameRow, Manifest, ShardWriter, TextRow, VideoRow};

/// The fixture's labelled case: its videos (file names), captions (text, video) and the
/// reference's ranks, metrics and changes.
pub fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("reference/explorer/labelled.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The labelled index and its two scores, `none` and `dsl`.
pub struct Labelled {
    pub index: PathBuf,
    pub none: PathBuf,
    pub dsl: PathBuf,
}

/// Writes the labelled index in `dir`: the fixture's first `videos` videos (their real files
/// under `dir/videos`) with the fixture's embeddings and two frames each (the video's embedding
/// at 0 s, its first caption's at 0.5 s), and the text set
/// `labelled` of all its captions; then scores it both ways with the reference's scale.
pub fn labelled_index(dir: &Dir, name: &str, videos: usize) -> Labelled {
    let reference = reference();
    let root = dir.join(&format!("{name}-videos"));
    std::fs::create_dir_all(&root).unwrap();
    let empty = dir.join(&format!("{name}-empty"));
    std::fs::create_dir_all(&empty).unwrap();
    let index = dir.join(name);
    TestCommand::new(&["ingest"])
        .arg(&empty)
        .arg("--index")
        .arg(&index)
        .arg("--model")
        .arg(sample().join("model"))
        .expect_code(0);
    let (video_values, video_shape) = read_npy(&fixtures().join("reference/explorer/videos.npy"));
    let (text_values, text_shape) = read_npy(&fixtures().join("reference/explorer/texts.npy"));
    let dim = video_shape[1];
    let row = |values: &[f64], i: usize| values[i * dim..(i + 1) * dim].iter().map(|&v| v as f32).collect::<Vec<_>>();
    let names: Vec<String> =
        reference["videos"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(names.len(), video_shape[0]);

    let mut manifest = Manifest::load(&index).unwrap().unwrap();
    let mut video_writer = ShardWriter::<VideoRow>::new(&index, "videos", "1", dim, 1000).unwrap();
    let mut frame_writer = ShardWriter::<FrameRow>::new(&index, "frames", "1", dim, 1000).unwrap();
    for (i, file) in names.iter().enumerate().take(videos) {
        let path = root.join(file);
        std::fs::copy(fixtures().join("videos").join(file), &path).unwrap();
        let metadata = std::fs::metadata(&path).unwrap();
        video_writer
            .push(VideoRow {
                video_id: file.clone(),
                root: root.to_str().unwrap().to_string(),
                path: file.clone(),
                size_bytes: metadata.len(),
                mtime_ns: vtr_index::walk::mtime_ns(&metadata),
                content_hash: format!("{:064x}", i + 1),
                duration_s: 1.0,
                width: 320,
                height: 240,
                fps: 25.0,
                n_frames: 2,
                stream_index: Some(0),
                embedding: row(&video_values, i),
            })
            .unwrap();
        // Two frames: the video's own embedding at 0 s, and its first caption's at 0.5 s.
        for (frame_index, pts_s, embedding) in [(0, 0.0, row(&video_values, i)), (1, 0.5, row(&text_values, 4 * i))] {
            frame_writer.push(FrameRow { video_id: file.clone(), frame_index, pts_s, embedding }).unwrap();
        }
    }
    let mut text_writer = ShardWriter::<TextRow>::new(&index, "texts/labelled", "1", dim, 1000).unwrap();
    for (i, caption) in reference["captions"].as_array().unwrap().iter().enumerate() {
        assert!(i < text_shape[0]);
        let video = caption["video"].as_u64().unwrap() as usize;
        text_writer
            .push(TextRow {
                text_id: i as u64,
                text: caption["text"].as_str().unwrap().to_string(),
                video_id: Some(names[video].clone()),
                token_ids: Vec::new(),
                embedding: row(&text_values, i),
            })
            .unwrap();
    }
    manifest.tables.insert("videos".into(), video_writer.finish().unwrap());
    manifest.tables.insert("frames".into(), frame_writer.finish().unwrap());
    manifest.tables.insert("texts/labelled".into(), text_writer.finish().unwrap());
    manifest.roots.push(root.to_str().unwrap().to_string());
    add_missing_segments(&index, &mut manifest).unwrap();
    manifest.commit(&index).unwrap();

    let scale = reference["scale"].as_f64().unwrap().to_string();
    let score = |revise: &str| {
        let out = dir.join(&format!("{name}-{revise}"));
        TestCommand::new(&["score", "--index"])
            .arg(&index)
            .args(&["--texts", "labelled", "--revise", revise, "--scale", &scale, "--out"])
            .arg(&out)
            .expect_code(0);
        out
    };
    Labelled { none: score("none"), dsl: score("dsl"), index }
}

fn start(index: &Path, folders: &[&Path]) -> Service {
    let mut args = vec!["--scores".to_string()];
    args.extend(folders.iter().map(|f| f.to_str().unwrap().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Service::start(index, &args)
}

/// Every item of a paged list, fetched `limit` at a time.
fn all_pages(service: &Service, path: &str, limit: usize) -> (Vec<Value>, Value) {
    let (mut items, mut offset) = (Vec::new(), 0);
    loop {
        let body = service.get_json(&format!("{path}&offset={offset}&limit={limit}"));
        items.extend(body["page"]["items"].as_array().unwrap().iter().cloned());
        match body["page"]["next_offset"].as_u64() {
            Some(next) => offset = next as usize,
            None => return (items, body),
        }
    }
}

fn ranks_of_reference(reference: &Value, revise: &str) -> Vec<u64> {
    reference["ranks"][revise].as_array().unwrap().iter().map(|r| r.as_u64().unwrap()).collect()
}

#[test]
fn each_folder_shows_its_metrics_and_its_queries_paged_filtered_and_sorted() {
    let dir = Dir::new();
    let labelled = labelled_index(&dir, "index", usize::MAX);
    let reference = reference();
    let service = start(&labelled.index, &[&labelled.none, &labelled.dsl]);
    let listed = service.get_json("/api/v1/scores");
    let folders = listed["folders"].as_array().unwrap();
    assert_eq!(folders.len(), 2, "{listed}");
    for (position, (folder, revise)) in folders.iter().zip(["none", "dsl"]).enumerate() {
        assert_eq!(folder["revise"], revise);
        assert_eq!(folder["comparable_with"], serde_json::json!([1 - position]));
        assert_eq!((folder["texts_current"].as_bool(), folder["videos_current"].as_bool()), (Some(true), Some(true)));
        // The metrics of metrics.json, which equal the Python reference's.
        let path = if revise == "none" { &labelled.none } else { &labelled.dsl };
        let written: Value = serde_json::from_slice(&std::fs::read(path.join("metrics.json")).unwrap()).unwrap();
        assert_eq!(folder["metrics"]["t2v"], written["t2v"]);
        for key in ["r1", "r5", "r10", "mdr", "mnr"] {
            let (got, want) =
                (folder["metrics"]["t2v"][key].as_f64().unwrap(), reference["metrics"][revise][key].as_f64().unwrap());
            assert!((got - want).abs() < 1e-9, "{revise} {key}: {got} against the reference's {want}");
        }

        let ranks = ranks_of_reference(&reference, revise);
        let captions = reference["captions"].as_array().unwrap();
        for (outcome, wanted) in
            [("all", 1..=u64::MAX), ("r1", 1..=1), ("r5", 1..=5), ("r10", 1..=10), ("beyond", 11..=u64::MAX)]
        {
            let mut expected: Vec<u64> =
                (0..ranks.len() as u64).filter(|&t| wanted.contains(&ranks[t as usize])).collect();
            assert_eq!(folder["outcomes"][outcome], expected.len(), "{revise} {outcome}");
            for sort in ["text", "rank", "-rank"] {
                match sort {
                    "rank" => expected.sort_by_key(|&t| (ranks[t as usize], t)),
                    "-rank" => expected.sort_by_key(|&t| (std::cmp::Reverse(ranks[t as usize]), t)),
                    _ => expected.sort(),
                }
                let path = format!("/api/v1/scores/queries?folder={position}&outcome={outcome}&sort={sort}");
                let (items, last) = all_pages(&service, &path, 7);
                assert_eq!(last["page"]["total"], expected.len(), "{path}");
                let got: Vec<u64> = items.iter().map(|q| q["text_id"].as_u64().unwrap()).collect();
                assert_eq!(got, expected, "{path}");
                for query in &items {
                    let t = query["text_id"].as_u64().unwrap() as usize;
                    assert_eq!(query["rank"], ranks[t], "{path}");
                    assert_eq!(query["text"], captions[t]["text"], "{path}");
                    let video = captions[t]["video"].as_u64().unwrap() as usize;
                    assert_eq!(query["video_id"], reference["videos"][video], "{path}");
                }
            }
        }
    }

    // Each caption's top k is topk.parquet's, its true video marked and scored where it is there.
    let topk = read_parquet(&labelled.dsl.join("topk.parquet"));
    let mut written: BTreeMap<u64, Vec<(String, f64)>> = BTreeMap::new();
    for batch in &topk {
        let ids = batch.column_by_name("text_id").unwrap().as_primitive::<arrow::datatypes::UInt64Type>();
        let videos = batch.column_by_name("video_id").unwrap().as_string::<i32>();
        let scores = batch.column_by_name("score").unwrap().as_primitive::<arrow::datatypes::Float64Type>();
        for i in 0..batch.num_rows() {
            written.entry(ids.value(i)).or_default().push((videos.value(i).to_string(), scores.value(i)));
        }
    }
    let (items, _) = all_pages(&service, "/api/v1/scores/queries?folder=1&sort=-rank", 100);
    assert_eq!(items.len(), 44);
    let (videos, _) = read_npy(&fixtures().join("reference/explorer/videos.npy"));
    let (texts, shape) = read_npy(&fixtures().join("reference/explorer/texts.npy"));
    let dim = shape[1];
    let dot = |a: &[f64], i: usize, b: &[f64], j: usize| {
        a[i * dim..(i + 1) * dim].iter().zip(&b[j * dim..(j + 1) * dim]).map(|(x, y)| x * y).sum::<f64>()
    };
    let names: Vec<&str> = reference["videos"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let mut half = 0;
    for query in &items {
        let top: Vec<(String, f64)> = query["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["video_id"].as_str().unwrap().to_string(), e["score"].as_f64().unwrap()))
            .collect();
        assert_eq!(top, written[&query["text_id"].as_u64().unwrap()]);
        let own = top.iter().find(|(id, _)| Some(id.as_str()) == query["video_id"].as_str());
        assert_eq!(query["score"].as_f64(), own.map(|o| o.1), "{query}");
        let marked: Vec<bool> = query["top"].as_array().unwrap().iter().map(|e| e["true"].as_bool().unwrap()).collect();
        assert_eq!(marked.iter().filter(|&&m| m).count(), usize::from(own.is_some()));
        // Each video's frame most like the caption, by f64 dot products of the fixture's vectors
        // (the segment holds them in f16: frames closer than its error may go either way).
        let t = query["text_id"].as_u64().unwrap() as usize;
        for entry in query["top"].as_array().unwrap() {
            let v = names.iter().position(|n| *n == entry["video_id"]).unwrap();
            let (at_start, at_half) = (dot(&texts, t, &videos, v), dot(&texts, t, &texts, 4 * v));
            let best = entry["best_frame_s"].as_f64().unwrap();
            if (at_start - at_half).abs() > 2.0 * F16_COSINE_ERROR {
                assert_eq!(best, if at_half > at_start { 0.5 } else { 0.0 }, "{query}");
            }
            half += usize::from(best == 0.5);
        }
    }
    assert!(half > 0 && half < 44 * 10, "both frames are somebody's best: {half} at 0.5 s");
    // The thumbnails the page shows for them.
    let first = &items[0]["top"][0]["video_id"];
    let response = service.get(&format!("/api/v1/thumbnail?id={}&t=0", crate::serve::encode(first.as_str().unwrap())));
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.headers["content-type"], "image/jpeg");

    // Malformed requests.
    service.get("/api/v1/scores/queries?folder=2").assert_error(404, "not_found");
    service.get("/api/v1/scores/queries?folder=x").assert_error(404, "not_found");
    service.get("/api/v1/scores/queries").assert_error(400, "bad_request");
    service.get("/api/v1/scores/queries?folder=0&outcome=r2").assert_error(400, "bad_request");
    service.get("/api/v1/scores/queries?folder=0&sort=score").assert_error(400, "bad_request");
    service.get("/api/v1/scores/queries?folder=0&limit=101").assert_error(400, "bad_request");
    service.get("/api/v1/scores/changes?a=0").assert_error(400, "bad_request");
}

/// The comparison of `none` and `dsl`: the captions each improved or worsened and by how much,
/// against the Python reference's rank changes; and its histogram.
#[test]
fn a_comparison_of_none_and_dsl_equals_the_python_reference() {
    let dir = Dir::new();
    let labelled = labelled_index(&dir, "index", usize::MAX);
    let reference = reference();
    let changes: Vec<i64> = reference["changes"].as_array().unwrap().iter().map(|c| c.as_i64().unwrap()).collect();
    let service = start(&labelled.index, &[&labelled.none, &labelled.dsl]);
    for (kind, keep) in [("improved", 1i64), ("worsened", -1)] {
        let mut expected: Vec<(u64, i64)> =
            (0..changes.len()).filter(|&t| changes[t].signum() == keep).map(|t| (t as u64, changes[t])).collect();
        expected.sort_by_key(|&(t, c)| (-c.abs(), t));
        let (items, last) = all_pages(&service, &format!("/api/v1/scores/changes?a=0&b=1&change={kind}"), 5);
        let got: Vec<(u64, i64)> =
            items.iter().map(|i| (i["text_id"].as_u64().unwrap(), i["change"].as_i64().unwrap())).collect();
        assert_eq!(got, expected, "{kind}");
        assert_eq!(last[kind], expected.len());
        assert_eq!(last["unchanged"], changes.iter().filter(|&&c| c == 0).count());
        for item in &items {
            let t = item["text_id"].as_u64().unwrap() as usize;
            assert_eq!(item["rank_a"], ranks_of_reference(&reference, "none")[t]);
            assert_eq!(item["rank_b"], ranks_of_reference(&reference, "dsl")[t]);
            assert_eq!(item["text"], reference["captions"][t]["text"]);
        }
        // The histogram's bins are the contract's, and its counts the reference's changes binned.
        let labels: Vec<&str> =
            last["histogram"].as_array().unwrap().iter().map(|b| b["label"].as_str().unwrap()).collect();
        assert_eq!(labels, ["≤ −100", "−99…−10", "−9…−2", "−1", "+1", "+2…+9", "+10…+99", "≥ +100"]);
        for bin in last["histogram"].as_array().unwrap() {
            let low = bin["lowest"].as_i64().unwrap_or(i64::MIN);
            let high = bin["highest"].as_i64().unwrap_or(i64::MAX);
            let want = changes.iter().filter(|&&c| c != 0 && (low..=high).contains(&c)).count();
            assert_eq!(bin["captions"], want, "{bin}");
        }
    }
    // Reversed, each improvement is a worsening.
    let reversed = service.get_json("/api/v1/scores/changes?a=1&b=0&change=worsened&limit=100");
    assert_eq!(reversed["worsened"], changes.iter().filter(|&&c| c > 0).count());
    let plot = service.get("/api/v1/plots/changes.svg?a=0&b=1");
    assert_eq!(plot.status, 200, "{}", plot.text());
    assert_eq!(plot.headers["content-type"], "image/svg+xml");
    assert!(plot.text().contains(&format!("({} unchanged)", changes.iter().filter(|&&c| c == 0).count())));

    // A later score into the first folder (now dsl's) does not mix into its pages: they show the
    // run the service started with, its ranks and its top k.
    let ranks_of_page = |service: &Service| -> Vec<(u64, u64, String)> {
        let (items, _) = all_pages(service, "/api/v1/scores/queries?folder=0", 100);
        items
            .iter()
            .map(|q| (q["text_id"].as_u64().unwrap(), q["rank"].as_u64().unwrap(), q["top"][0]["video_id"].to_string()))
            .collect()
    };
    let before = ranks_of_page(&service);
    TestCommand::new(&["score", "--index"])
        .arg(&labelled.index)
        .args(&["--texts", "labelled", "--revise", "dsl", "--scale", "20", "--top-k", "3", "--out"])
        .arg(&labelled.none)
        .expect_code(0);
    assert_eq!(ranks_of_page(&service), before);
    let none = ranks_of_reference(&reference, "none");
    assert!(before.iter().all(|(t, rank, _)| *rank == none[*t as usize]));
}

/// Folders that did not score the same things are not compared, and say what differs; a mixed
/// folder, or one of a text set the index lacks, is refused at start.
#[test]
fn mismatched_and_mixed_folders_are_refused() {
    let dir = Dir::new();
    let labelled = labelled_index(&dir, "index", usize::MAX);
    // The same captions against one video fewer, scored in another index.
    let fewer = labelled_index(&dir, "fewer", 10);
    // Other texts against the same videos.
    TestCommand::new(&["encode-text"])
        .arg(dir.create("queries.txt", b"a colourful fractal\nbars of colour\n"))
        .arg("--index")
        .arg(&labelled.index)
        .args(&["--name", "queries"])
        .expect_code(0);
    let queries = dir.join("queries-scored");
    TestCommand::new(&["score", "--index"])
        .arg(&labelled.index)
        .args(&["--texts", "queries", "--out"])
        .arg(&queries)
        .expect_code(0);
    let service = start(&labelled.index, &[&labelled.none, &fewer.dsl, &queries]);
    let listed = service.get_json("/api/v1/scores");
    assert_eq!(listed["folders"][1]["videos_current"], false, "{listed}");
    assert_eq!(listed["folders"][1]["texts_current"], true, "{listed}");
    assert_eq!(listed["folders"][0]["comparable_with"], serde_json::json!([]));
    for path in ["/api/v1/scores/changes?a=0&b=1", "/api/v1/plots/changes.svg?a=0&b=1"] {
        let refused = service.get(path);
        refused.assert_error(409, "not_comparable");
        let message = refused.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(
            message.contains("the videos: 11 videos in 1 shard") && message.contains("against 10 videos"),
            "{message}"
        );
        assert!(!message.contains("the texts"), "{message}");
    }
    let refused = service.get("/api/v1/scores/changes?a=2&b=0");
    refused.assert_error(409, "not_comparable");
    let message = refused.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("the texts: set \"queries\" of 2 texts in 1 shard")
            && message.contains("against set \"labelled\" of 44 texts")
            && !message.contains("the videos"),
        "{message}"
    );
    // The text set encoded again under its name: the index's texts are no longer the ones
    // scored, and none of them is shown as a scored caption.
    TestCommand::new(&["encode-text"])
        .arg(dir.create("labelled.txt", b"another caption\nand one more\n"))
        .arg("--index")
        .arg(&labelled.index)
        .args(&["--name", "labelled"])
        .expect_code(0);
    let due = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while service.get_json("/api/v1/scores")["folders"][0]["texts_current"] != false {
        assert!(std::time::Instant::now() < due, "the new text set is not seen");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let page = service.get_json("/api/v1/scores/queries?folder=0&limit=5");
    for query in page["page"]["items"].as_array().unwrap() {
        assert!(query["text"].is_null() && query["video_id"].is_string(), "{query}");
    }
    drop(service);

    // An earlier run's metrics.json beside a later run's outputs.
    let mixed = dir.copy(&labelled.none, "mixed");
    std::fs::copy(labelled.dsl.join("metrics.json"), mixed.join("metrics.json")).unwrap();
    let serve = |folder: &Path| refused_to_start(&labelled.index, folder);
    let stderr = serve(&mixed);
    assert!(stderr.contains("mixed outputs: metrics.json is of run"), "{stderr}");
    // A folder of a text set this index does not hold.
    let other = dir.join("other-texts");
    TestCommand::new(&["encode-text"])
        .arg(dir.create("other.txt", b"a colourful fractal\n"))
        .arg("--index")
        .arg(&fewer.index)
        .args(&["--name", "other"])
        .expect_code(0);
    TestCommand::new(&["score", "--index"])
        .arg(&fewer.index)
        .args(&["--texts", "other", "--out"])
        .arg(&other)
        .expect_code(0);
    let stderr = serve(&other);
    assert!(stderr.contains("scored the text set \"other\", which this index does not hold"), "{stderr}");
}

/// What `serve --scores FOLDER` says as it exits 1, refusing the folder; a service that starts
/// instead is stopped and fails the test.
fn refused_to_start(index: &Path, folder: &Path) -> String {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vtr-index"))
        .args(["serve", "--bind", "127.0.0.1:0", "--index"])
        .arg(index)
        .arg("--scores")
        .arg(folder)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let due = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > due {
            let _ = child.kill();
            panic!("serve started with {}", folder.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    stderr
}
