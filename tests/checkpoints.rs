//! Every checkpoint layout users bring: OpenAI / open_clip and CLIP4Clip files with no config
//! against transformers' outputs on the same float16-rounded weights, Hugging Face weights in
//! f16 and bf16, other ViT shapes and an open_clip training checkpoint against open_clip, and
//! the messages for broken or foreign files.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use vtr_index::model::tokenizer::{CONTEXT_LENGTH, ClipTokenizer};
use vtr_index::model::{Checkpoint, Clip, Layout};
use vtr_index::types::{DeviceChoice, Precision};

use crate::tolerance::*;
use crate::util::*;

fn openai_format() -> std::path::PathBuf {
    fixtures().join("openai-format")
}

/// `openai_reference.parquet`: (kind, input) → embedding.
fn openai_reference() -> Vec<(String, String, Vec<f32>)> {
    let mut out = Vec::new();
    for batch in read_parquet(&openai_format().join("openai_reference.parquet")) {
        let kinds = strings(&batch, "kind");
        let inputs = strings(&batch, "input");
        for ((kind, input), embedding) in kinds.into_iter().zip(inputs).zip(double_lists_as_f32(&batch, "embedding")) {
            out.push((kind, input, embedding));
        }
    }
    assert!(out.iter().any(|r| r.0 == "text") && out.iter().any(|r| r.0 == "image"));
    out
}

/// The preprocessed pixels of the reference images, by file name.
fn reference_pixels() -> HashMap<String, Vec<f32>> {
    let mut out = HashMap::new();
    for batch in read_parquet(&fixtures().join("reference/images/images.parquet")) {
        out.extend(strings(&batch, "image").into_iter().zip(double_lists_as_f32(&batch, "pixel_values")));
    }
    out
}

/// The lowest cosine between `clip`'s embeddings and the OpenAI-format references.
fn lowest_cosine_to_openai_reference(clip: &Clip) -> f64 {
    let tokenizer = ClipTokenizer::new(CONTEXT_LENGTH);
    let pixels = reference_pixels();
    let mut lowest = f64::INFINITY;
    for (kind, input, expected) in openai_reference() {
        let got = match kind.as_str() {
            "text" => clip.embed_texts(&[tokenizer.encode(&input)]).unwrap(),
            _ => clip.embed_images(&pixels[&input], 1).unwrap(),
        };
        lowest = lowest.min(cosine(&got, &expected));
    }
    lowest
}

/// `tests/data/hf-pickle-tiny/`: a Hugging Face folder whose weights are a PyTorch pickle
/// (`pytorch_model.bin`, as older hub repositories have) beside `config.json`, a tiny CLIP of
/// vocabulary 100 (`make/hf_pickle.py`): found, its config applied, and its embeddings
/// transformers' (`reference.json`).
#[test]
fn a_hugging_face_folder_with_pytorch_model_bin_matches_transformers() {
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf-pickle-tiny");
    let checkpoint = Checkpoint::open(&folder).unwrap();
    assert_eq!(checkpoint.weights, folder.join("pytorch_model.bin"));
    assert_eq!(checkpoint.layout, Layout::HuggingFace);
    assert!(!checkpoint.config_inferred, "config.json is applied");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("reference.json")).unwrap()).unwrap();
    let floats = |key: &str| -> Vec<f32> {
        reference[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
    };
    let ids: Vec<u32> = reference["text_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let clip = Clip::load(checkpoint, DeviceChoice::Cpu).unwrap();
    let text = clip.embed_texts(&[ids]).unwrap();
    let image = clip.embed_images(&vec![0.2; 3 * 224 * 224], 1).unwrap();
    for (kind, got) in [("text", text), ("image", image)] {
        let c = cosine(&got, &floats(kind));
        assert!(c >= SAME_INPUT_COSINE, "{kind}: cosine {c} to transformers");
    }
}

/// `tiny-openai.pt`'s tensors as a CLIP4Clip checkpoint names them (every key under `clip.`, in
/// a file named `pytorch_model.bin.1`), made here: no reference depends on the file itself.
fn clip4clip_variant(dir: &Dir) -> std::path::PathBuf {
    let openai = candle_core::pickle::read_all(openai_format().join("tiny-openai.pt")).unwrap();
    let tensors: HashMap<String, Tensor> = openai.into_iter().map(|(k, v)| (format!("clip.{k}"), v)).collect();
    let path = dir.join("pytorch_model.bin.1");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn openai_and_clip4clip_files_without_config_match_transformers() {
    let dir = Dir::new();
    let files =
        [(openai_format().join("tiny-openai.pt"), Layout::OpenAi), (clip4clip_variant(&dir), Layout::Clip4Clip)];
    for (path, layout) in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let checkpoint = Checkpoint::open(&path).unwrap();
        assert_eq!(checkpoint.layout, layout, "{file}");
        assert!(checkpoint.config_inferred, "{file}");
        let c = &checkpoint.config;
        assert_eq!((c.vision.hidden_size, c.vision.num_hidden_layers, c.vision.num_attention_heads), (64, 2, 1));
        assert_eq!((c.vision.patch_size, c.vision.image_size, c.projection_dim), (32, 224, 32));
        assert_eq!((c.text.vocab_size, c.text.max_position_embeddings), (49408, 77));
        assert_eq!(checkpoint.stored_dtypes, ["f16", "f32"], "{file}: linear weights f16, norms f32");
        let clip = Clip::load(checkpoint, DeviceChoice::Cpu).unwrap();
        assert!((clip.identity.logit_scale.exp() - 100.0).abs() < 1e-3);
        let lowest = lowest_cosine_to_openai_reference(&clip);
        assert!(lowest >= SAME_INPUT_COSINE, "{file}: lowest cosine {lowest}");
    }
}

/// The tiny Hugging Face checkpoint with every floating tensor stored as `dtype`.
fn tiny_clip_stored_as(dtype: DType) -> Dir {
    let tensors = candle_core::safetensors::load(fixtures().join("tiny-clip/model.safetensors"), &Device::Cpu).unwrap();
    let converted: HashMap<String, Tensor> =
        tensors.into_iter().map(|(name, t)| (name, t.to_dtype(dtype).unwrap())).collect();
    let dir = Dir::new();
    dir.copy(&fixtures().join("tiny-clip/config.json"), "model/config.json");
    candle_core::safetensors::save(&converted, dir.join("model/model.safetensors")).unwrap();
    dir
}

/// Lowest cosine, over the reference images and captions, between f32 tiny-clip and `other`.
fn lowest_cosine_to_f32(other: &Clip) -> f64 {
    let reference = Clip::load(Checkpoint::open(&fixtures().join("tiny-clip")).unwrap(), DeviceChoice::Cpu).unwrap();
    let tokenizer = ClipTokenizer::new(CONTEXT_LENGTH);
    let mut lowest = f64::INFINITY;
    for pixels in reference_pixels().values() {
        let a = reference.embed_images(pixels, 1).unwrap();
        lowest = lowest.min(cosine(&a, &other.embed_images(pixels, 1).unwrap()));
    }
    for text in std::fs::read_to_string(fixtures().join("reference/captions.txt")).unwrap().lines() {
        let ids = [tokenizer.encode(text)];
        lowest = lowest.min(cosine(&reference.embed_texts(&ids).unwrap(), &other.embed_texts(&ids).unwrap()));
    }
    lowest
}

/// Half-precision weights: upcast to f32 they lose only their own rounding; run in their own
/// dtype they also round every activation. The bounds are the contract's (§6), against the
/// lowest cosine measured over the reference images and captions: f16 weights upcast 0.999996,
/// run in f16 0.999982; bf16 (3 fewer mantissa bits than f16) upcast 0.999891, run in bf16
/// 0.999527.
#[test]
fn half_precision_checkpoints_load_and_match_within_their_precision() {
    for (dtype, stored, upcast_bound, native_bound, precision) in [
        (DType::F16, "f16", F16_WEIGHTS_COSINE, F16_RUN_COSINE, Precision::F16),
        (DType::BF16, "bf16", BF16_WEIGHTS_COSINE, BF16_RUN_COSINE, Precision::Bf16),
    ] {
        let dir = tiny_clip_stored_as(dtype);
        let checkpoint = Checkpoint::open(&dir.join("model")).unwrap();
        assert_eq!(checkpoint.stored_dtypes, [stored]);
        assert!(!checkpoint.config_inferred);
        let upcast = Clip::load(checkpoint.clone(), DeviceChoice::Cpu).unwrap();
        let lowest = lowest_cosine_to_f32(&upcast);
        eprintln!("{stored} weights, run in f32: lowest cosine {lowest:.6}");
        assert!(lowest >= upcast_bound, "{stored} upcast: lowest cosine {lowest}");
        let native = Clip::load(checkpoint.with_precision(precision), DeviceChoice::Cpu).unwrap();
        let lowest = lowest_cosine_to_f32(&native);
        eprintln!("{stored} weights, run in {stored}: lowest cosine {lowest:.6}");
        assert!(lowest >= native_bound, "{stored} native: lowest cosine {lowest}");
    }
}

/// The weights of `make/checkpoints_reference.py`, which the reference embeddings were made
/// from: each element a counter-based hash of its tensor's name and flat index (FNV-1a of the
/// name, SplitMix64 of it plus the index, the top 24 bits as a uniform in [0, 1)), scaled to
/// ±0.1 around 1 for LayerNorm weights and ±0.02 around 0 for everything else.
pub fn hashed_tensor(name: &str, shape: &[usize], offset: f64, scale: f64) -> Tensor {
    let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            let u = ((z ^ (z >> 31)) >> 40) as f64 / (1u64 << 24) as f64;
            (offset + scale * (2.0 * u - 1.0)) as f32
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn hashed_weight(name: &str, shape: &[usize]) -> Tensor {
    let layer_norm =
        ["ln_1", "ln_2", "ln_pre", "ln_post", "ln_final"].iter().any(|n| name.ends_with(&format!("{n}.weight")));
    if layer_norm { hashed_tensor(name, shape, 1.0, 0.1) } else { hashed_tensor(name, shape, 0.0, 0.02) }
}

/// An OpenAI-layout state dict of a given shape with hashed weights, as a safetensors file:
/// one layer per tower, heads of width 64, embeddings of 32, CLIP's vocabulary and context.
fn hashed_openai_checkpoint(dir: &Dir, width: usize, patch: usize, grid: usize) -> std::path::PathBuf {
    let tensors = hashed_openai_tensors(width, patch, grid, 32);
    let path = dir.join(&format!("vit-{patch}-{}.safetensors", grid * patch));
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

/// `make/checkpoints_reference.py`'s `hashed_state_dict`: OpenAI names, one layer per tower,
/// `width` wide, embeddings of `embed`, CLIP's vocabulary and context.
pub fn hashed_openai_tensors(width: usize, patch: usize, grid: usize, embed: usize) -> HashMap<String, Tensor> {
    let mut tensors = HashMap::new();
    let mut add = |name: String, shape: &[usize]| {
        let tensor = hashed_weight(&name, shape);
        tensors.insert(name, tensor);
    };
    let (vocab, context) = (49408, 77);
    add("visual.conv1.weight".into(), &[width, 3, patch, patch]);
    add("visual.class_embedding".into(), &[width]);
    add("visual.positional_embedding".into(), &[grid * grid + 1, width]);
    add("visual.proj".into(), &[width, embed]);
    for norm in ["visual.ln_pre", "visual.ln_post", "ln_final"] {
        add(format!("{norm}.weight"), &[width]);
        add(format!("{norm}.bias"), &[width]);
    }
    for tower in ["visual.transformer", "transformer"] {
        let p = format!("{tower}.resblocks.0");
        add(format!("{p}.attn.in_proj_weight"), &[3 * width, width]);
        add(format!("{p}.attn.in_proj_bias"), &[3 * width]);
        add(format!("{p}.attn.out_proj.weight"), &[width, width]);
        add(format!("{p}.attn.out_proj.bias"), &[width]);
        for norm in ["ln_1", "ln_2"] {
            add(format!("{p}.{norm}.weight"), &[width]);
            add(format!("{p}.{norm}.bias"), &[width]);
        }
        add(format!("{p}.mlp.c_fc.weight"), &[4 * width, width]);
        add(format!("{p}.mlp.c_fc.bias"), &[4 * width]);
        add(format!("{p}.mlp.c_proj.weight"), &[width, 4 * width]);
        add(format!("{p}.mlp.c_proj.bias"), &[width]);
    }
    add("token_embedding.weight".into(), &[vocab, width]);
    add("positional_embedding".into(), &[context, width]);
    add("text_projection".into(), &[width, embed]);
    tensors.insert("logit_scale".into(), Tensor::new(100f32.ln(), &Device::Cpu).unwrap());
    tensors
}

/// `reference/checkpoints.parquet`: (checkpoint, kind) → open_clip's embedding.
fn checkpoint_reference(checkpoint: &str, kind: &str) -> Vec<f32> {
    for batch in read_parquet(&fixtures().join("reference/checkpoints.parquet")) {
        let rows = strings(&batch, "checkpoint").into_iter().zip(strings(&batch, "kind"));
        for ((c, k), embedding) in rows.zip(double_lists_as_f32(&batch, "embedding")) {
            if c == checkpoint && k == kind {
                return embedding;
            }
        }
    }
    panic!("no reference for {checkpoint} {kind}")
}

/// The formula gives the values `make/README.md` lists for `vit-b16`, so a drift between the
/// two implementations shows here before it shows as a cosine.
#[test]
fn hashed_weights_follow_the_reference_formula() {
    let bits = |t: Tensor| {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[..4].iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(
        bits(hashed_weight("visual.conv1.weight", &[128, 3, 16, 16])),
        [0x3b33cd9a, 0x3b8aae0a, 0xbc9e1616, 0xbbb35e2e]
    );
    assert_eq!(bits(hashed_weight("visual.ln_pre.weight", &[128])), [0x3f836cb1, 0x3f6fa816, 0x3f8918ba, 0x3f895f54]);
    assert_eq!(
        bits(hashed_tensor("pixels", &[3, 224, 224], 0.0, 2.0)),
        [0xbf37c7ac, 0x3efac8e0, 0x3fa7415e, 0xbf25bcf4]
    );
}

/// ViT-B/16 and ViT-L/14 at 336 px patching (narrow, so the test stays fast): the image size
/// and preprocessing follow the checkpoint, and both towers give open_clip's embeddings.
#[test]
fn other_vit_shapes_match_open_clip() {
    let dir = Dir::new();
    let tokens = vec![49406, 320, 1125, 539, 320, 2368, 49407];
    for (name, patch, grid, width) in [("vit-b16", 16, 14, 128), ("vit-l14", 14, 24, 64)] {
        let path = hashed_openai_checkpoint(&dir, width, patch, grid);
        let checkpoint = Checkpoint::open(&path).unwrap();
        let size = patch * grid;
        assert_eq!(checkpoint.layout, Layout::OpenAi);
        assert_eq!((checkpoint.config.vision.patch_size, checkpoint.config.vision.image_size), (patch, size));
        assert_eq!(checkpoint.config.vision.num_attention_heads, width / 64);
        assert_eq!((checkpoint.preprocess.resize, checkpoint.preprocess.crop), (size as u32, size as u32));
        let clip = Clip::load(checkpoint, DeviceChoice::Cpu).unwrap();
        let pixels =
            hashed_tensor("pixels", &[3, size, size], 0.0, 2.0).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let image = clip.embed_images(&pixels, 1).unwrap();
        let text = clip.embed_texts(std::slice::from_ref(&tokens)).unwrap();
        for (kind, got) in [("image", image), ("text", text)] {
            let c = cosine(&got, &checkpoint_reference(name, kind));
            assert!(c >= SAME_INPUT_COSINE, "{name} {kind}: cosine {c}");
        }
    }
}

fn open_error(path: &std::path::Path) -> String {
    match Checkpoint::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_truncated_checkpoint_is_refused_as_incomplete() {
    let dir = Dir::new();
    for path in [openai_format().join("tiny-openai.pt"), clip4clip_variant(&dir)] {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.create(&format!("cut/{file}"), &bytes[..bytes.len() / 2]);
        let message = open_error(&cut);
        assert!(message.contains(&file) && message.contains("is the file complete?"), "{message}");
    }
    let bytes = std::fs::read(fixtures().join("tiny-clip/model.safetensors")).unwrap();
    let cut = dir.create("model.safetensors", &bytes[..bytes.len() - 1000]);
    let message = open_error(&cut);
    assert!(message.contains("is the file complete?"), "{message}");
}

#[test]
fn a_wrong_shape_tensor_is_named_with_both_shapes() {
    let mut tensors =
        candle_core::safetensors::load(openai_format().join("../tiny-clip/model.safetensors"), &Device::Cpu).unwrap();
    let bad = Tensor::zeros((64, 63), DType::F32, &Device::Cpu).unwrap();
    tensors.insert("vision_model.encoder.layers.1.self_attn.k_proj.weight".into(), bad);
    tensors.remove("text_model.final_layer_norm.bias");
    tensors.insert("vision_model.extra.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    let dir = Dir::new();
    dir.copy(&fixtures().join("tiny-clip/config.json"), "model/config.json");
    candle_core::safetensors::save(&tensors, dir.join("model/model.safetensors")).unwrap();
    let message = open_error(&dir.join("model"));
    assert!(
        message.contains("vision_model.encoder.layers.1.self_attn.k_proj.weight is [64, 63], expected [64, 64]"),
        "{message}"
    );
    assert!(message.contains("missing tensors: text_model.final_layer_norm.bias"), "{message}");
    assert!(message.contains("unexpected tensors: vision_model.extra.weight"), "{message}");
}

#[test]
fn a_non_clip_state_dict_is_refused_clearly() {
    let dir = Dir::new();
    let mut tensors = HashMap::new();
    for name in ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "fc.weight"] {
        tensors.insert(name.to_string(), Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap());
    }
    let path = dir.join("resnet.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let message = open_error(&path);
    assert!(message.contains("not a CLIP checkpoint"), "{message}");
    let text = dir.create("notes.pt", b"these are not weights at all");
    let message = open_error(&text);
    assert!(message.contains("neither a safetensors file nor a PyTorch zip checkpoint"), "{message}");
}

#[test]
fn info_reports_what_was_detected() {
    let dir = Dir::new();
    let (stdout, _) = TestCommand::new(&["info", "--model"]).arg(clip4clip_variant(&dir)).expect_code(0);
    for expected in
        ["layout:     clip4clip", "inferred from the tensor shapes", "f16 + f32", "patch 32", "image size 224"]
    {
        assert!(stdout.contains(expected), "{expected:?} not in:\n{stdout}");
    }
    let parameters: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("parameters: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a parameter count");
    // The token embedding alone is 49,408 × 64.
    assert!(parameters > 49408 * 64 && parameters < 4_000_000, "{parameters}");
}

#[test]
fn an_index_built_in_f16_keeps_its_dtype() {
    let dir = Dir::new();
    let index = dir.join("index");
    let video = fixtures().join("videos/short_h264.mp4");
    let root = dir.join("videos");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(&video, root.join("short.mp4")).unwrap();
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &["--dtype", "f16"]);
    assert_eq!(code, 0, "{stderr}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(index.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["model"]["dtype"], "f16");
    let (code, stderr) = ingest_exit_and_stderr(&index, &[&root], &["--dtype", "f32"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("built with --dtype f16"), "{stderr}");
}

/// `tests/data/open_clip_training_tiny.pt`: an open_clip training checkpoint made with
/// `torch.save` (`{"epoch", "name", "state_dict": {"module.visual.…": …}, "optimizer"}`), a
/// random tiny CLIP of vocabulary 100 in OpenAI names, f16 linear weights
/// (`make/open_clip_training.py`); its embeddings are open_clip's.
#[test]
fn an_open_clip_training_checkpoint_loads_from_its_state_dict() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/open_clip_training_tiny.pt");
    let checkpoint = Checkpoint::open(&path).unwrap();
    assert_eq!(checkpoint.layout, Layout::OpenClipTraining);
    let c = &checkpoint.config;
    assert_eq!(
        (c.vision.hidden_size, c.vision.num_hidden_layers, c.text.vocab_size, c.projection_dim),
        (64, 1, 100, 32)
    );
    let clip = Clip::load(checkpoint, DeviceChoice::Cpu).unwrap();
    let text = clip.embed_texts(&[vec![0, 5, 99]]).unwrap();
    let image = clip.embed_images(&vec![0.2; 3 * 224 * 224], 1).unwrap();
    for (kind, got) in [("text", text), ("image", image)] {
        let c = cosine(&got, &checkpoint_reference("open_clip_training_tiny", kind));
        assert!(c >= SAME_INPUT_COSINE, "{kind}: cosine {c} to open_clip");
    }
}

/// Beside `clip.*` and CLIP4Clip's head tensors, anything unknown is an error naming it.
#[test]
fn unknown_tensors_beside_clip4clips_are_refused() {
    let openai = candle_core::pickle::read_all(openai_format().join("tiny-openai.pt")).unwrap();
    let mut tensors: HashMap<String, Tensor> = openai.into_iter().map(|(k, v)| (format!("clip.{k}"), v)).collect();
    tensors.insert("loss_head.weight".into(), Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap());
    let dir = Dir::new();
    let path = dir.join("clip4clip_extra.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let message = open_error(&path);
    assert!(message.contains("unexpected tensors: loss_head.weight"), "{message}");
}

/// `--dtype bf16` multiplies on AVX-512 BF16 where the CPU has it, and through candle's bf16
/// ops elsewhere or where `VTR_INDEX_CPU_WITHOUT=avx512bf16` pretends it is missing:
/// `info --cpu` names the path each gets, and each path's index is within the contract's bf16
/// tolerance of the f32 index of the same clips (§6). On the hardware path a frame's bits do not
/// depend on its batch, and the two paths differ (the switch did change the arithmetic). A
/// feature the switch does not know is refused, by `info` and by `ingest`.
#[test]
fn bf16_takes_the_hardware_path_where_the_cpu_has_it_and_the_switch_turns_it_off() {
    const SWITCH: &str = "VTR_INDEX_CPU_WITHOUT";
    let hardware = vtr_index::matmul::bf16::cpu_has_avx512_bf16();
    let dir = Dir::new();
    let root = corpus(&dir, "videos", &["short_h264.mp4", "mandelbrot_vp9.webm"]);
    let bf16_line = |switch: Option<&str>| {
        let command = TestCommand::new(&["info", "--cpu"]);
        let command = match switch {
            Some(value) => command.env(SWITCH, value),
            None => command.env_remove(SWITCH),
        };
        let (stdout, _) = command.expect_code(0);
        stdout.lines().find(|l| l.starts_with("bf16 products:")).unwrap_or_else(|| panic!("{stdout}")).to_string()
    };
    let ingest = |name: &str, dtype: &str, switch: Option<&str>, extra: &[&str]| {
        let index = dir.join(name);
        let command = ingest_command(&index, &root, &[&["--dtype", dtype], extra].concat());
        let command = match switch {
            Some(value) => command.env(SWITCH, value),
            None => command.env_remove(SWITCH),
        };
        let out = command.output();
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr_text(&out));
        snapshot(&index).unwrap()
    };

    let default_path = bf16_line(None);
    assert_eq!(default_path.contains("AVX-512 BF16 (vdpbf16ps)"), hardware, "{default_path}");
    assert!(bf16_line(Some("avx512bf16")).contains("candle's bf16 ops"));

    let f32_index = ingest("f32", "f32", None, &[]);
    let default = ingest("bf16", "bf16", None, &[]);
    let switched = ingest("bf16-switched", "bf16", Some("avx512bf16"), &[]);
    assert_same_index_within(&default, &f32_index, "bf16 on this CPU's path", Some(BF16_RUN_COSINE));
    assert_same_index_within(&switched, &f32_index, "bf16 through candle", Some(BF16_RUN_COSINE));
    let differ = default
        .frames
        .iter()
        .any(|(key, (_, e))| e.iter().zip(&switched.frames[key].1).any(|(a, b)| a.to_bits() != b.to_bits()));
    assert_eq!(differ, hardware, "the two paths differ exactly where the CPU has the hardware path");
    if hardware {
        let one_at_a_time = ingest("bf16-batch-1", "bf16", None, &["--batch", "1"]);
        assert_same_index(&one_at_a_time, &default, "bf16 products in batches of 1");
    }

    let (_, stderr) = TestCommand::new(&["info", "--cpu"]).env(SWITCH, "amx").expect_code(1);
    assert!(stderr.contains("VTR_INDEX_CPU_WITHOUT names \"amx\""), "{stderr}");
    let out = ingest_command(&dir.join("refused"), &root, &["--dtype", "bf16"]).env(SWITCH, "avx512bf16,amx").output();
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr_text(&out).contains("VTR_INDEX_CPU_WITHOUT names \"amx\""), "{}", stderr_text(&out));
}
