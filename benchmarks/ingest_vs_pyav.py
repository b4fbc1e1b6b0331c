#!/usr/bin/env python3
"""End-to-end ingest: vtr-index against the Python pipeline users run today, on one corpus.

The script makes everything it measures and runs both sides in one run on the same machine:

  1. a ViT-B/32-shaped CLIP with random weights (transformers, seed 0; the one
     `tower_vs_pytorch.py` makes), which both sides load;
  2. a corpus written with PyAV's libx264 (x264's default GOP of 250 frames, no colour tags, so
     both sides convert with BT.601 as ffmpeg does): short clips like MSR-VTT's (10-30 s,
     320x240 to 1280x720, 30 fps) and one long clip (10 min, 1920x1080, 25 fps);
  3. the Python pipeline, as a researcher writes it: PyAV decodes every frame (frame threading
     on), CLIP4Clip's frame choice (the frame on screen at each whole second, distinct frames,
     then `linspace` down to 12), `CLIPImageProcessor`, `CLIPModel.get_image_features` per video,
     meanP; against `vtr-index ingest` (release build) on the same folder: once for the short
     clips, once for the long one. It prints wall time,
     videos/s, frames/s and peak RSS for each side and their ratio, and checks that both chose
     the same frame times (within 1 ms) and that per-video embeddings agree (cosine);
  4. the long clip alone: the time vtr-index takes to sample its 12 frames (the decode module,
     as ingest runs it) against PyAV decoding every frame of it (no conversion);
  5. peak RSS of `vtr-index ingest` over 10 and over 1,000 distinct small clips with the
     bundled tiny CLIP (`--tiny-model`), to show memory does not grow with the corpus;
  6. `stages`: on the short clips and on 30 MSR-VTT-like clips with sound (320x240, 10-20 s,
     stereo AAC), in alternated rounds: (a) ingest's decode work alone (decode, sample,
     preprocess, hash, on threads of one process; `examples/ingest_stages.rs decode`), (b) the
     tower alone on the frames (a) made, in ingest's batches (`ingest_stages tower`), (c) the
     whole ingest, (d) the Python pipeline, and with `--baseline-bin BIN` (e) BIN's whole ingest,
     another build to compare with. It prints each one's median wall and CPU time (a child's
     CPU includes its own children's: ingest's decode worker processes), the bound
     (CPU a + CPU b) / cores that (c) would reach if its stages overlapped perfectly,
     (c) / bound, (d) / (c), (c) / (e), and the memory (c)'s run report gives for the ingest
     process and its workers.

Usage: benchmarks/.venv/bin/python benchmarks/ingest_vs_pyav.py [--clips 24] [--steps e2e e2e-long long rss stages] [--rounds 3] [--baseline-bin BIN]
Binaries are built into CARGO_TARGET_DIR (default target/).
Set up once: python3 -m venv benchmarks/.venv &&
  benchmarks/.venv/bin/pip install torch transformers av pillow numpy pyarrow
The corpus is written once under benchmarks/work/ingest (about 1 GB) and reused.
"""

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import CLIPImageProcessor, CLIPModel

from tower_vs_pytorch import random_vit_b32

MAX_FRAMES = 12
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", "target"))
SHORT_SIZES = [(320, 240), (480, 360), (640, 480), (1280, 720)]
# MSR-VTT-like: 320x240, 10-20 s, with sound.
LOWRES_CLIPS = 30


def write_clip(path, width, height, seconds, fps, seed, preset, sound=False):
    """A moving, textured H.264 clip (written as yuv420p planes, so no conversion is timed);
    with `sound`, also a stereo AAC track at 48 kHz (a tone with noise), as camera clips have."""
    rng = np.random.default_rng(seed)
    # Flat 32-pixel tiles of random grey that pan 2 pixels a frame and change brightness every
    # second: real motion for the encoder and new content each second, at a bit rate like
    # camera footage (pure noise would make gigabyte files that no decoder sees in practice).
    tiles = rng.integers(16, 240, size=(height // 32 + 4, width // 32 + 4), dtype=np.uint8)
    texture = np.kron(tiles, np.ones((32, 32), dtype=np.uint8))
    chroma = np.kron(rng.integers(64, 192, size=(2, height // 64 + 1, width // 64 + 1), dtype=np.uint8),
                     np.ones((1, 32, 32), dtype=np.uint8))[:, :height // 2, :width // 2]
    tmp = path.with_suffix(".partial.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": preset, "crf": "26"}
        audio = None
        if sound:
            audio = container.add_stream("aac", rate=48_000, layout="stereo")
            samples_per_frame = 48_000 // fps
        planes = np.empty((height * 3 // 2, width), dtype=np.uint8)
        planes[height:] = chroma.reshape(height // 2, width)
        for i in range(int(seconds * fps)):
            if i % fps == 0:
                brighter = np.clip(texture.astype(np.int16) + (i // fps) * 9 % 80 - 40, 0, 255).astype(np.uint8)
            shift = (2 * i) % 64
            planes[:height] = brighter[shift:shift + height, shift:shift + width]
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
            if audio is not None:
                t = (i * samples_per_frame + np.arange(samples_per_frame)) / 48_000
                tone = 0.2 * np.sin(2 * np.pi * (220 + 20 * (i // fps)) * t) + 0.02 * rng.standard_normal(t.size)
                sound_frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]).astype(np.float32), format="fltp",
                                                         layout="stereo")
                sound_frame.sample_rate, sound_frame.pts = 48_000, i * samples_per_frame
                for packet in audio.encode(sound_frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            for packet in audio.encode():
                container.mux(packet)
    tmp.rename(path)


def make_corpus(work, clips, steps):
    """Writes what the chosen steps read (once; later runs reuse it)."""
    short = work / "corpus" / "short"
    long_path = work / "corpus" / "long" / "long_1080p.mp4"
    short.mkdir(parents=True, exist_ok=True)
    for i in range(clips):
        path = short / f"clip_{i:03d}.mp4"
        if not path.exists():
            width, height = SHORT_SIZES[i % len(SHORT_SIZES)]
            write_clip(path, width, height, 10 + (i * 7) % 21, 30, seed=i, preset="veryfast")
    if {"e2e-long", "long"} & set(steps) and not long_path.exists():
        print("writing the 10-minute 1080p clip (a few minutes, once)", flush=True)
        long_path.parent.mkdir(parents=True, exist_ok=True)
        write_clip(long_path, 1920, 1080, 600, 25, seed=10_000, preset="ultrafast")
    lowres = work / "corpus" / "lowres"
    if "stages" in steps:
        lowres.mkdir(parents=True, exist_ok=True)
        for i in range(LOWRES_CLIPS):
            path = lowres / f"msrvtt_like_{i:03d}.mp4"
            if not path.exists():
                write_clip(path, 320, 240, 10 + (i * 7) % 11, 30, seed=30_000 + i, preset="veryfast", sound=True)
    if "rss" in steps:
        rss = work / "rss" / "1000"
        rss10 = work / "rss" / "10"
        for d in (rss, rss10):
            d.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            path = rss / f"small_{i:04d}.mp4"
            if not path.exists():
                write_clip(path, 160, 120, 3, 10, seed=20_000 + i, preset="ultrafast")
        for i in range(10):
            target = rss10 / f"small_{i:04d}.mp4"
            if not target.exists():
                shutil.copyfile(rss / f"small_{i:04d}.mp4", target)
    return short, long_path, lowres


def on_screen_each_second(container):
    """CLIP4Clip's choice, streamed: the frame on screen at t = 0, 1, 2, ... s (the last one
    whose time is <= t), distinct frames only. Yields (time from the first frame, frame)."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    first = previous = None
    next_t = 0.0
    for frame in container.decode(stream):
        t = float(frame.pts * frame.time_base)
        first = t if first is None else first
        t -= first
        if previous is not None:
            prev_t, prev_frame = previous
            taken = False
            while next_t < t:
                if not taken and next_t >= prev_t:
                    yield prev_t, prev_frame
                    taken = True
                next_t += 1.0
        previous = (t, frame)
    if previous is not None and next_t <= previous[0]:
        yield previous


def python_pipeline(paths, model_dir):
    """What users run today. Returns {name: (frame times, meanP embedding)}, frames."""
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessor()
    results, frames = {}, 0
    with torch.inference_mode():
        for path in paths:
            times, pixels = [], []
            with av.open(str(path)) as container:
                for t, frame in on_screen_each_second(container):
                    times.append(t)
                    pixels.append(processor(images=frame.to_image(), return_tensors="np")["pixel_values"][0])
            keep = np.linspace(0, len(times) - 1, min(MAX_FRAMES, len(times)), dtype=int)
            batch = torch.from_numpy(np.stack([pixels[i] for i in keep]))
            out = model.get_image_features(pixel_values=batch)
            out = out.pooler_output if hasattr(out, "pooler_output") else out
            out = torch.nn.functional.normalize(out, dim=-1).mean(0)
            results[path.name] = ([times[i] for i in keep], torch.nn.functional.normalize(out, dim=0).numpy())
            frames += len(keep)
    return results, frames


def run_ingest(binary, root, index, model):
    shutil.rmtree(index, ignore_errors=True)
    proc = subprocess.run(["/usr/bin/time", "-f", "peak_rss_kib=%M wall_s=%e", binary, "ingest", str(root),
                           "--index", str(index), "--model", str(model)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"vtr-index ingest failed ({proc.returncode}):\n{proc.stderr}")
    rss = int(re.search(r"peak_rss_kib=(\d+)", proc.stderr).group(1)) / 1024
    wall = float(re.search(r"wall_s=([\d.]+)", proc.stderr).group(1))
    return wall, rss


def read_index(index):
    manifest = json.loads((index / "manifest.json").read_text())
    videos = [pq.read_table(index / s["path"]) for s in manifest["tables"]["videos"]]
    frames = [pq.read_table(index / s["path"]) for s in manifest["tables"]["frames"]]
    out, ids = {}, {}
    for table in videos:
        for vid, path, emb in zip(table.column("video_id").to_pylist(), table.column("path").to_pylist(),
                                  table.column("embedding").to_pylist()):
            ids[vid] = Path(path).name
            out[ids[vid]] = ([], np.asarray(emb, dtype=np.float32))
    for table in frames:
        rows = sorted(zip(table.column("video_id").to_pylist(), table.column("frame_index").to_pylist(),
                          table.column("pts_s").to_pylist()))
        for vid, _, pts in rows:
            out[ids[vid]][0].append(pts)
    return out


def end_to_end(args, binary, model_dir, root, label):
    paths = sorted(root.glob("*.mp4"))
    start = time.perf_counter()
    reference, frames = python_pipeline(paths, model_dir)
    py_wall = time.perf_counter() - start
    py_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    index = args.work / f"index-{label}"
    ours_wall, ours_rss = run_ingest(binary, root, index, model_dir)
    ours = read_index(index)
    worst_dt = max(abs(a - b) for name, (times, _) in reference.items()
                   for a, b in zip(times, ours[name][0]))
    same_counts = all(len(times) == len(ours[name][0]) for name, (times, _) in reference.items())
    cosines = [float(np.dot(emb, ours[name][1])) for name, (_, emb) in reference.items()]
    n = len(paths)
    print(f"\n{label}: {n} videos, {frames} frames")
    print("| side | wall | videos/s | frames/s | peak RSS |")
    print("|---|---|---|---|---|")
    print(f"| Python (PyAV + transformers) | {py_wall:.1f} s | {n / py_wall:.3f} | {frames / py_wall:.2f} | "
          f"{py_rss:.0f} MiB |")
    print(f"| vtr-index ingest | {ours_wall:.1f} s | {n / ours_wall:.3f} | {frames / ours_wall:.2f} | "
          f"{ours_rss:.0f} MiB |")
    print(f"vtr-index / Python speed: {py_wall / ours_wall:.2f}x; same frame counts: {same_counts}; "
          f"largest frame-time difference: {worst_dt * 1000:.3f} ms; per-video cosine: lowest "
          f"{min(cosines):.5f}, median {float(np.median(cosines)):.5f}", flush=True)


def child_run(cmd):
    """Runs `cmd`; returns its wall time, its CPU time (user + system, its threads and
    children included) and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, proc.stdout


def steal_seconds():
    """CPU time the hypervisor gave to other guests while this VM's cores wanted to run, summed
    over the cores (`/proc/stat`, USER_HZ ticks): wall time that no CPU time of ours shows."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def stages(args, binary, model_dir, root, label):
    """(a) decode + sample + preprocess alone, (b) the tower alone on the frames (a) made, at
    ingest's batch size, (c) the whole ingest, (d) the Python pipeline, in alternated rounds.
    The bound is what (c) would take if its stages overlapped perfectly on every core."""
    cores = os.cpu_count()
    stage_bin = str(TARGET / "release" / "examples" / "ingest_stages")
    workers = str(max(1, cores // 2))
    pixels = args.work / f"pixels-{label.replace(' ', '-')}.f32"
    index = args.work / f"index-stages-{label.replace(' ', '-')}"
    paths = sorted(root.glob("*.mp4"))
    sides_run = "abcde" if args.baseline_bin else "abcd"
    runs = {side: [] for side in sides_run}
    frames = {}

    def side_a():
        wall, cpu, out = child_run([stage_bin, "decode", str(root), str(model_dir), workers, str(pixels)])
        frames["a"] = int(re.search(r"frames=(\d+)", out).group(1))
        return wall, cpu

    def side_b():
        wall, cpu, out = child_run([stage_bin, "tower", str(model_dir), str(pixels), str(args.batch), args.dtype])
        frames["b"] = int(re.search(r"frames=(\d+)", out).group(1))
        return wall, cpu

    def whole_ingest(build, side):
        shutil.rmtree(index, ignore_errors=True)
        wall, cpu, _ = child_run([build, "ingest", str(root), "--index", str(index), "--model", str(model_dir),
                                  "--batch", str(args.batch), "--dtype", args.dtype])
        report = json.loads(max((index / "runs").glob("*.json")).read_text())
        frames[side] = report["frames"]
        frames[f"{side}-stages"] = report["stage_seconds"]
        frames[f"{side}-memory"] = (report.get("memory"), report.get("decode_workers"))
        return wall, cpu

    def side_c():
        return whole_ingest(binary, "c")

    def side_e():
        return whole_ingest(args.baseline_bin, "e")

    def side_d():
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        _, frames["d"] = python_pipeline(paths, model_dir)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

    sides = {"a": side_a, "b": side_b, "c": side_c, "d": side_d, "e": side_e}
    side_a()  # (b) reads the frames (a) writes
    n_sides = len(sides_run)
    for round_ in range(args.rounds):
        order = sides_run[round_ % n_sides:] + sides_run[:round_ % n_sides]
        for side in order:
            stolen = steal_seconds()
            wall, cpu = sides[side]()
            runs[side].append((wall, cpu, steal_seconds() - stolen))
        print(f"  round {round_ + 1}: " + ", ".join(f"{s} {runs[s][-1][0]:.2f} s" for s in sides_run), flush=True)
    median = {side: tuple(float(np.median([run[i] for run in r])) for i in range(3)) for side, r in runs.items()}
    bound = (median["a"][1] + median["b"][1]) / cores
    n = len(paths)
    print(f"\n{label}: {n} videos, frames a/b/c/d = {frames['a']}/{frames['b']}/{frames['c']}/{frames['d']}, "
          f"{cores} cores, median of {args.rounds} alternated rounds (ingest's last run report: "
          f"{frames['c-stages']})")
    print("| stage | wall | CPU | stolen (all cores) | frames/s |")
    print("|---|---|---|---|---|")
    names = {"a": "(a) decode + sample + preprocess alone", "b": f"(b) tower alone, batches of {args.batch}",
             "c": "(c) vtr-index ingest", "d": "(d) Python (PyAV + transformers)",
             "e": f"(e) {args.baseline_bin} ingest"}
    for side in sides_run:
        wall, cpu, stolen = median[side]
        print(f"| {names[side]} | {wall:.2f} s | {cpu:.2f} s | {stolen:.2f} s | {frames[side] / wall:.2f} |")
    # The bound counts CPU time, which steal does not show; (c)'s wall less the time its cores
    # were stolen is what its own scheduling took.
    c_wall = median["c"][0]
    c_net = float(np.median([wall - stolen / cores for wall, _, stolen in runs["c"]]))
    print(f"bound (CPU a + CPU b) / {cores} = {bound:.2f} s; (c) / bound = **{c_wall / bound:.3f}**, "
          f"(c) less its stolen time / {cores} cores: {c_net:.2f} s, {c_net / bound:.3f} of the bound; "
          f"(d) / (c) = {median['d'][0] / c_wall:.2f}", flush=True)
    print(f"(c)'s memory and decode workers (its last run report): {frames['c-memory']}")
    if args.baseline_bin:
        ratios = [c[0] / e[0] for c, e in zip(runs["c"], runs["e"])]
        print(f"(c) / (e): median wall {c_wall / median['e'][0]:.3f} (per round: "
              f"{', '.join(f'{r:.3f}' for r in ratios)}), CPU {median['c'][1] / median['e'][1]:.3f}", flush=True)


def long_video(long_path, runs):
    subprocess.run(["cargo", "build", "--quiet", "--release", "--example", "sample_video"], check=True)
    sample_video = str(TARGET / "release" / "examples" / "sample_video")
    print(f"\n{long_path.name}: 12 frames sampled by vtr-index vs every frame decoded by PyAV")
    print("| run | vtr-index: sample 12 frames | PyAV: decode every frame | frames decoded by PyAV | ratio |")
    print("|---|---|---|---|---|")
    for run in range(1, runs + 1):
        proc = subprocess.run([sample_video, str(long_path)], capture_output=True,
                              text=True, check=True)
        ours = float(re.search(r"seconds=([\d.]+)", proc.stdout).group(1))
        start = time.perf_counter()
        decoded = 0
        with av.open(str(long_path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for _ in container.decode(stream):
                decoded += 1
        full = time.perf_counter() - start
        print(f"| {run} | {ours:.2f} s | {full:.2f} s | {decoded} | {ours / full * 100:.1f} % |", flush=True)


def rss_growth(binary, work, tiny_model):
    print("\npeak RSS of vtr-index ingest against corpus size (tiny CLIP, 160x120 clips of 3 s)")
    print("| videos | wall | peak RSS |")
    print("|---|---|---|")
    for n in (10, 1000):
        wall, rss = run_ingest(binary, work / "rss" / str(n), work / f"index-rss-{n}", tiny_model)
        print(f"| {n} | {wall:.1f} s | {rss:.0f} MiB |", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=24)
    steps = ["e2e", "e2e-long", "long", "rss", "stages"]
    parser.add_argument("--steps", nargs="+", default=steps, choices=steps)
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of the stages step")
    parser.add_argument("--batch", type=int, default=32, help="ingest's batch size (its default)")
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16"],
                        help="the dtype of vtr-index's tower and ingest in the stages step (bf16: the AVX-512 BF16 "
                        "products where the CPU has them); the Python pipeline stays f32")
    parser.add_argument("--baseline-bin", help="another build's vtr-index, whose whole ingest is run as side (e)")
    parser.add_argument("--long-runs", type=int, default=3)
    parser.add_argument("--tiny-model", default="tests/fixtures/tiny-clip")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/ingest"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = random_vit_b32(Path("benchmarks/work/tower"))
    short, long_path, lowres = make_corpus(args.work, args.clips, args.steps)
    subprocess.run(["cargo", "build", "--quiet", "--release", "--bin", "vtr-index", "--example", "ingest_stages"],
                   check=True)
    binary = str(TARGET / "release" / "vtr-index")
    print(f"cores: {os.cpu_count()}, torch {torch.__version__} ({torch.get_num_threads()} threads), av {av.__version__}")
    if "e2e" in args.steps:
        end_to_end(args, binary, model_dir, short, "short clips")
    if "e2e-long" in args.steps:
        end_to_end(args, binary, model_dir, long_path.parent, "long clip")
    if "long" in args.steps:
        long_video(long_path, args.long_runs)
    if "rss" in args.steps:
        rss_growth(binary, args.work, args.tiny_model)
    if "stages" in args.steps:
        stages(args, binary, model_dir, short, "benchmark corpus")
        stages(args, binary, model_dir, lowres, "low-res clips with sound")


if __name__ == "__main__":
    main()
