//! encode-text, score and search through the command line, on an index of the fixture videos.

use std::path::PathBuf;
use std::sync::OnceLock;

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Float32Type, Int32Type, UInt64Type};
use vtr_index::model::tokenizer::{CONTEXT_LENGTH, ClipTokenizer};

use crate::util::*;

/// The fixture videos, ingested once; each test works on its own copy.
fn indexed_videos() -> &'static PathBuf {
    static TEMPLATE: OnceLock<(Dir, PathBuf)> = OnceLock::new();
    &TEMPLATE
        .get_or_init(|| {
            let dir = Dir::new();
            let index = dir.join("index");
            let (code, stderr) = ingest(&index, &[&fixtures().join("videos")], &[]);
            assert_eq!(code, 0, "{stderr}");
            (dir, index)
        })
        .1
}

fn copy_of_index(dir: &Dir) -> PathBuf {
    dir.copy(indexed_videos(), "index")
}

fn encode_text(index: &std::path::Path, captions: &std::path::Path, extra: &[&str]) -> TestCommand {
    let mut cmd = TestCommand::new(&["encode-text"]).arg(captions).arg("--index").arg(index);
    for e in extra {
        cmd = cmd.arg(e);
    }
    cmd
}

#[test]
fn msrvtt_captions_encode_score_and_search_end_to_end() {
    let dir = Dir::new();
    let index = copy_of_index(&dir);
    let captions = fixtures().join("videos_captions_msrvtt.csv");
    let (_, stderr) = encode_text(&index, &captions, &["--name", "msrvtt"]).expect_code(0);
    assert!(stderr.contains("texts/msrvtt"), "{stderr}");

    // The texts table: contract §4's columns, ids from the official tokenizer, unit embeddings.
    let manifest = vtr_index::store::Manifest::load(&index).unwrap().unwrap();
    let shards = manifest.shards("texts/msrvtt");
    assert!(!shards.is_empty());
    let batches: Vec<_> = shards.iter().flat_map(|s| read_parquet(&index.join(&s.path))).collect();
    let schema = batches[0].schema();
    assert_eq!(schema.field_with_name("text_id").unwrap().data_type(), &DataType::UInt64);
    assert!(schema.field_with_name("video_id").unwrap().is_nullable());
    assert!(matches!(schema.field_with_name("embedding").unwrap().data_type(), DataType::FixedSizeList(_, 32)));
    let tokenizer = ClipTokenizer::new(CONTEXT_LENGTH);
    let mut rows = 0;
    let csv = std::fs::read_to_string(&captions).unwrap();
    let sentences: Vec<&str> = csv.lines().skip(1).map(|l| l.splitn(4, ',').nth(3).unwrap()).collect();
    for batch in &batches {
        let ids = batch.column_by_name("text_id").unwrap().as_primitive::<UInt64Type>();
        let texts = strings(batch, "text");
        let tokens = batch.column_by_name("token_ids").unwrap().as_list::<i32>();
        let embeddings = batch.column_by_name("embedding").unwrap().as_fixed_size_list();
        for (i, text) in texts.iter().enumerate() {
            assert_eq!(ids.value(i), rows as u64);
            assert_eq!(*text, sentences[rows]);
            let want: Vec<i32> = tokenizer.encode(text).into_iter().map(|t| t as i32).collect();
            assert_eq!(tokens.value(i).as_primitive::<Int32Type>().values().to_vec(), want);
            let e = embeddings.value(i);
            let norm: f32 = e.as_primitive::<Float32Type>().values().iter().map(|x| x * x).sum();
            assert!((norm - 1.0).abs() < 1e-5);
            rows += 1;
        }
    }
    assert_eq!(rows, sentences.len());

    // Score with the dual softmax, dense.
    let out = dir.join("scores");
    let (stdout, stderr) = TestCommand::new(&["score", "--index"])
        .arg(&index)
        .args(&["--texts", "msrvtt", "--revise", "dsl", "--dense", "--top-k", "5", "--out"])
        .arg(&out)
        .expect_code(0);
    assert!(stderr.contains("t2v: R@1"), "{stderr}");
    assert!(stdout.contains("topk.parquet") && stdout.contains("metrics.json"), "{stdout}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["revise"], "dsl");
    assert_eq!(metrics["n_texts"], sentences.len());
    assert_eq!(metrics["n_videos"], 12);
    assert_eq!(metrics["n_texts_unmatched"], 0);
    assert_eq!(metrics["t2v"]["n"], sentences.len());
    for key in ["r1", "r5", "r10", "mdr", "mnr"] {
        assert!(metrics["t2v"][key].is_number() && metrics["v2t"][key].is_number(), "{metrics}");
    }
    let videos_txt = std::fs::read_to_string(out.join("videos.txt")).unwrap();
    let columns: Vec<&str> = videos_txt.lines().collect();
    let mut sorted = columns.clone();
    sorted.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!((columns.len(), &columns), (12, &sorted));
    let (t2v, shape) = read_npy(&out.join("t2v.npy"));
    assert_eq!(shape, [sentences.len(), 12]);
    let topk = read_parquet(&out.join("topk.parquet"));
    let top_ids = strings(&topk[0], "video_id");
    let top_scores = topk[0].column_by_name("score").unwrap().as_primitive::<arrow::datatypes::Float64Type>();
    assert_eq!(topk[0].num_rows(), sentences.len() * 5);
    // Text 0's best video is its row's maximum in t2v.npy.
    let best = (0..12).max_by(|&a, &b| t2v[a].total_cmp(&t2v[b]).then(b.cmp(&a))).unwrap();
    assert_eq!(top_ids[0], columns[best]);
    assert!((top_scores.value(0) as f32 - t2v[best] as f32).abs() <= 1e-6 * t2v[best].abs() as f32);

    // Search: one query, top videos with their best frame's time.
    let (stdout, _) = TestCommand::new(&["search", "a test pattern with a moving clock", "--index"])
        .arg(&index)
        .args(&["-k", "3", "--json"])
        .expect_code(0);
    let hits: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(hits.len(), 3);
    assert!(hits.windows(2).all(|w| w[0]["score"].as_f64() >= w[1]["score"].as_f64()));
    assert!(hits.iter().all(|h| h["best_frame_s"].is_number()), "{stdout}");
}

#[test]
fn csv_json_lines_and_plain_queries_with_their_problems() {
    let dir = Dir::new();
    let index = copy_of_index(&dir);

    // An empty caption is skipped with a warning naming its line: exit 2.
    let csv = dir.create("caps.csv", b"video_id,caption\ntestsrc2_h264,a clock\nbars_mpeg4,   \nnot_indexed,a cat\n");
    let (_, stderr) = encode_text(&index, &csv, &[]).expect_code(2);
    assert!(stderr.contains("line 3: empty caption"), "{stderr}");
    assert!(stderr.contains("2 texts encoded into texts/caps"), "{stderr}");

    // A malformed row stops with the line named; the index keeps what it had.
    let before = std::fs::read_to_string(index.join("manifest.json")).unwrap();
    let bad = dir.create("bad.csv", b"video_id,caption\na,one\nb,two,three\n");
    let (_, stderr) = encode_text(&index, &bad, &[]).expect_code(1);
    assert!(stderr.contains("line 3") && stderr.contains("3 fields where the header has 2"), "{stderr}");
    let bad = dir.create("bad.jsonl", b"{\"text\": \"fine\"}\n{\"text\": \n");
    let (_, stderr) = encode_text(&index, &bad, &[]).expect_code(1);
    assert!(stderr.contains("line 2: not a JSON object"), "{stderr}");
    assert_eq!(std::fs::read_to_string(index.join("manifest.json")).unwrap(), before);

    // Texts whose video is not in the index are counted, not queries.
    let out = dir.join("out");
    TestCommand::new(&["score", "--index"]).arg(&index).args(&["--texts", "caps", "--out"]).arg(&out).expect_code(0);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!((metrics["n_texts"].as_u64(), metrics["n_texts_unmatched"].as_u64()), (Some(2), Some(1)));
    assert_eq!(metrics["t2v"]["n"], 1);

    // Plain queries have no video: top-k only, no metrics.
    let queries = dir.create("queries.txt", b"a clock\n\nfractal zoom\n");
    encode_text(&index, &queries, &[]).expect_code(0);
    let out = dir.join("plain");
    TestCommand::new(&["score", "--index"]).arg(&index).args(&["--texts", "queries", "--out"]).arg(&out).expect_code(0);
    assert!(!out.join("metrics.json").exists());
    assert_eq!(read_parquet(&out.join("topk.parquet"))[0].num_rows(), 2 * 10);

    // JSON Lines with numeric ids; re-encoding a name replaces the set.
    let jsonl = dir.create("queries.jsonl", b"{\"video_id\": null, \"sentence\": \"a dog\"}\n");
    let (_, stderr) = encode_text(&index, &jsonl, &["--name", "queries"]).expect_code(0);
    assert!(stderr.contains("replacing the earlier set"), "{stderr}");
    let manifest = vtr_index::store::Manifest::load(&index).unwrap().unwrap();
    assert_eq!(manifest.rows("texts/queries"), 1);
    TestCommand::new(&["verify", "--index"]).arg(&index).expect_code(0);

    // Unknown sets and QB-Norm without a bank are clear errors.
    let (_, stderr) = TestCommand::new(&["score", "--index"])
        .arg(&index)
        .args(&["--texts", "nope", "--out"])
        .arg(&out)
        .expect_code(1);
    assert!(stderr.contains("no text set named nope") && stderr.contains("caps, queries"), "{stderr}");
    let (_, stderr) = TestCommand::new(&["score", "--index"])
        .arg(&index)
        .args(&["--texts", "caps", "--revise", "qbnorm", "--out"])
        .arg(&out)
        .expect_code(1);
    assert!(stderr.contains("needs --bank"), "{stderr}");
    TestCommand::new(&["score", "--index"])
        .arg(&index)
        .args(&["--texts", "caps", "--revise", "qbnorm", "--bank", "queries", "--out"])
        .arg(&out)
        .expect_code(0);
}

#[test]
fn another_model_is_refused_and_a_second_writer_waits_its_turn() {
    let dir = Dir::new();
    let index = copy_of_index(&dir);
    let queries = dir.create("q.txt", b"a clock\n");

    let other = other_model(&dir);
    let (_, stderr) = encode_text(&index, &queries, &["--model"]).arg(&other).expect_code(1);
    assert!(stderr.contains("is not the model this index was built with"), "{stderr}");
    // A copy of the same model is fine.
    let copy = dir.copy(&sample().join("model"), "copy-model");
    encode_text(&index, &queries, &["--model"]).arg(&copy).expect_code(0);

    // While another writer holds the index, encode-text and ingest stop at once, naming it.
    let lock = vtr_index::store::WriterLock::acquire(&index, "ingest").unwrap();
    let (_, stderr) = encode_text(&index, &queries, &[]).expect_code(1);
    assert!(stderr.contains("another writer holds this index") && stderr.contains("(ingest)"), "{stderr}");
    let (code, stderr) = ingest(&index, &[&fixtures().join("videos")], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("another writer holds this index"), "{stderr}");
    drop(lock);
    encode_text(&index, &queries, &[]).expect_code(0);
}

/// `score --device cuda` gives the CPU's metrics where a GPU is present, and otherwise fails
/// saying why: a build without the `cuda` feature, no CUDA driver, or no device.
/// `score --device cuda` where the build or the machine cannot: exit 1 with the reason. Where
/// `info --gpu` finds a device, the comparison below runs instead (`--ignored`).
#[test]
fn scoring_on_cuda_without_a_device_says_why_not() {
    let (info, _) = TestCommand::new(&["info", "--gpu"]).expect_code(0);
    if info.lines().any(|l| l.strip_prefix("cuda:").is_some_and(|rest| rest.trim_start().starts_with("ready"))) {
        return; // A device: `scoring_on_cuda_matches_the_cpu` is the test that applies.
    }
    let dir = Dir::new();
    let index = copy_of_index(&dir);
    encode_text(&index, &fixtures().join("videos_captions_msrvtt.csv"), &["--name", "msrvtt"]).expect_code(0);
    let (_, stderr) = score_on(&index, "cuda", &dir.join("gpu")).expect_code(1);
    assert!(stderr.contains("cannot score on cuda:0"), "{stderr}");
    let reasons = ["scores on the CPU only", "no CUDA driver", "no CUDA device"];
    assert!(reasons.iter().any(|r| stderr.contains(r)), "{stderr}");
}

#[test]
#[ignore = "needs a CUDA device: run with -- --ignored"]
fn scoring_on_cuda_matches_the_cpu() {
    let dir = Dir::new();
    let index = copy_of_index(&dir);
    encode_text(&index, &fixtures().join("videos_captions_msrvtt.csv"), &["--name", "msrvtt"]).expect_code(0);
    let (cpu_out, gpu_out) = (dir.join("cpu"), dir.join("gpu"));
    score_on(&index, "cpu", &cpu_out).expect_code(0);
    score_on(&index, "cuda", &gpu_out).expect_code(0);
    let metrics = |out: &PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap()
    };
    let (on_cpu, on_gpu) = (metrics(&cpu_out), metrics(&gpu_out));
    assert_eq!((&on_gpu["t2v"], &on_gpu["v2t"]), (&on_cpu["t2v"], &on_cpu["v2t"]));
}

fn score_on(index: &std::path::Path, device: &str, out: &std::path::Path) -> TestCommand {
    TestCommand::new(&["score", "--index"])
        .arg(index)
        .args(&["--texts", "msrvtt", "--revise", "dsl-sym", "--device", device, "--out"])
        .arg(out)
}
