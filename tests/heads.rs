//! CLIP4Clip's temporal heads (contract §1) against CLIP4Clip's own code: `reference/clip4clip/`,
//! made by `make/clip4clip_heads.py` from the same hashed checkpoints these tests build. The
//! head alone on identical frame embeddings, a whole ingest, independence from the batch, and
//! what is refused (tightTransf, a head the checkpoint lacks, another head on an index, more
//! frames than positions).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use vtr_index::model::{Checkpoint, HeadConfig};
use vtr_index::types::HeadKind;

use crate::checkpoints::{hashed_openai_tensors, hashed_tensor};
use crate::tolerance::*;
use crate::util::*;

const WIDTH: usize = 128;
const HEADS: [HeadKind; 2] = [HeadKind::SeqTransf, HeadKind::SeqLstm];

/// `make/clip4clip_heads.py`'s head tensors: the hash with offset 1 and scale 0.1 for the
/// blocks' LayerNorm weights, offset 0 and scale 0.1 for every other tensor.
fn head_tensors(head: HeadKind) -> HashMap<String, Tensor> {
    let w = WIDTH;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("frame_position_embeddings.weight".into(), vec![77, w])];
    if head == HeadKind::SeqTransf {
        for i in 0..2 {
            let p = format!("transformerClip.resblocks.{i}");
            for (name, shape) in [
                ("attn.in_proj_weight", vec![3 * w, w]),
                ("attn.in_proj_bias", vec![3 * w]),
                ("attn.out_proj.weight", vec![w, w]),
                ("attn.out_proj.bias", vec![w]),
                ("ln_1.weight", vec![w]),
                ("ln_1.bias", vec![w]),
                ("ln_2.weight", vec![w]),
                ("ln_2.bias", vec![w]),
                ("mlp.c_fc.weight", vec![4 * w, w]),
                ("mlp.c_fc.bias", vec![4 * w]),
                ("mlp.c_proj.weight", vec![w, 4 * w]),
                ("mlp.c_proj.bias", vec![w]),
            ] {
                shapes.push((format!("{p}.{name}"), shape));
            }
        }
    } else {
        for (name, shape) in [
            ("weight_ih_l0", vec![4 * w, w]),
            ("weight_hh_l0", vec![4 * w, w]),
            ("bias_ih_l0", vec![4 * w]),
            ("bias_hh_l0", vec![4 * w]),
        ] {
            shapes.push((format!("lstm_visual.{name}"), shape));
        }
    }
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let layer_norm = name.ends_with("ln_1.weight") || name.ends_with("ln_2.weight");
            let tensor = hashed_tensor(&name, &shape, if layer_norm { 1.0 } else { 0.0 }, 0.1);
            (name, tensor)
        })
        .collect()
}

/// The script's checkpoint for `head` (plus `extra` tensors), named as CLIP4Clip saves it:
/// `clip.` + a hashed CLIP of width 128, embed 128, patch 32, and the head beside it.
fn head_checkpoint(dir: &Dir, head: HeadKind, extra: HashMap<String, Tensor>) -> PathBuf {
    let mut tensors: HashMap<String, Tensor> =
        hashed_openai_tensors(WIDTH, 32, 7, WIDTH).into_iter().map(|(k, v)| (format!("clip.{k}"), v)).collect();
    tensors.extend(head_tensors(head));
    tensors.extend(extra);
    let folder = dir.join(head.name());
    std::fs::create_dir_all(&folder).unwrap();
    let path = folder.join("pytorch_model.bin.0");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

/// The raw frame embeddings of `heads.parquet`: `hashed("frames", (12, 128), 0, 1)`.
fn raw_frames() -> Vec<Vec<f32>> {
    hashed_tensor("frames", &[12, WIDTH], 0.0, 1.0).to_vec2::<f32>().unwrap()
}

#[test]
fn each_head_matches_clip4clip_on_the_same_frame_embeddings() {
    let dir = Dir::new();
    let raw = raw_frames();
    let mut checked = 0;
    for batch in read_parquet(&fixtures().join("reference/clip4clip/heads.parquet")) {
        let heads = strings(&batch, "head");
        let counts = batch.column_by_name("frames").unwrap();
        let counts = arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(counts);
        for ((i, head), want) in heads.iter().enumerate().zip(double_lists_as_f32(&batch, "embedding")) {
            let kind = HeadKind::parse(head).unwrap();
            let checkpoint = Checkpoint::open(&head_checkpoint(&dir, kind, HashMap::new())).unwrap();
            let frames = raw[..counts.value(i) as usize].to_vec();
            let (stored, got) = checkpoint.load_head(kind).unwrap().pool(frames.clone()).unwrap();
            let c = cosine(&got, &want);
            eprintln!("{head}, {} frames: 1 − cosine to CLIP4Clip = {:.1e}", frames.len(), 1.0 - c);
            assert!(c >= SAME_INPUT_COSINE, "{head}, {} frames: cosine {c}", frames.len());
            // The frames table keeps the frames' own normalised embeddings, not the head's output.
            for (s, f) in stored.iter().zip(&frames) {
                assert!(cosine(s, f) > 0.999_999 && (s.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
            }
            let (_, mean) = checkpoint.load_head(HeadKind::MeanP).unwrap().pool(frames.clone()).unwrap();
            if frames.len() > 1 {
                assert!(cosine(&got, &mean) < 0.99, "{head}: the head changes the vector");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 6, "two heads × 1, 5 and 12 frames");
}

#[test]
fn checkpoints_report_their_head() {
    let dir = Dir::new();
    let seq_transf = Checkpoint::open(&head_checkpoint(&dir, HeadKind::SeqTransf, HashMap::new())).unwrap();
    assert_eq!(seq_transf.head, Some(HeadConfig::SeqTransf { width: 128, layers: 2, heads: 2, max_positions: 77 }));
    let (stdout, _) = TestCommand::new(&["info", "--model"])
        .arg(head_checkpoint(&dir, HeadKind::SeqLstm, HashMap::new()))
        .expect_code(0);
    assert!(stdout.contains("head:       seqLSTM (1 layer, width 128)"), "{stdout}");
    let (stdout, _) = TestCommand::new(&["info", "--model"]).arg(sample().join("model")).expect_code(0);
    assert!(stdout.contains("head:       none: videos are pooled with meanP"), "{stdout}");
}

/// `ingest` of the fixture videos with `checkpoint`, with `extra` flags; (exit code, stderr).
fn ingest_with(index: &Path, checkpoint: &Path, extra: &[&str]) -> (i32, String) {
    let mut command = TestCommand::new(&["ingest"])
        .arg(fixtures().join("videos"))
        .arg("--index")
        .arg(index)
        .arg("--model")
        .arg(checkpoint);
    for e in extra {
        command = command.arg(e);
    }
    let out = command.output();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The whole ingest with each head (the checkpoint's by default) against the reference ingest
/// (PyAV, CLIPImageProcessor, open_clip's tower, CLIP4Clip's head) at the tolerances of meanP's.
#[test]
fn ingest_with_a_head_matches_the_reference_ingest() {
    let dir = Dir::new();
    // (head, video) → (frame times, normalised frame embeddings, the video's vector)
    type Ingested = (Vec<f32>, Vec<Vec<f32>>, Vec<f32>);
    let mut reference: HashMap<(String, String), Ingested> = HashMap::new();
    for batch in read_parquet(&fixtures().join("reference/clip4clip/ingest.parquet")) {
        let rows = strings(&batch, "head").into_iter().zip(strings(&batch, "video_id"));
        let values = double_lists_as_f32(&batch, "pts_s")
            .into_iter()
            .zip(double_list_lists_as_f32(&batch, "frame_embeddings"))
            .zip(double_lists_as_f32(&batch, "embedding"));
        for ((head, id), ((pts, frames), embedding)) in rows.zip(values) {
            reference.insert((head, id), (pts, frames, embedding));
        }
    }
    for head in HEADS {
        let index = dir.join(&format!("index-{}", head.name()));
        let (code, stderr) = ingest_with(&index, &head_checkpoint(&dir, head, HashMap::new()), &[]);
        assert_eq!(code, 0, "{stderr}");
        let (stdout, _) = TestCommand::new(&["info", "--index"]).arg(&index).expect_code(0);
        assert!(stdout.contains(&format!("head:      {}", head.name())), "{stdout}");
        let got = snapshot(&index).unwrap();
        let mut lowest = 1f64;
        for (id, vector) in &got.videos {
            let (pts, frames, embedding) = &reference[&(head.name().to_string(), id.clone())];
            for (j, (want_pts, want_frame)) in pts.iter().zip(frames).enumerate() {
                let (got_pts, got_frame) = &got.frames[&(id.clone(), j as u32)];
                assert!((got_pts - f64::from(*want_pts)).abs() < INGEST_FRAME_TIME_S, "{id} frame {j}");
                assert!(cosine(got_frame, want_frame) >= INGEST_COSINE, "{id} frame {j}");
            }
            let c = cosine(vector, embedding);
            lowest = lowest.min(c);
            assert!(c >= INGEST_COSINE, "{} {id}: video cosine {c}", head.name());
        }
        assert_eq!(got.videos.len(), 12);
        eprintln!("{}: lowest video cosine over 12 videos: 1 − {:.1e}", head.name(), 1.0 - lowest);
    }
}

/// A video's vector is computed from its own frames alone: batches of 1 and of 7 frames (which
/// split videos across batches and mix them) give the same vectors.
#[test]
fn a_video_vector_does_not_depend_on_its_batch() {
    let dir = Dir::new();
    let checkpoint = head_checkpoint(&dir, HeadKind::SeqTransf, HashMap::new());
    let snapshots: Vec<Snapshot> = ["1", "7"]
        .iter()
        .map(|batch| {
            let index = dir.join(&format!("index-batch-{batch}"));
            let (code, stderr) = ingest_with(&index, &checkpoint, &["--batch", batch]);
            assert_eq!(code, 0, "{stderr}");
            snapshot(&index).unwrap()
        })
        .collect();
    for (id, vector) in &snapshots[0].videos {
        assert_same_bits(vector, &snapshots[1].videos[id], &format!("{id} between batches of 1 and 7"));
    }
}

#[test]
fn heads_that_cannot_be_used_are_refused() {
    let dir = Dir::new();
    let seq_transf = head_checkpoint(&dir, HeadKind::SeqTransf, HashMap::new());
    let videos = fixtures().join("videos");
    // A head the checkpoint does not carry.
    let (code, stderr) = ingest_with(&dir.join("a"), &seq_transf, &["--head", "seqLSTM"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--head seqLSTM") && stderr.contains("carries a seqTransf head"), "{stderr}");
    assert!(!dir.join("a").exists(), "a refused run creates no index");
    // More frames than the head has positions.
    let (code, stderr) = ingest_with(&dir.join("b"), &seq_transf, &["--frames", "78"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--frames 78") && stderr.contains("position embeddings for 77 frames"), "{stderr}");
    // tightTransf gives no vector per video.
    let tight = HashMap::from([(
        "similarity_dense.weight".to_string(),
        Tensor::zeros((1, WIDTH), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    )]);
    let tight_dir = Dir::new();
    let tight = head_checkpoint(&tight_dir, HeadKind::SeqTransf, tight);
    let (code, stderr) = ingest_with(&dir.join("c"), &tight, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("tightTransf"), "{stderr}");
    let (_, stderr) = TestCommand::new(&["ingest"])
        .arg(&videos)
        .arg("--index")
        .arg(dir.join("d"))
        .arg("--head")
        .arg("tightTransf")
        .arg("--model")
        .arg(&seq_transf)
        .expect_code(1);
    assert!(stderr.contains("no vector per video"), "{stderr}");
    // An index keeps its head: meanP chosen over the checkpoint's, then another --head refused.
    let index = dir.join("mean");
    let (code, stderr) = ingest_with(&index, &seq_transf, &["--head", "meanP"]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stderr) = ingest_with(&index, &seq_transf, &["--head", "seqTransf"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("pooled with the meanP head"), "{stderr}");
}

/// An index made before heads existed records none: it is meanP, and a run with a checkpoint
/// that carries a head keeps meanP, says so, and records meanP so it is said once.
#[test]
fn an_index_made_before_heads_keeps_mean_pooling() {
    let dir = Dir::new();
    let checkpoint = head_checkpoint(&dir, HeadKind::SeqTransf, HashMap::new());
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    std::fs::copy(fixtures().join("videos/short_h264.mp4"), corpus.join("a.mp4")).unwrap();
    let index = dir.join("index");
    let run = |extra: &[&str]| {
        let out = TestCommand::new(&["ingest"]).arg(&corpus).arg("--index").arg(&index).arg("--model").arg(&checkpoint);
        let out = extra.iter().fold(out, |c, e| c.arg(e)).output();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = run(&["--head", "meanP"]);
    assert_eq!(code, 0, "{stderr}");
    // Remove the head, as a manifest written before heads existed has none.
    let manifest_path = index.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["model"].as_object_mut().unwrap().remove("head").expect("a head is recorded");
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    let (stdout, _) = TestCommand::new(&["info", "--index"]).arg(&index).expect_code(0);
    assert!(stdout.contains("head:      meanP (made before temporal heads)"), "{stdout}");

    std::fs::copy(fixtures().join("videos/vfr_h264.mp4"), corpus.join("b.mp4")).unwrap();
    let (code, stderr) = run(&[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("made before temporal heads") && stderr.contains("seqTransf head is not used"), "{stderr}");
    let got = snapshot(&index).unwrap();
    let frames: Vec<Vec<f32>> =
        (0..).map_while(|j| got.frames.get(&("b".to_string(), j))).map(|f| f.1.clone()).collect();
    let c = cosine(&got.videos["b"], &vtr_index::model::mean_pool(&frames));
    assert!(c > 0.999_999, "the new video is pooled with meanP: cosine {c}");
    std::fs::copy(fixtures().join("videos/testsrc2_h264.mp4"), corpus.join("c.mp4")).unwrap();
    let (code, stderr) = run(&[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("made before temporal heads"), "said once: {stderr}");
}
