"""Search at scale: vtr-index's query engine against faiss (faiss-cpu from PyPI), side by side in
one run, on a fabricated index; and `vtr-index search` end to end against the same query on a
one-video index.

1. A ViT-B/32-shaped random CLIP (tower_vs_pytorch.py's) indexes one sample video: the one-video
   index, and the model identity the fabricated indexes record.
2. `synthetic_index.write_tables` writes indexes of N videos × F frames in format 1 (no search
   segments); a writer (`ingest` of an empty folder, which embeds nothing) upgrades each to the
   current format, writing the segments. Timed, with the disk each adds.
3. `vtr-index search "QUERY" --json` on the one-video index and on the N-video index: the
   median wall time of several runs each, model load included (what a user waits).
4. The engine (`examples/search_queries.rs`, one process keeping it open) answers 1,000 queries
   (half random, half a perturbed video, so some have a clear best) with 2 threads: median and
   p99 per query after the text embedding, the memory bandwidth measured in the same process,
   and its resident memory against the mapped video arrays.
5. faiss over the same videos (read from the Parquet table, f32), OMP and BLAS threads at 2:
   `IndexFlatIP` (f32) and `IndexScalarQuantizer(QT_fp16)` (f16, as our array), one query per
   call as a service asks, and all 1,000 in one call for reference; the top k compared with
   ours up to the f16 error of contract §6.

Writes the figures as JSON (`--json`) and prints them; RESULTS.md records a run.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_index import manifest, write_tables  # noqa: E402
from tower_vs_pytorch import random_vit_b32  # noqa: E402

# Contract §6: a cosine from a search segment is within this of the f32 one.
F16_COSINE_ERROR = 6e-4
QUERY = "a man plays guitar on stage"


def run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def folder_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def one_video_index(binary, work, model):
    index = work / "one-video"
    if not (index / "manifest.json").exists():
        root = work / "one-video-root"
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path("sample/videos").glob("*.mp4").__next__(), root)
        run([binary, "ingest", root, "--index", index, "--model", model])
    return index


def fabricated_index(binary, work, name, videos, frames, model_identity, seed):
    """A format-1 index of `videos` × `frames`, upgraded by a writer; returns (index, facts)."""
    index = work / name
    facts_path = work / f"{name}.json"
    if facts_path.exists() and (index / "manifest.json").exists():
        return index, json.loads(facts_path.read_text())
    if index.exists():
        shutil.rmtree(index)
    dim = model_identity["embed_dim"]
    start = time.perf_counter()
    root = str(work / f"{name}-root")
    tables = write_tables(index, root, videos, frames, dim, np.random.default_rng(seed))
    (index / "manifest.json").write_text(json.dumps(manifest(dim, [root], tables, frames, model=model_identity)))
    written_s = time.perf_counter() - start
    parquet = folder_bytes(index)
    empty = work / f"{name}-upgrade-root"
    empty.mkdir(exist_ok=True)
    start = time.perf_counter()
    proc = run(["/usr/bin/time", "-v", binary, "ingest", empty, "--index", index])
    upgrade_s = time.perf_counter() - start
    rss = int(next(l for l in proc.stderr.splitlines() if "Maximum resident" in l).split()[-1]) * 1024
    with open(index / "manifest.json") as f:
        upgraded = json.load(f)
    assert upgraded["format_version"] >= 5, upgraded["format_version"]
    facts = {
        "videos": videos, "frames_per_video": frames, "dim": dim, "written_s": written_s,
        "parquet_bytes": parquet, "segments_bytes": folder_bytes(index / "segments"),
        "upgrade_s": upgrade_s, "upgrade_peak_rss_bytes": rss,
    }
    facts_path.write_text(json.dumps(facts))
    return index, facts


def cli_search_s(binary, indexes, runs):
    """The median wall time of `search` on each index, the runs alternated between them."""
    walls = [[] for _ in indexes]
    for _ in range(runs):
        for index, times in zip(indexes, walls):
            start = time.perf_counter()
            run([binary, "search", QUERY, "--json", "--index", index])
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in walls]


def video_matrix(index):
    """The videos table's ids and f32 embeddings, in manifest order."""
    with open(index / "manifest.json") as f:
        shards = json.load(f)["tables"]["videos"]
    ids, rows = [], []
    for shard in shards:
        table = pq.read_table(index / shard["path"], columns=["video_id", "embedding"])
        ids.extend(table.column("video_id").to_pylist())
        flat = table.column("embedding").combine_chunks().flatten().to_numpy()
        rows.append(flat.reshape(table.num_rows, -1))
    return ids, np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)


def make_queries(matrix, n):
    """`n` unit queries: half a video's embedding perturbed (a clear best), half random."""
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((n, matrix.shape[1]), dtype=np.float32)
    near = rng.integers(0, len(matrix), n // 2)
    queries[: len(near)] = matrix[near] + 0.05 * queries[: len(near)] / np.sqrt(matrix.shape[1])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries


def timed_faiss(index, queries, k):
    per_query = []
    found = []
    for q in queries:
        start = time.perf_counter()
        scores, rows = index.search(q[None, :], k)
        per_query.append(time.perf_counter() - start)
        found.append((scores[0], rows[0]))
    start = time.perf_counter()
    index.search(queries, k)
    batched = (time.perf_counter() - start) / len(queries)
    per_query.sort()
    return {
        "median_s": per_query[len(per_query) // 2],
        "p99_s": per_query[round((len(per_query) - 1) * 0.99)],
        "batched_per_query_s": batched,
    }, found


def agreement(ours, exact, ids, matrix, queries, k):
    """How our top k compares with the exact f32 top k (faiss IndexFlatIP): queries whose ids are
    the same in the same order, and whether every difference lies within the f16 error."""
    position = {v: i for i, v in enumerate(ids)}
    same, within = 0, True
    for q, line, (scores, rows) in zip(queries, ours, exact):
        fields = line.split("\t")
        got = [position[v] for v in fields[0::2]]
        want = [int(r) for r in rows]
        if got == want:
            same += 1
            continue
        exact_of_got = matrix[got] @ q
        kth = float(scores[k - 1])
        # Ours may differ only between scores closer than twice the error.
        within &= bool(np.all(exact_of_got >= kth - 2 * F16_COSINE_ERROR))
    return same, within


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/vtr-index")
    parser.add_argument("--engine", default="target/release/examples/search_queries")
    parser.add_argument("--work", default="benchmarks/work/search")
    parser.add_argument("--videos", type=int, default=1_000_000)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--cli-videos", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = random_vit_b32(work)
    one = one_video_index(args.binary, work, model)
    with open(one / "manifest.json") as f:
        identity = json.load(f)["model"]
    dim = identity["embed_dim"]
    figures = {"machine": {"cores": os.cpu_count(), "faiss": faiss.__version__}}

    # End to end: search on N videos against one video, model load included.
    cli_index, cli_facts = fabricated_index(args.binary, work, f"cli-{args.cli_videos}", args.cli_videos, 12,
                                            identity, 1)
    one_s, n_s = cli_search_s(args.binary, [one, cli_index], args.runs)
    figures["cli"] = {"index": cli_facts, "one_video_s": one_s, "n_videos_s": n_s}
    figures["cli"]["ratio"] = figures["cli"]["n_videos_s"] / figures["cli"]["one_video_s"]
    print(json.dumps(figures["cli"]), flush=True)

    # The engine against faiss on N videos.
    index, facts = fabricated_index(args.binary, work, f"engine-{args.videos}x{args.frames}", args.videos,
                                    args.frames, identity, 2)
    figures["index"] = facts
    ids, matrix = video_matrix(index)
    queries = make_queries(matrix, args.queries)
    queries_path = work / "queries.f32"
    queries.astype("<f4").tofile(queries_path)
    results = work / "engine-results.tsv"
    env = dict(os.environ, RAYON_NUM_THREADS="2")
    proc = run([args.engine, index, queries_path, args.k, results], env=env)
    engine = json.loads(proc.stdout)
    figures["engine"] = engine
    print(json.dumps(engine), flush=True)
    ours = results.read_text().splitlines()

    faiss.omp_set_num_threads(2)
    flat = faiss.IndexFlatIP(dim)
    flat.add(matrix)
    figures["faiss_flat_f32"], exact = timed_faiss(flat, queries, args.k)
    del flat
    sq = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    sq.train(matrix)
    sq.add(matrix)
    figures["faiss_sq_fp16"], _ = timed_faiss(sq, queries, args.k)
    del sq
    same, within = agreement(ours, exact, ids, matrix, queries, args.k)
    figures["agreement"] = {"same_top_k": same, "queries": len(queries), "differences_within_f16_error": within}
    e = figures["engine"]
    figures["ratios"] = {
        "engine_median_over_faiss_flat": e["median_s"] / figures["faiss_flat_f32"]["median_s"],
        "engine_median_over_faiss_sq_fp16": e["median_s"] / figures["faiss_sq_fp16"]["median_s"],
        "engine_median_over_read_once": e["median_s"] / e["read_once_s"],
        "resident_over_video_arrays": e["resident_after_bytes"] / e["array_bytes"],
    }
    print(json.dumps({k: figures[k] for k in ["faiss_flat_f32", "faiss_sq_fp16", "agreement", "ratios"]}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
