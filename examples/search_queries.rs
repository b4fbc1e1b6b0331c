//! The Rust side of `benchmarks/search_vs_faiss.py`: opens an index's query engine, as a
//! resident service would, and answers each query of a file of embeddings, timing each one
//! after the text embedding; between them, times a bare read of the same video arrays (the
//! memory bandwidth's bound for a query, measured in the same run); and reports the process's
//! resident memory. Prints one JSON object; writes each query's top k to `OUT`.
//!
//! `search_queries INDEX QUERIES K OUT`: `QUERIES` holds little-endian f32 rows of the index's
//! width; `OUT` gets one line per query, `id<TAB>cosine` pairs separated by tabs.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use vtr_index::search_engine::SearchEngine;
use vtr_index::store::Manifest;

/// Resident bytes of this process, as ingest reads its workers'.
fn resident_bytes() -> u64 {
    vtr_index::ingest::resident_bytes(std::process::id() as i32).expect("Linux's /proc")
}

/// The time the rayon pool takes to read `arrays` once, summing them as words in blocks as the
/// scan does, without its arithmetic: the machine's bound for a query.
fn read_once_s(arrays: &[&[u16]]) -> f64 {
    let start = Instant::now();
    let sum: u64 = arrays
        .par_iter()
        .flat_map(|a| a.par_chunks(2048 * 512))
        .map(|c| bytemuck::cast_slice::<u16, u64>(&c[..c.len() / 4 * 4]).iter().fold(0u64, |a, &w| a.wrapping_add(w)))
        .sum();
    std::hint::black_box(sum);
    start.elapsed().as_secs_f64()
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
    let arrays: Vec<&[u16]> = engine.video_arrays().collect();
    let mut times = Vec::new();
    let mut reads = Vec::new();
    let mut lines = String::new();
    for (i, query) in queries.chunks_exact(dim).enumerate() {
        // The bound, measured between the queries so both see the same machine.
        if i % 10 == 0 {
            reads.push(read_once_s(&arrays));
        }
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
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    reads.sort_by(f64::total_cmp);
    let read_once = percentile(&reads, 0.5);
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
        "array_bytes": array_bytes,
        "read_once_s": read_once,
        "bandwidth_bytes_per_s": array_bytes / read_once,
        "resident_at_start_bytes": resident_at_start,
        "resident_after_bytes": resident_after,
    });
    println!("{report}");
}
