//! The numbers must be CLIP's numbers: the model, preprocessing and whole ingest checked
//! against the transformers / PyAV references in `tests/fixtures/reference`.

use std::collections::HashMap;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use vtr_index::model::tokenizer::{CONTEXT_LENGTH, ClipTokenizer};
use vtr_index::model::{Checkpoint, Clip};
use vtr_index::preprocess::pixel_values;
use vtr_index::types::DeviceChoice;
use vtr_index::types::RgbImage;

use crate::tolerance::*;
use crate::util::*;

fn tiny_clip() -> Clip {
    Clip::load(Checkpoint::open(&fixtures().join("tiny-clip")).unwrap(), DeviceChoice::Cpu).unwrap()
}

struct ReferenceImage {
    name: String,
    pixel_values: Vec<f32>,
    embedding: Vec<f32>,
}

fn reference_images() -> Vec<ReferenceImage> {
    let mut out = Vec::new();
    for batch in read_parquet(&fixtures().join("reference/images/images.parquet")) {
        let names = strings(&batch, "image");
        let pixels = double_lists_as_f32(&batch, "pixel_values");
        let embeddings = double_lists_as_f32(&batch, "embedding");
        for ((name, pixel_values), embedding) in names.into_iter().zip(pixels).zip(embeddings) {
            out.push(ReferenceImage { name, pixel_values, embedding });
        }
    }
    assert!(out.len() >= 5, "the image references are there");
    out
}

fn load_png(name: &str) -> RgbImage {
    let file = std::fs::File::open(fixtures().join("reference/images").join(name)).unwrap();
    let mut decoder = png::Decoder::new(file);
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().unwrap();
    let mut buffer = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buffer).unwrap();
    let data = match info.color_type {
        png::ColorType::Rgb => buffer[..info.buffer_size()].to_vec(),
        png::ColorType::Rgba => buffer[..info.buffer_size()].chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        other => panic!("{name}: unexpected PNG colour type {other:?}"),
    };
    RgbImage { width: info.width, height: info.height, data }
}

#[test]
fn image_tower_matches_transformers_on_identical_pixels() {
    let clip = tiny_clip();
    let images = reference_images();
    let pixels: Vec<f32> = images.iter().flat_map(|i| i.pixel_values.iter().copied()).collect();
    let embeddings = clip.embed_images(&pixels, images.len()).unwrap();
    for (image, embedding) in images.iter().zip(embeddings.chunks(clip.embed_dim())) {
        let c = cosine(embedding, &image.embedding);
        assert!(c >= SAME_INPUT_COSINE, "{}: cosine {c}", image.name);
    }
}

/// A frame's embedding has the same bits in any batch (of 1, 7 or 64, at any position in it)
/// and on 1 or 2 threads, and a caption's whatever captions share its batch (the longest one
/// sets every caption's padded length): contract §6, on one machine.
#[test]
fn an_embedding_has_the_same_bits_in_any_batch_and_on_any_thread_count() {
    let clip = tiny_clip();
    let on_threads = |threads: usize| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let size = clip.checkpoint.config.vision.image_size;
    let (per_image, count) = (3 * size * size, 64);
    let mut state = 5u64;
    let pixels: Vec<f32> = (0..count * per_image)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 * 3.9 - 1.8
        })
        .collect();
    let whole = on_threads(2).install(|| clip.embed_images(&pixels, count)).unwrap();
    let dim = whole.len() / count;
    for threads in [1, 2] {
        for (first, batch) in [(0, 1), (0, 7), (3, 7), (0, 64)] {
            for start in (first..count).step_by(batch) {
                let n = batch.min(count - start);
                let part = on_threads(threads)
                    .install(|| clip.embed_images(&pixels[start * per_image..(start + n) * per_image], n))
                    .unwrap();
                for i in 0..n {
                    let what = format!("image {} in a batch of {n} from {start}, {threads} threads", start + i);
                    assert_same_bits(
                        &part[i * dim..(i + 1) * dim],
                        &whole[(start + i) * dim..(start + i + 1) * dim],
                        &what,
                    );
                }
            }
        }
    }
    let caption = |length: usize| -> Vec<u32> {
        let words = (0..length - 2).map(|i| 320 + (i as u32 * 7919) % 40_000);
        std::iter::once(49406).chain(words).chain(std::iter::once(49407)).collect()
    };
    let (short, long) = (caption(9), caption(CONTEXT_LENGTH));
    let alone = clip.embed_texts(std::slice::from_ref(&short)).unwrap();
    for threads in [1, 2] {
        let beside_long = on_threads(threads).install(|| clip.embed_texts(&[long.clone(), short.clone()])).unwrap();
        let dim = alone.len();
        assert_same_bits(&beside_long[dim..], &alone, &format!("a caption beside a longer one, {threads} threads"));
    }
}

#[test]
fn preprocessing_matches_clip_image_processor() {
    let clip = tiny_clip();
    for image in reference_images() {
        let rgb = load_png(&image.name);
        let ours = pixel_values(&rgb, &clip.checkpoint.preprocess).unwrap();
        assert_eq!(ours.len(), image.pixel_values.len(), "{}", image.name);
        let mad: f64 =
            ours.iter().zip(&image.pixel_values).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / ours.len() as f64;
        assert!(mad <= PIXEL_MEAN_ABS, "{}: mean absolute difference {mad}", image.name);
        let embedding = clip.embed_images(&ours, 1).unwrap();
        let c = cosine(&embedding, &image.embedding);
        assert!(c >= PIXEL_EMBEDDING_COSINE, "{}: cosine {c}", image.name);
    }
}

#[test]
fn older_config_styles_load_to_identical_outputs() {
    let clip = tiny_clip();
    let image = &reference_images()[0];
    let expected = clip.embed_images(&image.pixel_values, 1).unwrap();
    for legacy in ["config_legacy.json", "config_legacy_dicts.json"] {
        let dir = Dir::new();
        dir.copy(&fixtures().join("tiny-clip").join(legacy), "model/config.json");
        std::os::unix::fs::symlink(fixtures().join("tiny-clip/model.safetensors"), dir.join("model/model.safetensors"))
            .unwrap();
        let other = Clip::load(Checkpoint::open(&dir.join("model")).unwrap(), DeviceChoice::Cpu).unwrap();
        assert_eq!(other.embed_dim(), 32, "{legacy}");
        let got = other.embed_images(&image.pixel_values, 1).unwrap();
        let max_diff = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-6, "{legacy}: differs by {max_diff}");
    }
}

/// Writes tiny-clip with one tensor changed by `edit` and returns the load error.
fn load_error_after(edit: impl FnOnce(&mut HashMap<String, candle_core::Tensor>)) -> String {
    let mut tensors =
        candle_core::safetensors::load(fixtures().join("tiny-clip/model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    edit(&mut tensors);
    let dir = Dir::new();
    dir.copy(&fixtures().join("tiny-clip/config.json"), "model/config.json");
    candle_core::safetensors::save(&tensors, dir.join("model/model.safetensors")).unwrap();
    match Checkpoint::open(&dir.join("model")).and_then(|c| Clip::load(c, DeviceChoice::Cpu)) {
        Ok(_) => panic!("a damaged checkpoint loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_weight_is_an_error_naming_the_tensor() {
    let message = load_error_after(|t| {
        t.remove("vision_model.embeddings.class_embedding");
    });
    assert!(message.contains("vision_model.embeddings.class_embedding"), "{message}");
}

#[test]
fn misshapen_weight_is_an_error_naming_the_tensor() {
    let message = load_error_after(|t| {
        let bad = candle_core::Tensor::zeros((31, 64), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        t.insert("visual_projection.weight".into(), bad);
    });
    assert!(message.contains("visual_projection.weight"), "{message}");
}

#[test]
fn ingest_matches_pyav_and_transformers_reference() {
    let dir = Dir::new();
    let index = dir.join("index");
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&fixtures().join("videos")], &[]);
    assert_eq!(code, 0, "{stderr}");

    let mut ours: HashMap<String, Vec<(u32, f64, Vec<f32>)>> = HashMap::new();
    for shard in std::fs::read_dir(index.join("frames")).unwrap() {
        for batch in read_parquet(&shard.unwrap().path()) {
            let rows: Vec<vtr_index::store::FrameRow> = vtr_index::store::TableRows::from_batch(&batch).unwrap();
            for r in rows {
                ours.entry(r.video_id).or_default().push((r.frame_index, r.pts_s, r.embedding));
            }
        }
    }
    let mut video_embeddings: HashMap<String, Vec<f32>> = HashMap::new();
    for shard in std::fs::read_dir(index.join("videos")).unwrap() {
        for batch in read_parquet(&shard.unwrap().path()) {
            let rows: Vec<vtr_index::store::VideoRow> = vtr_index::store::TableRows::from_batch(&batch).unwrap();
            for r in rows {
                video_embeddings.insert(r.video_id, r.embedding);
            }
        }
    }

    let mut checked = 0;
    for batch in read_parquet(&fixtures().join("reference/ingest_tiny.parquet")) {
        let ids = strings(&batch, "video_id");
        let pts = double_lists_as_f32(&batch, "pts_s");
        let frames = double_list_lists_as_f32(&batch, "frame_embeddings");
        let videos = double_lists_as_f32(&batch, "embedding");
        for i in 0..ids.len() {
            let id = &ids[i];
            let mut got = ours.remove(id).unwrap_or_else(|| panic!("{id} was not indexed"));
            got.sort_by_key(|f| f.0);
            let got_pts: Vec<f64> = got.iter().map(|f| f.1).collect();
            assert_eq!(got.len(), pts[i].len(), "{id}: frames {got_pts:?} vs reference {:?}", pts[i]);
            for (j, frame) in got.iter().enumerate() {
                assert!(
                    (frame.1 - pts[i][j] as f64).abs() < INGEST_FRAME_TIME_S,
                    "{id}: pts {got_pts:?} vs {:?}",
                    pts[i]
                );
                let c = cosine(&frame.2, &frames[i][j]);
                assert!(c >= INGEST_COSINE, "{id} frame {j} at {:.3} s: cosine {c}", frame.1);
            }
            let c = cosine(&video_embeddings[id], &videos[i]);
            assert!(c >= INGEST_COSINE, "{id}: video cosine {c}");
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
    assert!(ours.is_empty(), "indexed videos the reference does not have: {:?}", ours.keys());
}

struct ReferenceText {
    text: String,
    token_ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn reference_texts() -> Vec<ReferenceText> {
    let mut out = Vec::new();
    for batch in read_parquet(&fixtures().join("reference/text_tiny.parquet")) {
        let tokens = batch.column_by_name("token_ids").unwrap().as_list::<i32>();
        let texts = strings(&batch, "text");
        let embeddings = double_lists_as_f32(&batch, "embedding");
        for (i, (text, embedding)) in texts.into_iter().zip(embeddings).enumerate() {
            let ids = tokens.value(i).as_primitive::<Int64Type>().values().iter().map(|&t| t as u32).collect();
            out.push(ReferenceText { text, token_ids: ids, embedding });
        }
    }
    assert!(out.len() >= 40, "the text references are there");
    out
}

#[test]
fn tokenizer_gives_the_official_clip_token_ids() {
    let tokenizer = ClipTokenizer::new(CONTEXT_LENGTH);
    for reference in reference_texts() {
        assert_eq!(tokenizer.encode(&reference.text), reference.token_ids, "{:?}", reference.text);
    }
}

#[test]
fn text_tower_matches_transformers_on_identical_tokens() {
    let clip = tiny_clip();
    let references = reference_texts();
    let tokens: Vec<Vec<u32>> = references.iter().map(|r| r.token_ids.clone()).collect();
    // One batch: sequences of different lengths padded together must not disturb each other.
    let embeddings = clip.embed_texts(&tokens).unwrap();
    for (reference, embedding) in references.iter().zip(embeddings.chunks(clip.embed_dim())) {
        let c = cosine(embedding, &reference.embedding);
        assert!(c >= SAME_INPUT_COSINE, "{:?}: cosine {c}", reference.text);
    }
}
