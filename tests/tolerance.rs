//! The tolerances of `docs/contract.md` §6, defined once: every test that compares with a
//! reference uses these, and `the_contract_states_these_tolerances` checks that the contract's
//! table says the same, so the two cannot drift apart.

/// An embedding from identical pixels or token ids, against transformers / open_clip (f32).
pub const SAME_INPUT_COSINE: f64 = 0.99999;
/// `pixel_values` of the same RGB image against `CLIPImageProcessor`: mean absolute difference…
pub const PIXEL_MEAN_ABS: f64 = 0.01;
/// …and the cosine of the embeddings made from them.
pub const PIXEL_EMBEDDING_COSINE: f64 = 0.9999;
/// Weights stored in f16 and run in f32, against the f32 weights.
pub const F16_WEIGHTS_COSINE: f64 = 0.99999;
/// Weights stored and run in f16.
pub const F16_RUN_COSINE: f64 = 0.9999;
/// Weights stored in bf16 and run in f32.
pub const BF16_WEIGHTS_COSINE: f64 = 0.9995;
/// Weights stored and run in bf16.
pub const BF16_RUN_COSINE: f64 = 0.999;
/// Whole ingest against PyAV + transformers: frame times…
pub const INGEST_FRAME_TIME_S: f64 = 1e-3;
/// …and frame and video cosines.
pub const INGEST_COSINE: f64 = 0.99;
/// RGB frames of an odd encoding against ffmpeg's `rgb24`, mean absolute difference in
/// levels: 8-bit progressive…
pub const RGB_MEAN_ABS_8BIT: f64 = 2.0;
/// …10-bit or interlaced.
pub const RGB_MEAN_ABS_OTHER: f64 = 3.0;
/// A file with extra streams against its coded video stream alone: frame times…
pub const EXTRA_STREAMS_TIME_S: f64 = 1e-6;
/// …and cosines.
pub const EXTRA_STREAMS_COSINE: f64 = 0.999999;
/// An embedding made on another kind of CPU (or by the build without OpenBLAS), whose matrix
/// products round otherwise; on one machine embeddings are equal to the bit, however batched.
pub const OTHER_CPU_COSINE: f64 = 0.99999;
/// Score values against f64 reference matrices: max |M − R| ≤ this · max |R|.
pub const SCORE_RELATIVE: f64 = 1e-5;
/// Each dual-softmax value of the CPU path (f32 terms in the column sums) against the same value
/// with f64 terms (the formula; the GPU path), relative to the value.
pub const SUM_TERMS_RELATIVE: f64 = 2e-7;
/// The GPU's `--gpu-inputs f16` scores against the CPU's: the share of texts whose top-1 is the
/// same…
pub const F16_INPUTS_TOP1_SHARE: f64 = 0.95;
/// …and how far R@1 and R@10 may move, in points.
pub const F16_INPUTS_RECALL_POINTS: f64 = 1.0;
/// Metrics against the fixtures' reference metrics.
pub const METRICS_ABS: f64 = 1e-6;

#[test]
fn the_contract_states_these_tolerances() {
    let contract = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/contract.md")).unwrap();
    let table = contract.split("## 6. Tolerances").nth(1).expect("the contract has §6");
    let row = |starts: &str| -> String {
        table
            .lines()
            .find(|line| line.starts_with(&format!("| {starts}")))
            .unwrap_or_else(|| panic!("§6 has a row for {starts:?}"))
            .to_string()
    };
    let checks = [
        ("an embedding from identical", format!("cosine ≥ {SAME_INPUT_COSINE}")),
        ("`pixel_values`", format!("mean absolute difference ≤ {PIXEL_MEAN_ABS}")),
        ("`pixel_values`", format!("embedding cosine ≥ {PIXEL_EMBEDDING_COSINE}")),
        ("a video vector from identical frame", format!("cosine ≥ {SAME_INPUT_COSINE}")),
        ("a frame or video embedded in other batches", "equal bits".to_string()),
        ("an embedding made on another kind of CPU", format!("cosine ≥ {OTHER_CPU_COSINE}")),
        ("logits (scoring's cosines) from the same embeddings", "equal bits".to_string()),
        ("a model stored in f16", format!("{F16_WEIGHTS_COSINE} run in f32, ≥ {F16_RUN_COSINE} run in f16")),
        ("a model stored in bf16", format!("{BF16_WEIGHTS_COSINE} run in f32, ≥ {BF16_RUN_COSINE} run in bf16")),
        ("whole ingest", format!("frame times within {} ms", INGEST_FRAME_TIME_S * 1e3)),
        ("whole ingest", format!("frame and video cosine ≥ {INGEST_COSINE}")),
        ("RGB frames", format!("≤ {RGB_MEAN_ABS_8BIT:.1} levels (8-bit progressive)")),
        ("RGB frames", format!("≤ {RGB_MEAN_ABS_OTHER:.1} (10-bit, interlaced)")),
        ("a file with extra streams", format!("frame times within {} µs", EXTRA_STREAMS_TIME_S * 1e6)),
        ("a file with extra streams", format!("cosine ≥ {EXTRA_STREAMS_COSINE}")),
        ("an interrupted, resumed", "embeddings equal bits".to_string()),
        ("score values", format!("max \\|M − R\\| ≤ {SCORE_RELATIVE:e} · max \\|R\\|")),
        ("dual-softmax values with f32 sum terms", format!("each value within {SUM_TERMS_RELATIVE:e} of itself")),
        ("metrics", format!("within {METRICS_ABS:e}")),
        ("an embedding read by", format!("norm within {:e} of 1", vtr_index::store::UNIT_NORM_TOLERANCE)),
        ("a cosine from a search segment", format!("within {:e}", vtr_index::store::segment::F16_COSINE_ERROR)),
        ("the GPU's `--gpu-inputs f16`", format!("top-1 equal for ≥ {} % of texts", F16_INPUTS_TOP1_SHARE * 100.0)),
        ("the GPU's `--gpu-inputs f16`", format!("R@1, R@10 within {F16_INPUTS_RECALL_POINTS} point")),
        ("a sharded ingest, merged", "embeddings equal bits".to_string()),
        ("a sharded ingest, merged", format!("cosine ≥ {OTHER_CPU_COSINE}")),
    ];
    for (starts, says) in checks {
        let line = row(starts);
        assert!(line.contains(&says), "§6 row {starts:?} should say {says:?}: {line}");
    }
}
