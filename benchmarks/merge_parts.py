#!/usr/bin/env python3
"""`vtr-index merge` at scale: the parts of a sharded ingest fabricated with pyarrow (synthetic
rows in the project's schema, each part's manifest as `ingest --shard I/N` writes it), merged,
timed, and its peak RSS read from /usr/bin/time.

1. The headline: 256 parts holding 100,000 videos and 1.2 M frames (12 per video) at D = 512
   (about 2.5 GB of shards): the first merge, and a re-merge with nothing changed.
2. How the time grows with the number of files: N = 16, 64, 256 and 1,024 parts of 10 videos
   each (one videos and one frames shard per part), first merges.

Usage: benchmarks/.venv/bin/python benchmarks/merge_parts.py [--binary target/release/vtr-index]
       [--parts 256] [--videos 100000] [--work benchmarks/work/merge]
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from synthetic_index import embedding_array, manifest, write_shard

DIM, FRAMES = 512, 12


def embeddings(rng, n):
    m = rng.standard_normal((n, DIM), dtype=np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return embedding_array(m)


def make_parts(folder, parts, videos, seed):
    """`parts` part indexes holding `videos` videos between them, by the contract's key."""
    if (folder / "done").exists():
        return [folder / f"part-{i}" for i in range(parts)]
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    per_part = videos // parts
    paths = []
    for i in range(parts):
        index = folder / f"part-{i}"
        ids = [f"v{i:05d}_{j:06d}" for j in range(per_part)]
        n = len(ids)
        video_table = pa.table({
            "video_id": pa.array(ids),
            "root": pa.array(["/data/videos"] * n),
            "path": pa.array([f"{v}.mp4" for v in ids]),
            "size_bytes": pa.array(np.full(n, 1_000_000, np.uint64)),
            "mtime_ns": pa.array(np.full(n, 1_700_000_000_000_000_000, np.int64)),
            "content_hash": pa.array(["0" * 64] * n),
            "duration_s": pa.array(np.full(n, 12.0)),
            "width": pa.array(np.full(n, 320, np.uint32)),
            "height": pa.array(np.full(n, 240, np.uint32)),
            "fps": pa.array(np.full(n, 25.0)),
            "n_frames": pa.array(np.full(n, FRAMES, np.uint32)),
            "stream_index": pa.array(np.zeros(n, np.uint32)),
            "embedding": embeddings(rng, n),
        })
        frame_table = pa.table({
            "video_id": pa.array([v for v in ids for _ in range(FRAMES)]),
            "frame_index": pa.array(np.tile(np.arange(FRAMES, dtype=np.uint32), n)),
            "pts_s": pa.array(np.tile(np.arange(FRAMES, dtype=np.float64), n)),
            "embedding": embeddings(rng, n * FRAMES),
        })
        tables = {"videos": [write_shard(index, f"videos/part-1-{i}-00000.parquet", video_table)],
                  "frames": [write_shard(index, f"frames/part-1-{i}-00000.parquet", frame_table)]}
        m = manifest(DIM, ["/data/videos"], tables, max_frames=FRAMES)
        m.update(format_version=3, committed_at_us=1_700_000_000_000_000 + i, shard={"index": i, "count": parts})
        m["model"]["dtype"] = "f32"
        (index / "manifest.json").write_text(json.dumps(m, indent=1))
        paths.append(index)
    (folder / "done").write_text("")
    return paths


def merge(binary, parts, out):
    proc = subprocess.run(["/usr/bin/time", "-f", "peak_rss_kib=%M wall_s=%e", binary, "merge", *map(str, parts),
                           "--index", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"merge failed ({proc.returncode}):\n{proc.stderr}")
    rss = int(re.search(r"peak_rss_kib=(\d+)", proc.stderr).group(1)) / 1024
    wall = float(re.search(r"wall_s=([\d.]+)", proc.stderr).group(1))
    return wall, rss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/vtr-index")
    parser.add_argument("--parts", type=int, default=256)
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/merge"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    parts = make_parts(args.work / f"parts-{args.parts}", args.parts, args.videos, seed=0)
    print(f"fabricated {args.parts} parts in {time.perf_counter() - started:.0f} s", flush=True)
    out = args.work / "merged"
    shutil.rmtree(out, ignore_errors=True)
    first = merge(args.binary, parts, out)
    again = merge(args.binary, parts, out)
    m = json.loads((out / "manifest.json").read_text())
    rows = {t: sum(s["rows"] for s in m["tables"][t]) for t in ("videos", "frames")}
    size = sum(s["bytes"] for t in ("videos", "frames") for s in m["tables"][t]) / 2**30
    print(f"\n{args.parts} parts, {rows['videos']:,} videos, {rows['frames']:,} frames at D = {DIM} ({size:.2f} GiB)")
    print(f"| merge | wall | peak RSS |\n|---|---|---|")
    print(f"| first | {first[0]:.2f} s | {first[1]:.0f} MiB |")
    print(f"| again, nothing changed | {again[0]:.2f} s | {again[1]:.0f} MiB |")

    print("\nHow the time grows with the files (10 videos per part, two shard files each):")
    print("| parts | files | wall | per file | peak RSS |\n|---|---|---|---|---|")
    for n in (16, 64, 256, 1024):
        small = make_parts(args.work / f"small-{n}", n, 10 * n, seed=n)
        target = args.work / f"small-merged-{n}"
        shutil.rmtree(target, ignore_errors=True)
        wall, rss = merge(args.binary, small, target)
        print(f"| {n} | {2 * n} | {wall:.3f} s | {wall / (2 * n) * 1000:.2f} ms | {rss:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
