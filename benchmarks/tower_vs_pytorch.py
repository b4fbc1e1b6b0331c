#!/usr/bin/env python3
"""Image tower: vtr-index (candle) against PyTorch + transformers on identical pixels.

A ViT-B/32-shaped CLIP with random weights (the real architecture and cost) is made with
transformers (`CLIPModel(CLIPConfig())`, seed 0, saved as safetensors), so both sides run the
identical model. Random pixels in CLIP's normalised range are fed to both, after one warm-up
batch each; the script prints frames/s of each side, their ratio and the lowest cosine between
the two sides' embeddings.

Usage: benchmarks/.venv/bin/python benchmarks/tower_vs_pytorch.py [--frames 128] [--batch 32] [--dtype f32]
Set up once: python3 -m venv benchmarks/.venv && benchmarks/.venv/bin/pip install torch transformers numpy
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    parser.add_argument("--work", default="benchmarks/work/tower")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "clip-vit-b32-random"
    torch.manual_seed(0)
    if not (model_dir / "model.safetensors").exists():
        CLIPModel(CLIPConfig()).save_pretrained(model_dir, safe_serialization=True)
    model = CLIPModel.from_pretrained(model_dir).eval()
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1.8, 2.1, size=(args.frames, 3, 224, 224)).astype(np.float32)
    (work / "pixels.f32").write_bytes(pixels.tobytes())

    print(f"cores: {os.cpu_count()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{args.frames} frames in batches of {args.batch}")
    with torch.inference_mode():
        model.get_image_features(pixel_values=torch.from_numpy(pixels[:args.batch]))
        start = time.perf_counter()
        reference = []
        for i in range(0, args.frames, args.batch):
            out = model.get_image_features(pixel_values=torch.from_numpy(pixels[i:i + args.batch]))
            out = out.pooler_output if hasattr(out, "pooler_output") else out
            reference.append(out)
        torch_seconds = time.perf_counter() - start
    reference = torch.cat(reference).numpy()
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)

    cmd = ["cargo", "run", "--quiet", "--release", "--example", "tower_throughput", "--", str(model_dir),
           str(work / "pixels.f32"), str(args.frames), str(args.batch), str(work / "ours.f32"), args.dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    ours_fps = float(re.search(r"frames_per_s=([\d.]+)", proc.stdout).group(1))
    ours = np.frombuffer((work / "ours.f32").read_bytes(), dtype=np.float32).reshape(args.frames, -1)
    lowest = float(np.min(np.sum(ours * reference, axis=1)))
    torch_fps = args.frames / torch_seconds
    print(f"| PyTorch f32 | vtr-index {args.dtype} | vtr-index / PyTorch | lowest cosine |")
    print("|---|---|---|---|")
    print(f"| {torch_fps:.2f} frames/s | {ours_fps:.2f} frames/s | {ours_fps / torch_fps:.2f}× | {lowest:.6f} |")


if __name__ == "__main__":
    main()
