#!/usr/bin/env python3
"""A messy corpus in one run: 1,000 damaged copies of small files with sound, ingested whole,
several times. This is the reproduction of the decoder crash that once took whole runs down
(a zeroed-range AV1 file in Matroska aborting inside GStreamer in 2 of 4 runs); crashes are
races, so this is a benchmark to run, not a test (the test suite's seeded fuzz run,
`tests/workers.rs`, is its deterministic part).

Sources (3 s, 192x144, with sound; ffmpeg): MP4, MKV, WebM and AVI with H.264, HEVC, VP9 and
AV1 where the container takes them. Mutants (seeded): bit flips, zeroed and random ranges,
truncations, dropped and duplicated chunks, one or two per file. Each run ingests all of them
into a fresh index with the bundled tiny CLIP and `--decode-timeout 10`, and prints its exit
code (0 or 2 expected: never 134), wall time, the failures by kind, and the decode workers'
deaths, retries and kills from the run report. With `--baseline-bin BIN`, each run also runs
BIN (another build, such as one that decoded on threads of the ingest process) on the same
files, alternated.

Usage: python3 benchmarks/damaged_corpus.py [--files 1000] [--runs 4] [--seed 7] [--baseline-bin BIN]
Needs ffmpeg (Debian's) and a release build (`cargo build --release`; CARGO_TARGET_DIR is honoured).
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

SOURCES = [
    ("mp4-h264.mp4", ["-c:v", "libx264", "-c:a", "aac"]),
    ("mp4-hevc.mp4", ["-c:v", "libx265", "-x265-params", "log-level=error", "-tag:v", "hvc1", "-c:a", "aac"]),
    ("mp4-av1.mp4", ["-c:v", "libsvtav1", "-c:a", "aac"]),
    ("mkv-h264.mkv", ["-c:v", "libx264", "-c:a", "libopus"]),
    ("mkv-hevc.mkv", ["-c:v", "libx265", "-x265-params", "log-level=error", "-c:a", "libmp3lame"]),
    ("mkv-vp9.mkv", ["-c:v", "libvpx-vp9", "-c:a", "libopus"]),
    ("mkv-av1.mkv", ["-c:v", "libsvtav1", "-c:a", "libopus"]),
    ("webm-vp9.webm", ["-c:v", "libvpx-vp9", "-c:a", "libopus"]),
    ("webm-av1.webm", ["-c:v", "libsvtav1", "-c:a", "libopus"]),
    ("avi-h264.avi", ["-c:v", "libx264", "-c:a", "libmp3lame"]),
]


def make_sources(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, codec in SOURCES:
        path = folder / name
        if path.exists():
            continue
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y",
                        "-f", "lavfi", "-i", "testsrc2=size=192x144:rate=25:duration=3",
                        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=3",
                        "-map", "0", "-map", "1", "-pix_fmt", "yuv420p", *codec, str(path)],
                       check=True, env={**os.environ, "SVT_LOG": "1"})


def damage(rng, data):
    n = len(data)
    at = rng.randrange(n)
    end = min(n, at + 1 + rng.randrange(n // 8 + 1))
    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(1 + rng.randrange(16)):
            i = rng.randrange(n)
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        data[at:end] = bytes(end - at)
    elif kind == 2:
        data[at:end] = rng.randbytes(end - at)
    elif kind == 3:
        del data[n // 4 + rng.randrange(n * 3 // 4):]
    elif kind == 4:
        del data[at:end]
    else:
        chunk = data[at:end]
        to = rng.randrange(len(data))
        data[to:to] = chunk


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/damaged"))
    parser.add_argument("--baseline-bin", help="another build's vtr-index, run on the same files in each run")
    args = parser.parse_args()
    target = Path(os.environ.get("CARGO_TARGET_DIR", "target"))
    binary = target / "release" / "vtr-index"
    subprocess.run(["cargo", "build", "--quiet", "--release", "--bin", "vtr-index"], check=True)
    make_sources(args.work / "sources")
    corpus = args.work / f"corpus-{args.files}-{args.seed}"
    if not corpus.exists():
        rng = random.Random(args.seed)
        tmp = corpus.with_suffix(".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i in range(args.files):
            name, _ = SOURCES[i % len(SOURCES)]
            data = bytearray((args.work / "sources" / name).read_bytes())
            for _ in range(1 + rng.randrange(2)):
                damage(rng, data)
            stem, ext = name.rsplit(".", 1)
            (tmp / f"{stem}-{i:04d}.{ext}").write_bytes(data)
        tmp.rename(corpus)
    print(f"{args.files} damaged files (seed {args.seed}), {os.cpu_count()} cores, {binary}")
    builds = [("this build", str(binary))] + ([("baseline", args.baseline_bin)] if args.baseline_bin else [])
    print("| run | build | exit | wall | indexed | failures by kind | worker deaths | retries | memory / deadline kills |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in range(1, args.runs + 1):
        for name, build in builds if run % 2 else builds[::-1]:
            index = args.work / f"index-{run}"
            shutil.rmtree(index, ignore_errors=True)
            start = time.perf_counter()
            proc = subprocess.run([build, "ingest", str(corpus), "--index", str(index),
                                   "--model", "tests/fixtures/tiny-clip", "--decode-timeout", "10"],
                                  capture_output=True, text=True)
            wall = time.perf_counter() - start
            reports = sorted((index / "runs").glob("*.json")) if (index / "runs").exists() else []
            last = proc.stderr.strip().splitlines()[-1:] or [""]
            if proc.returncode not in (0, 2) or not reports:
                print(f"| {run} | {name} | {proc.returncode} | {wall:.1f} s | no report | {last[0][:200]!r} | | | |",
                      flush=True)
                continue
            report = json.loads(reports[-1].read_text())
            workers = report.get("decode_workers")
            indexed = report["new"] + report["changed"]
            counts = (f"{workers['deaths']} | {workers['retries']} | {workers['memory_kills']} / {workers['deadline_kills']}"
                      if workers else "(threads) | | ")
            print(f"| {run} | {name} | {proc.returncode} | {wall:.1f} s | {indexed} | {report['failed']} | {counts} |",
                  flush=True)


if __name__ == "__main__":
    main()
