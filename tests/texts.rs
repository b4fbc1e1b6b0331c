//! encode-text, score and search through the command line, on an index of the fixture videos.

use std::path::PathBuf;
use std::sync::OnceLock;

use arrow::array::AsArray;
use std::collections::HashMap;

use arrow::datatypes::{DataType, Float32Type, Int32Type, Int64Type, UInt64Type};

use crate::tolerance::*;
use crate::util::*;

/// The fixture videos, ingested once; each test works on its own copy.
fn indexed_videos() -> &'static PathBuf {
    static TEMPLATE: OnceLock<(Dir, PathBuf)> = OnceLock::new();
    &TEMPLATE
        .get_or_init(|| {
            let dir = Dir::new();
            let index = dir.join("index");
            let (code, stderr) = ingest_exit_and_stderr(&index, &[&fixtures().join("videos")], &[]);
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
    let mut rows = 0;
    let csv = std::fs::read_to_string(&captions).unwrap();
    let sentences: Vec<&str> = csv.lines().skip(1).map(|l| l.splitn(4, ',').nth(3).unwrap()).collect();
    let caption_videos: Vec<&str> = csv.lines().skip(1).map(|l| l.split(',').nth(2).unwrap()).collect();
    for batch in &batches {
        let ids = batch.column_by_name("text_id").unwrap().as_primitive::<UInt64Type>();
        let texts = strings(batch, "text");
        let embeddings = batch.column_by_name("embedding").unwrap().as_fixed_size_list();
        for (i, text) in texts.iter().enumerate() {
            assert_eq!(ids.value(i), rows as u64);
            assert_eq!(*text, sentences[rows]);
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
    let videos_txt = std::fs::read_to_string(out.join("videos.txt")).unwrap();
    let columns: Vec<&str> = videos_txt.lines().collect();
    let mut sorted = columns.clone();
    sorted.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!((columns.len(), &columns), (12, &sorted));
    let (t2v, shape) = read_npy(&out.join("t2v.npy"));
    assert_eq!(shape, [sentences.len(), 12]);
    // The metrics, computed here from the dense matrices by contract §5's definitions.
    let (v2t, _) = read_npy(&out.join("v2t.npy"));
    let column = |video: &str| columns.iter().position(|c| *c == video).unwrap();
    let t2v_ranks: Vec<usize> = (0..sentences.len())
        .map(|t| {
            let row = &t2v[t * 12..(t + 1) * 12];
            let own = row[column(caption_videos[t])];
            1 + row.iter().filter(|&&s| s > own).count()
        })
        .collect();
    let captioned: Vec<&str> = columns.iter().copied().filter(|c| caption_videos.contains(c)).collect();
    let group_score = |video: &str, of: &str| {
        let texts = (0..sentences.len()).filter(|&t| caption_videos[t] == of);
        texts.map(|t| v2t[t * 12 + column(video)]).fold(f64::NEG_INFINITY, f64::max)
    };
    let v2t_ranks: Vec<usize> = captioned
        .iter()
        .map(|video| {
            let own = group_score(video, video);
            1 + captioned.iter().filter(|other| group_score(video, other) > own).count()
        })
        .collect();
    for (direction, ranks) in [("t2v", t2v_ranks), ("v2t", v2t_ranks)] {
        let want = metrics_of(&ranks);
        for (key, value) in ["r1", "r5", "r10", "mdr", "mnr"].iter().zip(want) {
            let got = metrics[direction][key].as_f64().unwrap();
            assert!((got - value).abs() <= METRICS_ABS, "{direction} {key}: {got}, by the definition {value}");
        }
        assert_eq!(metrics[direction]["n"], ranks.len());
    }
    let topk = read_parquet(&out.join("topk.parquet"));
    let top_ids = strings(&topk[0], "video_id");
    let top_scores = topk[0].column_by_name("score").unwrap().as_primitive::<arrow::datatypes::Float64Type>();
    assert_eq!(topk[0].num_rows(), sentences.len() * 5);
    // Text 0's best video is its row's maximum in t2v.npy.
    let best = (0..12).max_by(|&a, &b| t2v[a].total_cmp(&t2v[b]).then(b.cmp(&a))).unwrap();
    assert_eq!(top_ids[0], columns[best]);
    assert!((top_scores.value(0) as f32 - t2v[best] as f32).abs() <= 1e-6 * t2v[best].abs() as f32);

    // Search: one query, top videos with their best frame's time, against the tables: the
    // query's embedding as encode-text stores it, every video's and frame's from the index.
    let query = "a test pattern with a moving clock";
    let queries = dir.create("query.txt", format!("{query}\n").as_bytes());
    encode_text(&index, &queries, &["--name", "query"]).expect_code(0);
    let manifest = vtr_index::store::Manifest::load(&index).unwrap().unwrap();
    let stored = |table: &str| -> Vec<arrow::array::RecordBatch> {
        manifest.shards(table).iter().flat_map(|s| read_parquet(&index.join(&s.path))).collect()
    };
    let query_embedding = fixed_lists(&stored("texts/query")[0], "embedding").remove(0);
    let dot = |e: &[f32]| e.iter().zip(&query_embedding).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>();
    let scale = f64::from(manifest.model.logit_scale).exp();
    let mut reference: Vec<ReferenceVideo> = Vec::new();
    for batch in stored("videos") {
        for (id, e) in strings(&batch, "video_id").into_iter().zip(fixed_lists(&batch, "embedding")) {
            reference.push(ReferenceVideo { video_id: id, score: scale * dot(&e), frames: Vec::new() });
        }
    }
    for batch in stored("frames") {
        let pts = batch.column_by_name("pts_s").unwrap().as_primitive::<arrow::datatypes::Float64Type>();
        for (i, (id, e)) in strings(&batch, "video_id").into_iter().zip(fixed_lists(&batch, "embedding")).enumerate() {
            let video = reference.iter_mut().find(|v| v.video_id == id).unwrap();
            video.frames.push((dot(&e), pts.value(i)));
        }
    }
    let search = |index: &std::path::Path| {
        let (stdout, _) =
            TestCommand::new(&["search", query, "--index"]).arg(index).args(&["-k", "12", "--json"]).expect_code(0);
        search_hits(&stdout)
    };
    // From the search segments (f16): the reference's results up to their rounding.
    let hits = search(&index);
    assert_search_matches(&hits, &reference, 12, scale);
    // Not every best frame is the first: a search that returned each video's first frame fails.
    assert!(hits.iter().any(|h| h.best_frame_s.unwrap() > 0.0), "{hits:?}");
    // From the tables of the same index in format 4 (no segments): the reference's, in f32.
    let older = dir.copy(&index, "index-v4");
    as_older_format(&older, 4);
    let mut exact: Vec<&ReferenceVideo> = reference.iter().collect();
    exact.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.video_id.as_bytes().cmp(b.video_id.as_bytes())));
    let from_tables = search(&older);
    assert_eq!(from_tables.len(), 12);
    for (hit, want) in from_tables.iter().zip(&exact) {
        assert_eq!(hit.video_id, want.video_id);
        assert!((hit.score - want.score).abs() <= 1e-4, "{}: {} against {}", want.video_id, hit.score, want.score);
        let best = want.frames.iter().fold((f64::NEG_INFINITY, 0.0), |b, &f| if f.0 > b.0 { f } else { b });
        assert_eq!(hit.best_frame_s, Some(best.1), "{}: the best frame's time", want.video_id);
    }
}

/// R@1, R@5, R@10, median and mean rank of a list of ranks (contract §5).
fn metrics_of(ranks: &[usize]) -> [f64; 5] {
    let n = ranks.len() as f64;
    let recall = |k: usize| 100.0 * ranks.iter().filter(|&&r| r <= k).count() as f64 / n;
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable();
    let median = match sorted.len() % 2 {
        1 => sorted[sorted.len() / 2] as f64,
        _ => (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) as f64 / 2.0,
    };
    [recall(1), recall(5), recall(10), median, ranks.iter().sum::<usize>() as f64 / n]
}

/// A `FixedSizeList<Float32>` column as vectors.
fn fixed_lists(batch: &arrow::array::RecordBatch, name: &str) -> Vec<Vec<f32>> {
    let column = batch.column_by_name(name).unwrap().as_fixed_size_list();
    (0..arrow::array::Array::len(column))
        .map(|i| column.value(i).as_primitive::<Float32Type>().values().to_vec())
        .collect()
}

/// The stored token ids and embeddings of `encode-text` over `reference/captions.txt` equal
/// CLIP's tokenizer (transformers) and transformers' text tower, through the whole command.
#[test]
fn encoded_texts_match_the_reference_tokenizer_and_tower() {
    let dir = Dir::new();
    let index = copy_of_index(&dir);
    encode_text(&index, &fixtures().join("reference/captions.txt"), &["--name", "reference"]).output();
    let manifest = vtr_index::store::Manifest::load(&index).unwrap().unwrap();
    let mut stored: HashMap<String, (Vec<u32>, Vec<f32>)> = HashMap::new();
    for shard in manifest.shards("texts/reference") {
        for batch in read_parquet(&index.join(&shard.path)) {
            let tokens = batch.column_by_name("token_ids").unwrap().as_list::<i32>();
            let embeddings = fixed_lists(&batch, "embedding");
            for (i, (text, embedding)) in strings(&batch, "text").into_iter().zip(embeddings).enumerate() {
                let ids = tokens.value(i).as_primitive::<Int32Type>().values().iter().map(|&t| t as u32).collect();
                stored.insert(text, (ids, embedding));
            }
        }
    }
    let mut compared = 0;
    for batch in read_parquet(&fixtures().join("reference/text_tiny.parquet")) {
        let tokens = batch.column_by_name("token_ids").unwrap().as_list::<i32>();
        for (i, (text, embedding)) in
            strings(&batch, "text").into_iter().zip(double_lists_as_f32(&batch, "embedding")).enumerate()
        {
            let want: Vec<u32> =
                tokens.value(i).as_primitive::<Int64Type>().values().iter().map(|&t| t as u32).collect();
            let Some((ids, got)) = stored.get(text.trim()).or_else(|| stored.get(&text)) else {
                assert!(text.trim().is_empty(), "{text:?} was not stored");
                continue;
            };
            assert_eq!(ids, &want, "{text:?}");
            let c = cosine(got, &embedding);
            assert!(c >= SAME_INPUT_COSINE, "{text:?}: cosine {c}");
            compared += 1;
        }
    }
    assert!(compared >= 40, "{compared} texts compared");
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

    // TSV (MSR-VTT and VATEX exports): tab-separated, so a caption keeps its commas.
    let tsv =
        dir.create("caps_tab.tsv", b"video_id\tsentence\ntestsrc2_h264\ta clock, ticking\nbars_mpeg4\tcolour bars\n");
    encode_text(&index, &tsv, &[]).expect_code(0);
    let manifest = vtr_index::store::Manifest::load(&index).unwrap().unwrap();
    let batch = &read_parquet(&index.join(&manifest.shards("texts/caps_tab")[0].path))[0];
    assert_eq!(strings(batch, "text"), ["a clock, ticking", "colour bars"]);
    assert_eq!(strings(batch, "video_id"), ["testsrc2_h264", "bars_mpeg4"]);

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
    // Its record and ranks are written all the same: every text, none a query.
    let record = vtr_index::store::read_score_folder(&out).unwrap();
    assert_eq!((record.n_texts, record.texts.as_str()), (2, "queries"));
    assert_eq!(read_parquet(&out.join("t2v_ranks.parquet")).iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    assert_eq!(read_parquet(&out.join("v2t_ranks.parquet")).iter().map(|b| b.num_rows()).sum::<usize>(), 0);
    // An earlier run's metrics left beside them make the folder mixed, not one run's outputs.
    let caps_run = vtr_index::store::read_score_folder(&dir.join("out")).unwrap();
    std::fs::copy(dir.join("out/metrics.json"), out.join("metrics.json")).unwrap();
    let mixed = vtr_index::store::read_score_folder(&out).unwrap_err().to_string();
    assert!(mixed.contains("mixed outputs: metrics.json is of run") && mixed.contains(&caps_run.run_id), "{mixed}");
    let index_manifest = vtr_index::store::Manifest::load(&index).unwrap().unwrap();
    let shards: Vec<String> = index_manifest.shards("videos").iter().map(|s| s.sha256.clone()).collect();
    assert_eq!(caps_run.videos_sha256, shards, "the videos scored, by content");

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
    assert!(stderr.contains("no text set named nope") && stderr.contains("caps, caps_tab, queries"), "{stderr}");
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
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&fixtures().join("videos")], &[]);
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

/// Replaces the embedding of row `row` of a shard by what `change` makes of it, keeping every
/// other column, and returns that row's id column as text (`text_id` or `video_id`).
fn change_embedding(shard: &std::path::Path, row: usize, change: impl Fn(&mut [f32])) -> String {
    use arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch};
    let batches = read_parquet(shard);
    let schema = batches[0].schema();
    let mut id = String::new();
    let mut offset = 0;
    let changed: Vec<RecordBatch> = batches
        .iter()
        .map(|batch| {
            let column = schema.index_of("embedding").unwrap();
            let list = batch.column(column).as_fixed_size_list();
            let dim = list.value_length() as usize;
            let mut values = list.values().as_primitive::<Float32Type>().values().to_vec();
            if (offset..offset + batch.num_rows()).contains(&row) {
                let local = row - offset;
                change(&mut values[local * dim..(local + 1) * dim]);
                id = match batch.column_by_name("text_id") {
                    Some(ids) => ids.as_primitive::<UInt64Type>().value(local).to_string(),
                    None => strings(batch, "video_id")[local].clone(),
                };
            }
            offset += batch.num_rows();
            let field = match schema.field(column).data_type() {
                DataType::FixedSizeList(field, _) => field.clone(),
                other => panic!("embedding is {other}"),
            };
            let list =
                FixedSizeListArray::new(field, dim as i32, std::sync::Arc::new(Float32Array::from(values)), None);
            let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
            columns[column] = std::sync::Arc::new(list);
            RecordBatch::try_new(schema.clone(), columns).unwrap()
        })
        .collect();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(shard).unwrap(), schema.clone(), None).unwrap();
    changed.iter().for_each(|b| writer.write(b).unwrap());
    writer.close().unwrap();
    assert!(!id.is_empty(), "{} has no row {row}", shard.display());
    id
}

/// A table `score` or `search` reads with an embedding that is not a unit vector (a NaN from a
/// broken checkpoint, a zero vector normalised, an unnormalised export) is refused before any
/// output is written, naming the table, the row and what is wrong: a NaN would rank first and
/// make every column's sums NaN, silently raising R@1. The split stages refuse it too.
#[test]
fn scoring_refuses_embeddings_that_are_not_unit_vectors() {
    let dir = Dir::new();
    let index = copy_of_index(&dir);
    encode_text(&index, &fixtures().join("videos_captions_msrvtt.csv"), &["--name", "msrvtt"]).expect_code(0);
    let manifest = vtr_index::store::Manifest::load(&index).unwrap().unwrap();
    let text_shard = index.join(&manifest.shards("texts/msrvtt")[0].path);
    let video_shard = index.join(&manifest.shards("videos")[0].path);
    let pristine = (std::fs::read(&text_shard).unwrap(), std::fs::read(&video_shard).unwrap());
    let score = |out: &std::path::Path| score_on(&index, "cpu", out);
    let refused = |command: TestCommand, words: &[&str]| {
        let (_, stderr) = command.expect_code(1);
        for word in words {
            assert!(stderr.contains(word), "{word:?} is missing from: {stderr}");
        }
    };

    let text_id = change_embedding(&text_shard, 2, |e| e[3] = f32::NAN);
    let out = dir.join("nan");
    refused(score(&out), &["text set msrvtt", &format!("text_id {text_id}"), "NaN at position 3"]);
    assert!(!out.join("metrics.json").exists() && !out.join("topk.parquet").exists(), "nothing is written");
    let work = dir.join("work");
    let stage = score(&out).args(&["--stage", "stats", "--part", "0/2"]).arg("--work").arg(&work);
    refused(stage, &["text set msrvtt", &format!("text_id {text_id}")]);
    std::fs::write(&text_shard, &pristine.0).unwrap();

    // A zero vector, normalised, and a vector that was never normalised, among the videos.
    let normalised_zero = |e: &mut [f32]| {
        let norm = e.iter().map(|x| x * 0.0).sum::<f32>().sqrt();
        e.iter_mut().for_each(|x| *x = *x * 0.0 / norm);
    };
    let video = change_embedding(&video_shard, 1, normalised_zero);
    refused(score(&dir.join("zero")), &["the videos table", &format!("video {video:?}"), "NaN at position 0"]);
    std::fs::write(&video_shard, &pristine.1).unwrap();
    let video = change_embedding(&video_shard, 0, |e| e.iter_mut().for_each(|x| *x *= 2.0));
    let norm = format!("has norm 2.000000, not 1 within {}", vtr_index::store::UNIT_NORM_TOLERANCE);
    refused(score(&dir.join("double")), &["the videos table", &format!("video {video:?}"), &norm]);
    // Search reads the video embeddings from the search segment beside the shard: the same
    // vector doubled there (f16 halves at the offset its header records, contract §4).
    let search = || TestCommand::new(&["search", "a clock", "--index"]).arg(&index);
    let segment = index.join(&manifest.shards("videos")[0].segment.as_ref().unwrap().path);
    let pristine_segment = std::fs::read(&segment).unwrap();
    let mut doubled = pristine_segment.clone();
    let start = u64::from_le_bytes(doubled[56..64].try_into().unwrap()) as usize;
    for half in doubled[start..start + 2 * manifest.model.embed_dim].chunks_exact_mut(2) {
        let x = half::f16::from_le_bytes([half[0], half[1]]).to_f32() * 2.0;
        half.copy_from_slice(&half::f16::from_f32(x).to_le_bytes());
    }
    std::fs::write(&segment, &doubled).unwrap();
    let (_, stderr) = search().expect_code(1);
    assert!(stderr.contains("the videos table") && stderr.contains(&format!("video {video:?}")), "{stderr}");
    // Doubled in f16: 2 within f16's rounding of the row.
    let norm: f64 = stderr.split("has norm ").nth(1).and_then(|r| r.split(',').next()?.parse().ok()).expect(&stderr);
    assert!((norm - 2.0).abs() < 2e-3 && stderr.contains("not 1 within"), "{stderr}");
    std::fs::write(&video_shard, &pristine.1).unwrap();
    std::fs::write(&segment, &pristine_segment).unwrap();
    search().expect_code(0);
    score(&dir.join("restored")).expect_code(0);
}
