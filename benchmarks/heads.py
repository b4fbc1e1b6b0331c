#!/usr/bin/env python3
"""What a temporal head costs in ingest: `vtr-index ingest` with `--head meanP` and with
`--head seqTransf` on the same ViT-B/32-shaped CLIP4Clip checkpoint and the same clips, in
alternated rounds, frames per second of each and their ratio.

The checkpoint is made here as CLIP4Clip saves one (`pytorch_model.bin.0`, every CLIP key under
`clip.`, CLIP's weights in f16 as CLIP4Clip's `convert_weights` leaves them): open_clip's
ViT-B/32 (embed 512, vision width 768 × 12 layers, text width 512 × 12 layers) with random
weights (seed 0), and a seqTransf head as CLIP4Clip builds it for ViT-B/32 (4 layers of width
512, 8 attention heads, 77 frame positions; weights N(0, 0.02), LayerNorms 1 and 0). The clips
are ingest_vs_pyav.py's short ones (10-30 s, 320x240 to 1280x720, 30 fps), the first `--clips`.

Usage: benchmarks/.venv/bin/python benchmarks/heads.py [--clips 8] [--rounds 3] [--bin target/release/vtr-index]
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from ingest_vs_pyav import make_corpus

WIDTH, LAYERS, POSITIONS = 512, 4, 77


def checkpoint(work):
    path = work / "clip4clip-vit-b32-seqtransf" / "pytorch_model.bin.0"
    if path.exists():
        return path
    from open_clip.model import CLIP

    torch.manual_seed(0)
    clip = CLIP(embed_dim=512, vision_cfg=dict(layers=12, width=768, patch_size=32, image_size=224),
                text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12), quick_gelu=True)
    state = {}
    for name, value in clip.state_dict().items():
        half = value.dim() >= 2 and name not in ("positional_embedding", "visual.positional_embedding")
        state[f"clip.{name}"] = value.half() if half else value
    state["frame_position_embeddings.weight"] = torch.randn(POSITIONS, WIDTH) * 0.02
    for i in range(LAYERS):
        p = f"transformerClip.resblocks.{i}"
        for name, shape in [("attn.in_proj_weight", (3 * WIDTH, WIDTH)), ("attn.out_proj.weight", (WIDTH, WIDTH)),
                            ("mlp.c_fc.weight", (4 * WIDTH, WIDTH)), ("mlp.c_proj.weight", (WIDTH, 4 * WIDTH))]:
            state[f"{p}.{name}"] = torch.randn(*shape) * 0.02
        for name, size in [("attn.in_proj_bias", 3 * WIDTH), ("attn.out_proj.bias", WIDTH),
                           ("mlp.c_fc.bias", 4 * WIDTH), ("mlp.c_proj.bias", WIDTH),
                           ("ln_1.bias", WIDTH), ("ln_2.bias", WIDTH)]:
            state[f"{p}.{name}"] = torch.zeros(size)
        state[f"{p}.ln_1.weight"] = torch.ones(WIDTH)
        state[f"{p}.ln_2.weight"] = torch.ones(WIDTH)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def ingest(binary, root, index, model, head):
    subprocess.run(["rm", "-rf", str(index)], check=True)
    proc = subprocess.run(["/usr/bin/time", "-f", "wall_s=%e cpu_s=%U+%S", binary, "ingest", str(root), "--index",
                           str(index), "--model", str(model), "--head", head], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"vtr-index ingest --head {head} failed ({proc.returncode}):\n{proc.stderr}")
    wall = float(re.search(r"wall_s=([\d.]+)", proc.stderr).group(1))
    user, system = re.search(r"cpu_s=([\d.]+)\+([\d.]+)", proc.stderr).groups()
    frames = json.loads((index / "manifest.json").read_text())["tables"]["frames"]
    return wall, float(user) + float(system), sum(s["rows"] for s in frames)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bin", default="target/release/vtr-index")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work"))
    args = parser.parse_args()
    model = checkpoint(args.work / "heads")
    short, _ = make_corpus(args.work / "ingest", args.clips, ["e2e"])
    root = args.work / "heads" / "corpus"
    root.mkdir(parents=True, exist_ok=True)
    for clip in sorted(short.glob("*.mp4"))[: args.clips]:
        target = root / clip.name
        if not target.exists():
            target.symlink_to(clip.resolve())
    results = {"meanP": [], "seqTransf": []}
    for round_ in range(args.rounds):
        for head in results:
            wall, cpu, frames = ingest(args.bin, root, args.work / "heads" / f"index-{head}", model, head)
            results[head].append((wall, cpu, frames))
            print(f"round {round_ + 1}, {head}: {wall:.2f} s wall, {cpu:.2f} s CPU, {frames} frames, "
                  f"{frames / wall:.2f} frames/s", flush=True)
    print(f"\n{args.clips} clips, ViT-B/32-shaped CLIP4Clip checkpoint, medians of {args.rounds} alternated rounds")
    print("| head | wall | CPU | frames/s |")
    print("|---|---|---|---|")
    medians = {}
    for head, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        medians[head] = runs[0][2] / wall
        print(f"| {head} | {wall:.2f} s | {cpu:.2f} s | {medians[head]:.2f} |")
    print(f"seqTransf / meanP frames/s: {medians['seqTransf'] / medians['meanP']:.3f}")


if __name__ == "__main__":
    main()
