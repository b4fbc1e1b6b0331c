#!/usr/bin/env python3
"""Image tower: vtr-index (candle) against PyTorch + transformers on identical pixels.

A ViT-B/32-shaped CLIP with random weights (the real architecture and cost) is made with
transformers (`CLIPModel(CLIPConfig())`, seed 0, saved as safetensors), so both sides run the
identical model. Random pixels in CLIP's normalised range are fed to both, after one warm-up
batch each. The two sides take turns for a few rounds (a slow spell on a shared machine then
hits both); each round prints frames/s of each side, their ratio and the lowest cosine between
the two sides' embeddings, and the median ratio closes the table.

PyTorch is pinned to `torch.set_float32_matmul_precision("highest")` and to as many threads as
ours (one per CPU this process may run on), so it cannot switch f32 products to bf16 behind the comparison. With
--dtype bf16 on the CPU it runs the f32 model under `torch.autocast("cpu", dtype=torch.bfloat16)`,
which is how its users run bf16 there; ours runs `--dtype bf16` (the AVX-512 BF16 products where
the CPU has them: `vtr-index info --cpu`).

Each side's share of the machine's peak is printed beside its speed: the peak is measured by
`examples/fma_peak.rs` (FMA chains on every core, f32 or, for bf16, `vdpbf16ps`), and the work
a frame is the whole forward pass's multiply-adds counted from the config (2 FLOPs each), the
same for both sides (ours skips the last layer's rows other than the class token, ~6 %).

Usage: benchmarks/.venv/bin/python benchmarks/tower_vs_pytorch.py [--frames 128] [--batch 32] [--dtype f32] [--rounds 3]
On a GPU: --device cuda --dtype f16 runs both sides there, PyTorch in the same dtype; give
--bin with a `tower_throughput` built with `--features cuda-encoder` where Rust is (the GPU
machines have none), since the script otherwise builds it.
With --baseline-bin B (another build's tower_throughput), every round also times B on the same
pixels, after this build, and the table adds the ratio of the two and their lowest cosine.
Set up once: python3 -m venv benchmarks/.venv && benchmarks/.venv/bin/pip install torch transformers numpy
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel


def random_vit_b32(work):
    """The benchmark model: transformers' default CLIPConfig (ViT-B/32), random weights, seed 0."""
    model_dir = work / "clip-vit-b32-random"
    if not (model_dir / "model.safetensors").exists():
        torch.manual_seed(0)
        CLIPModel(CLIPConfig()).save_pretrained(model_dir, safe_serialization=True)
    return model_dir


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default="benchmarks/work/tower")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bin", help="a prebuilt tower_throughput example")
    parser.add_argument("--json", help="also write the rounds and the median ratio here (the device check reads it)")
    parser.add_argument("--profile", action="store_true", help="after the rounds, PyTorch's time by operation "
                        "(torch.profiler, one pass over the frames); ours: `perf record` of the same binary")
    parser.add_argument("--baseline-bin", help="another build's tower_throughput (an earlier commit's), timed in "
                        "every round beside this one's: the cost or gain of a change, on the same machine")
    args = parser.parse_args()
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = random_vit_b32(work)
    torch.set_float32_matmul_precision("highest")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = CLIPModel.from_pretrained(model_dir).eval()
    if args.device == "cuda":
        model = model.to("cuda", torch_dtype)
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1.8, 2.1, size=(args.frames, 3, 224, 224)).astype(np.float32)
    (work / "pixels.f32").write_bytes(pixels.tobytes())

    print(f"cores: {os.cpu_count()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{args.frames} frames in batches of {args.batch}, {args.rounds} alternating rounds")
    binary = args.bin
    if binary is None:
        subprocess.run(["cargo", "build", "--quiet", "--release", "--example", "tower_throughput"], check=True)
        binary = "target/release/examples/tower_throughput"
    def command(binary, out):
        return [binary, str(model_dir), str(work / "pixels.f32"), str(args.frames), str(args.batch), str(work / out),
                args.dtype, args.device]

    def batch_of(i):
        batch = torch.from_numpy(pixels[i:i + args.batch])
        return batch.to("cuda", torch_dtype) if args.device == "cuda" else batch

    def synchronize():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def autocast():
        if args.device == "cpu" and args.dtype == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast(args.device, enabled=False)

    def pytorch_round():
        with torch.inference_mode(), autocast():
            model.get_image_features(pixel_values=batch_of(0))
            synchronize()
            start = time.perf_counter()
            outputs = []
            for i in range(0, args.frames, args.batch):
                out = model.get_image_features(pixel_values=batch_of(i))
                outputs.append(out.pooler_output if hasattr(out, "pooler_output") else out)
            synchronize()
            seconds = time.perf_counter() - start
        embeddings = torch.cat(outputs).float().cpu().numpy()
        return args.frames / seconds, embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)

    def rust_round(binary, out):
        proc = subprocess.run(command(binary, out), capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        fps = float(re.search(r"frames_per_s=([\d.]+)", proc.stdout).group(1))
        return fps, np.frombuffer((work / out).read_bytes(), dtype=np.float32).reshape(args.frames, -1)

    gflop_a_frame = vision_gflop(model.config.vision_config)
    peak = measured_peak(binary, args.dtype) if args.device == "cpu" else None
    if peak:
        print(f"work: {gflop_a_frame:.2f} GFLOP a frame; the machine's {args.dtype} peak: {peak:.1f} GFLOP/s "
              f"(examples/fma_peak.rs, {os.cpu_count()} threads)")

    def share(fps):
        return f" ({100 * fps * gflop_a_frame / peak:.0f} % of peak)" if peak else ""

    # Rounds alternate between the sides so that a slow spell of a shared machine hits each.
    baseline = ""
    if args.baseline_bin:
        baseline = " baseline | vtr-index / baseline | lowest cosine to baseline |"
    print(f"| round | PyTorch {args.dtype} ({args.device}) | vtr-index {args.dtype} ({args.device}) | vtr-index / PyTorch | "
          f"lowest cosine |{baseline}")
    print("|---|---|---|---|---|" + ("---|---|---|" if baseline else ""))
    ratios, baseline_ratios, rounds = [], [], []
    for round_no in range(1, args.rounds + 1):
        torch_fps, reference = pytorch_round()
        ours_fps, ours = rust_round(binary, "ours.f32")
        lowest = float(np.min(np.sum(ours * reference, axis=1)))
        ratios.append(ours_fps / torch_fps)
        rounds.append({"pytorch_frames_per_s": torch_fps, "vtr_index_frames_per_s": ours_fps, "lowest_cosine": lowest})
        row = (f"| {round_no} | {torch_fps:.2f} frames/s{share(torch_fps)} | {ours_fps:.2f} frames/s{share(ours_fps)} | "
               f"{ratios[-1]:.2f}× | {lowest:.6f} |")
        if args.baseline_bin:
            base_fps, base = rust_round(args.baseline_bin, "baseline.f32")
            baseline_ratios.append(ours_fps / base_fps)
            to_base = float(np.min(np.sum(ours * base, axis=1)))
            row += f" {base_fps:.2f} frames/s | {baseline_ratios[-1]:.3f}× | {to_base:.7f} |"
        print(row, flush=True)
    print(f"median ratio: {statistics.median(ratios):.2f}×")
    if baseline_ratios:
        print(f"median ratio to the baseline: {statistics.median(baseline_ratios):.3f}×")
    if args.profile:
        with torch.inference_mode(), autocast(), torch.profiler.profile() as profiler:
            for i in range(0, args.frames, args.batch):
                model.get_image_features(pixel_values=batch_of(i))
        events = profiler.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print("PyTorch by operation (self CPU time, all threads' share):")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
            print(f"  {e.key:40s} {100 * e.self_cpu_time_total / total:5.1f} %  ({e.count} calls)")
    if args.json:
        summary = {"device": args.device, "dtype": args.dtype, "frames": args.frames, "batch": args.batch,
                   "rounds": rounds, "median_ratio": statistics.median(ratios)}
        Path(args.json).write_text(json.dumps(summary, indent=1))

def vision_gflop(c):
    """GFLOP of one frame through the vision tower: the patch embedding, the layers' dense
    products and attention's two products (2 FLOPs a multiply-add)."""
    tokens = (c.image_size // c.patch_size) ** 2 + 1
    width, hidden = c.hidden_size, c.intermediate_size
    patch = (tokens - 1) * 3 * c.patch_size ** 2 * width
    layer = tokens * (4 * width * width + 2 * width * hidden) + 2 * tokens * tokens * width
    return 2 * (patch + c.num_hidden_layers * layer) / 1e9


def measured_peak(binary, dtype):
    """The machine's peak in GFLOP/s for `dtype` (f32, or bf16 where the CPU has AVX-512 BF16),
    from examples/fma_peak.rs built beside the tower binary; None where it cannot be had."""
    peak_binary = Path(binary).with_name("fma_peak")
    if not peak_binary.exists():
        subprocess.run(["cargo", "build", "--quiet", "--release", "--example", "fma_peak"], check=True)
        peak_binary = Path("target/release/examples/fma_peak")
    out = subprocess.run([str(peak_binary)], capture_output=True, text=True, check=True).stdout
    key = "bf16_peak_gflops" if dtype == "bf16" else "peak_gflops"
    found = re.search(rf"^{key}=([\d.]+)", out, re.M)
    return float(found.group(1)) if found else None


if __name__ == "__main__":
    main()
