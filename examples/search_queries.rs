//! The Rust side of `benchmarks/search_vs_faiss.py`: opens an index's query engine, as a
//! resident service would, and answers each query of a file of embeddings, timing each one
//! after the text embedding; measures the machine's memory bandwidth in the same run and the
//! process's resident memory. Prints one JSON object; writes each query's top k to `OUT`.
//!
//! `search_queries INDEX QUERIES K OUT`: `QUERIES` holds little-endian f32 rows of the index's
//! width; `OUT` gets one line per query, `id<TAB>cosine` pairs separated by tabs.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use vtr_index::search_engine::SearchEngine;
use vtr_index::store::Manifest;

/// VmRSS of this process, in bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux's /proc");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("kB") * 1024
}

/// Bytes per second that the rayon pool reads from memory: the best of five sums over a
/// buffer of `bytes`, well past every cache, each thread summing its own contiguous part.
fn read_bandwidth(bytes: usize) -> f64 {
    let words: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let threads = rayon::current_num_threads();
    let part = words.len().div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        let sum: u64 = words.par_chunks(part).map(|c| c.iter().fold(0u64, |a, &w| a.wrapping_add(w))).sum();
        best = best.min(start.elapsed().as_secs_f64());
        std::hint::black_box(sum);
    }
    bytes as f64 / best
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, index, queries, k, out] = args.as_slice() else {
        panic!("usage: search_queries INDEX QUERIES K OUT");
    };
    let (index, k) = (Path::new(index), k.parse::<usize>().expect("K"));
    let resident_at_start = resident_bytes();
    let manifest = Manifest::load(index).expect("an index").expect("a manifest");
    let dim = manifest.model.embed_dim;
    let opened = Instant::now();
    let engine = SearchEngine::open(index, &manifest).expect("readable segments").expect("format 5");
    let open_s = opened.elapsed().as_secs_f64();
    let checked = Instant::now();
    assert!(engine.first_not_unit().is_none(), "unit embeddings");
    let unit_check_s = checked.elapsed().as_secs_f64();
    let bytes = std::fs::read(queries).expect("the queries");
    let queries: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let mut times = Vec::new();
    let mut lines = String::new();
    for query in queries.chunks_exact(dim) {
        let start = Instant::now();
        let hits = engine.search(query, k).expect("readable frames");
        times.push(start.elapsed().as_secs_f64());
        let fields: Vec<String> = hits.iter().map(|h| format!("{}\t{}", h.video_id, h.cosine)).collect();
        lines.push_str(&fields.join("\t"));
        lines.push('\n');
    }
    std::fs::File::create(out).and_then(|mut f| f.write_all(lines.as_bytes())).expect("OUT");
    let resident_after = resident_bytes();
    let array_bytes = (engine.videos() * dim * 2) as f64;
    // Measured after the queries, so its buffer is not counted in their resident memory.
    let bandwidth = read_bandwidth(2 << 30);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "videos": engine.videos(),
        "dim": dim,
        "k": k,
        "threads": rayon::current_num_threads(),
        "queries": times.len(),
        "open_s": open_s,
        "unit_check_s": unit_check_s,
        "median_s": percentile(&sorted, 0.5),
        "p99_s": percentile(&sorted, 0.99),
        "mean_s": times.iter().sum::<f64>() / times.len() as f64,
        "bandwidth_bytes_per_s": bandwidth,
        "array_bytes": array_bytes,
        "read_once_s": array_bytes / bandwidth,
        "resident_at_start_bytes": resident_at_start,
        "resident_after_bytes": resident_after,
    });
    println!("{report}");
}
