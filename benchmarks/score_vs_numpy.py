#!/usr/bin/env python3
"""Score time: `vtr-index score` against the numpy code users run today, on the same embeddings.

For each size N (texts = videos = N, D = 512, text i describes video i) this script
  1. makes random unit embeddings and writes them as a vtr-index index (videos and texts
     tables in the project's Parquet schema, a manifest listing them);
  2. runs `vtr-index score --revise dsl` on it (wall time and peak RSS from /usr/bin/time);
  3. runs, on the same float32 embeddings, the numpy path of CLIP4Clip-style evaluation:
     `S = 100 · T @ V.T`, `S * softmax(S, axis=0)`, then `compute_metrics` (sort every row of
     -S, find the diagonal), for T2V and V2T; and, separately, the bare matrix product;
  4. checks that both sides give the same R@1/5/10, MdR and MnR, and prints the ratios.

With --rounds R > 1, R − 1 more rounds follow, each running vtr-index and then the bare numpy
matmul, and the table gives the median of the rounds' times and of their ratios: on a shared
machine whose speed drifts by ±30 % from one minute to the next, only alternating rounds give
a ratio worth recording.

Usage: python3 benchmarks/score_vs_numpy.py [--binary target/release/vtr-index] [--sizes 4000 20000]
       [--no-numpy-above N] [--cache-mib M] [--rounds R]
With --baseline B, each size is then scored by --binary and by B in alternating rounds (at least
3), and a line gives both medians and the median ratio: a change's cost on the same machine.
Needs numpy and pyarrow (`pip install numpy pyarrow`).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from synthetic_index import embedding_array, write_shard
from synthetic_index import manifest as synthetic_manifest

DIM = 512


def unit_rows(rng, n, dim):
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_corpus(n, seed=0):
    """Videos, and one caption per video correlated with it, as retrieval data is."""
    rng = np.random.default_rng(seed)
    videos = unit_rows(rng, n, DIM)
    texts = videos + 1.6 * unit_rows(rng, n, DIM)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return texts.astype(np.float32), videos


def write_index(index, texts, videos):
    if index.exists():
        shutil.rmtree(index)
    n = len(videos)
    ids = [f"video{i:07d}" for i in range(n)]
    video_table = pa.table({"video_id": pa.array(ids), "embedding": embedding_array(videos)})
    text_table = pa.table({
        "text_id": pa.array(np.arange(len(texts), dtype=np.uint64)),
        "text": pa.array([f"caption {i}" for i in range(len(texts))]),
        "video_id": pa.array(ids),
        "embedding": embedding_array(texts),
    })
    tables = {
        "videos": [write_shard(index, "videos/part-0.parquet", video_table)],
        "texts/bench": [write_shard(index, "texts/bench/part-0.parquet", text_table)],
    }
    manifest = synthetic_manifest(DIM, [], tables, logit_scale=float(np.log(np.float32(100.0))))
    (index / "manifest.json").write_text(json.dumps(manifest, indent=1))


def run_vtr(binary, index, out, cache_mib):
    cmd = ["/usr/bin/time", "-v", str(binary), "score", "--index", str(index), "--texts", "bench",
           "--revise", "dsl", "--scale", "100", "--cache-mib", str(cache_mib), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"vtr-index failed:\n{proc.stderr}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    metrics = json.loads((out / "metrics.json").read_text())
    return wall, rss_kib / 1024, metrics


def softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def compute_metrics(x):
    """CLIP4Clip's metrics: sort every row, find where the diagonal landed."""
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, np.newaxis]
    ind = np.where(sx - d == 0)[1]
    return {"r1": 100 * float(np.sum(ind == 0)) / len(ind), "r5": 100 * float(np.sum(ind < 5)) / len(ind),
            "r10": 100 * float(np.sum(ind < 10)) / len(ind), "mdr": float(np.median(ind)) + 1,
            "mnr": float(np.mean(ind)) + 1}


def run_numpy(texts, videos):
    start = time.perf_counter()
    sim = 100.0 * (texts @ videos.T)
    sim = sim * softmax(sim, axis=0)
    t2v = compute_metrics(sim)
    v2t = compute_metrics(sim.T)
    total = time.perf_counter() - start
    del sim
    start = time.perf_counter()
    product = texts @ videos.T
    matmul = time.perf_counter() - start
    del product
    return total, matmul, t2v, v2t


def same_metrics(a, b):
    return all(abs(a[k] - b[k]) < 1e-6 for k in ("r1", "r5", "r10", "mdr", "mnr"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/vtr-index")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 10000, 20000])
    parser.add_argument("--no-numpy-above", type=int, default=20000)
    parser.add_argument("--cache-mib", type=int, default=1024)
    parser.add_argument("--work", default="benchmarks/work")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline", help="another vtr-index binary (an earlier commit's build), timed against "
                        "--binary in alternating rounds on the same index after the table")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"cores: {os.cpu_count()}, numpy {np.__version__}, D = {DIM}, vtr-index cache {args.cache_mib} MiB")
    print("| N × N | vtr-index score (dsl) | peak RSS | numpy dsl + metrics | numpy matmul alone | "
          "numpy / vtr-index | vtr-index / numpy matmul | metrics agree |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        texts, videos = make_corpus(n)
        index = work / f"index-{n}"
        write_index(index, texts, videos)
        wall, rss, metrics = run_vtr(args.binary, index, work / f"out-{n}", args.cache_mib)
        if n <= args.no_numpy_above:
            total, matmul, t2v, v2t = run_numpy(texts, videos)
            agree = same_metrics(metrics["t2v"], t2v) and same_metrics(metrics["v2t"], v2t)
            walls, matmuls = [wall], [matmul]
            for _ in range(args.rounds - 1):
                walls.append(run_vtr(args.binary, index, work / f"out-{n}", args.cache_mib)[0])
                start = time.perf_counter()
                product = texts @ videos.T
                matmuls.append(time.perf_counter() - start)
                del product
            ratio = statistics.median(w / m for w, m in zip(walls, matmuls))
            wall, matmul = statistics.median(walls), statistics.median(matmuls)
            print(f"| {n:,} | {wall:.2f} s | {rss:.0f} MiB | {total:.2f} s | {matmul:.2f} s | "
                  f"{total / wall:.1f}× | {ratio:.2f}× | {'yes' if agree else 'NO'} |", flush=True)
            if not agree:
                print(f"  vtr-index {metrics['t2v']} {metrics['v2t']}\n  numpy     {t2v} {v2t}")
        else:
            print(f"| {n:,} | {wall:.2f} s | {rss:.0f} MiB | – | – | – | – | – |", flush=True)
        if args.baseline:
            against_baseline(args, n, index, work)
        shutil.rmtree(index)


def against_baseline(args, n, index, work):
    """This build against --baseline, alternating which runs first, each round on the same index."""
    rows = []
    for round_no in range(max(args.rounds, 3)):
        order = [("this", args.binary), ("baseline", args.baseline)]
        if round_no % 2:
            order.reverse()
        rows.append({name: run_vtr(binary, index, work / f"out-{n}-{name}", args.cache_mib) for name, binary in order})
    walls = [(r["this"][0], r["baseline"][0]) for r in rows]
    same = all(r["this"][2] == r["baseline"][2] for r in rows)
    print(f"{n:,}²: this build {statistics.median(w for w, _ in walls):.2f} s, baseline "
          f"{statistics.median(b for _, b in walls):.2f} s (medians of {len(rows)} alternating rounds: "
          f"{', '.join(f'{w:.2f}/{b:.2f}' for w, b in walls)}); median ratio this / baseline "
          f"{statistics.median(w / b for w, b in walls):.3f}; metrics {'equal' if same else 'DIFFER'}", flush=True)


if __name__ == "__main__":
    main()
