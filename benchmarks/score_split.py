#!/usr/bin/env python3
"""A score split over many machines, run here stage after stage: `score --stage stats` and
`--stage rank` for each of `--parts` parts, then `--stage finish`, against the single-machine
`score` of the same index in the same run: each stage's wall time and peak RSS, the sum of the
stages, and the outputs compared (the same top-k ids and metrics).

The index is score_vs_numpy.py's (N texts and N videos at D = 512, one caption per video,
`--revise dsl`), written once under benchmarks/work/score-split.

Usage: benchmarks/.venv/bin/python benchmarks/score_split.py [--size 100000] [--parts 8]
       [--binary target/release/vtr-index]
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from score_vs_numpy import make_corpus, write_index


def run(binary, args):
    proc = subprocess.run(["/usr/bin/time", "-f", "peak_rss_kib=%M wall_s=%e", binary, *map(str, args)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"vtr-index {' '.join(map(str, args))} failed:\n{proc.stderr}")
    rss = int(re.search(r"peak_rss_kib=(\d+)", proc.stderr).group(1)) / 1024
    return float(re.search(r"wall_s=([\d.]+)", proc.stderr).group(1)), rss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--binary", default="target/release/vtr-index")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/score-split"))
    args = parser.parse_args()
    index = args.work / f"index-{args.size}"
    if not (index / "manifest.json").exists():
        args.work.mkdir(parents=True, exist_ok=True)
        write_index(index, *make_corpus(args.size))
    settings = ["--index", index, "--texts", "bench", "--revise", "dsl", "--scale", "100"]
    single_out = args.work / "single"
    single = run(args.binary, ["score", *settings, "--out", single_out])
    print(f"single machine: {single[0]:.1f} s, peak RSS {single[1]:.0f} MiB", flush=True)
    work, split_out = args.work / "stages", args.work / "split"
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for stage in ("stats", "rank"):
        for part in range(args.parts):
            wall, rss = run(args.binary, ["score", *settings, "--stage", stage, "--part", f"{part}/{args.parts}",
                                          "--work", work])
            rows.append((f"{stage} {part}/{args.parts}", wall, rss))
            print(f"{stage} {part}/{args.parts}: {wall:.1f} s, {rss:.0f} MiB", flush=True)
    wall, rss = run(args.binary, ["score", *settings, "--stage", "finish", "--work", work, "--out", split_out])
    rows.append(("finish", wall, rss))
    total = sum(r[1] for r in rows)
    stage_bytes = sum(p.stat().st_size for p in work.iterdir())
    same_top = pq.read_table(single_out / "topk.parquet").select(["text_id", "rank", "video_id"]).equals(
        pq.read_table(split_out / "topk.parquet").select(["text_id", "rank", "video_id"]))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (single_out, split_out))
    print(f"\n{args.size:,} × {args.size:,}, dsl, {args.parts} parts")
    print("| step | wall | peak RSS |\n|---|---|---|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} s | {rss:.0f} MiB |")
    print(f"| sum of the stages | {total:.1f} s | max {max(r[2] for r in rows):.0f} MiB |")
    print(f"| single machine | {single[0]:.1f} s | {single[1]:.0f} MiB |")
    print(f"stage files: {stage_bytes / 2**20:.1f} MiB in all; same top-k ids: {same_top}; "
          f"same metrics: {a['t2v'] == b['t2v'] and a['v2t'] == b['v2t']}")


if __name__ == "__main__":
    main()
