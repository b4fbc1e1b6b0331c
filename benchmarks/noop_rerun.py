#!/usr/bin/env python3
"""No-op re-run: `vtr-index ingest` on an index of N videos (default 10,000) where nothing changed.

A nightly job re-runs ingest over a corpus that mostly did not change; the run must find that
out quickly. This script
  1. writes N small files (100 folders) and an index whose rows match them exactly (root, path,
     size, mtime), 12 frames per video at D = 512, in the project's Parquet schema with a
     manifest listing the shards (rows are synthetic: a no-op never loads the model or decodes);
  2. runs `vtr-index ingest ROOT --index INDEX` several times and reports wall time and peak
     RSS (from /usr/bin/time), checking each run reports N unchanged and commits nothing.

Usage: python3 benchmarks/noop_rerun.py [--binary target/release/vtr-index] [--videos 10000] [--runs 5]
Needs numpy and pyarrow (`pip install numpy pyarrow`).
"""

import argparse
import hashlib
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
FRAMES = 12


def embeddings(rng, n):
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return embedding_array(x)


def make_corpus(work, n):
    root = work / "videos"
    if root.exists():
        shutil.rmtree(root)
    rows = []
    for i in range(n):
        rel = f"d{i % 100:02d}/clip{i:06d}.mp4"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"synthetic video {i}\n".encode())
        st = path.stat()
        rows.append((rel, st.st_size, st.st_mtime_ns))
    return root, rows


def make_index(work, root, rows):
    index = work / "index"
    if index.exists():
        shutil.rmtree(index)
    rng = np.random.default_rng(0)
    n = len(rows)
    ids = [rel.rsplit(".", 1)[0] for rel, _, _ in rows]
    videos = pa.table({
        "video_id": pa.array(ids),
        "root": pa.array([str(root)] * n),
        "path": pa.array([rel for rel, _, _ in rows]),
        "size_bytes": pa.array([size for _, size, _ in rows], pa.uint64()),
        "mtime_ns": pa.array([mtime for _, _, mtime in rows], pa.int64()),
        "content_hash": pa.array([hashlib.blake2b(i.encode()).hexdigest()[:64] for i in ids]),
        "duration_s": pa.array(np.full(n, 12.0)),
        "width": pa.array(np.full(n, 320, np.uint32)),
        "height": pa.array(np.full(n, 240, np.uint32)),
        "fps": pa.array(np.full(n, 25.0)),
        "n_frames": pa.array(np.full(n, FRAMES, np.uint32)),
        "embedding": embeddings(rng, n),
    })
    frame_shards = []
    per_shard = 20000 // FRAMES
    for part, start in enumerate(range(0, n, per_shard)):
        chunk = ids[start:start + per_shard]
        frames = pa.table({
            "video_id": pa.array([v for v in chunk for _ in range(FRAMES)]),
            "frame_index": pa.array(np.tile(np.arange(FRAMES, dtype=np.uint32), len(chunk))),
            "pts_s": pa.array(np.tile(np.arange(FRAMES, dtype=np.float64), len(chunk))),
            "embedding": embeddings(rng, len(chunk) * FRAMES),
        })
        frame_shards.append(write_shard(index, f"frames/part-synthetic-{part:05d}.parquet", frames))
    tables = {"videos": [write_shard(index, "videos/part-synthetic-00000.parquet", videos)], "frames": frame_shards}
    manifest = synthetic_manifest(DIM, [str(root)], tables, max_frames=FRAMES)
    (index / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return index


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/vtr-index")
    parser.add_argument("--videos", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", default="benchmarks/work/noop")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    root, rows = make_corpus(work, args.videos)
    index = make_index(work, root, rows)
    size = sum(f.stat().st_size for f in index.rglob("*.parquet"))
    print(f"cores: {os.cpu_count()}, {args.videos:,} videos, {args.videos * FRAMES:,} frames, D = {DIM}, "
          f"index {size / 2**20:.0f} MiB on disk")
    walls = []
    for run in range(args.runs):
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", args.binary, "ingest", str(root), "--index", str(index)],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or f"{args.videos} unchanged" not in proc.stderr:
            sys.exit(f"unexpected run:\n{proc.stderr}")
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
        walls.append(wall)
        print(f"run {run + 1}: {wall:.3f} s, peak RSS {rss:.0f} MiB")
    print(f"median {statistics.median(walls):.3f} s for {args.videos:,} videos "
          f"({statistics.median(walls) / args.videos * 1e6:.1f} µs per video)")


if __name__ == "__main__":
    main()
