#!/usr/bin/env python3
"""Text tower: `vtr-index encode-text` against transformers' text tower on the same captions.

A ViT-B/32-shaped CLIP with random weights (tower_vs_pytorch.py's, so both sides run the
identical model, whose text tower is OpenAI's: width 512, 12 layers, 77 tokens) encodes N
captions (default 10,000) made from a seeded vocabulary, 4 to 30 words each, as a CSV.

- vtr-index: `encode-text CAPTIONS --index INDEX` on an index of that model, end to end (the
  process's start, the model's load, reading, tokenizing, the tower, writing the text set).
- transformers, what its users run, end to end in one process: `CLIPTokenizer` (built from the
  BPE table open_clip ships, as the fixtures' is: no download), `CLIPModel.from_pretrained`, then
  batches of 64 in file order, `padding="longest"`, `get_text_features`, L2-normalised.
  PyTorch is pinned to `torch.set_float32_matmul_precision("highest")` and to as many threads as
  the machine has cores, as vtr-index uses.

The sides take turns for a few rounds; each prints both times, the ratio, whether the token ids
are equal and the lowest cosine between the two sides' embeddings of the same caption.

Usage: benchmarks/.venv/bin/python benchmarks/text_vs_transformers.py [--captions 10000] [--rounds 3]
Set up once: benchmarks/.venv/bin/pip install torch transformers numpy pyarrow;
benchmarks/.venv/bin/pip install --no-deps open_clip_torch (for its BPE table only).
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import CLIPModel

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests/fixtures/make"))
import common  # noqa: E402
from serve_load import WORDS, model_identity  # noqa: E402
from tower_vs_pytorch import random_vit_b32  # noqa: E402

BATCH = 64


def captions(n, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 31, n)
    return [" ".join(rng.choice(WORDS, size=k)) for k in lengths]


def transformers_side(model_dir, texts, tokenizer_dir):
    """End to end as a transformers user runs it: load, tokenize, embed; returns (s, ids, embeddings)."""
    start = time.perf_counter()
    tokenizer = common.clip_tokenizer(tokenizer_dir)
    model = CLIPModel.from_pretrained(model_dir).eval()
    ids, out = [], []
    with torch.inference_mode():
        for i in range(0, len(texts), BATCH):
            batch = tokenizer(texts[i:i + BATCH], padding="longest", truncation=True, max_length=77,
                              return_tensors="pt")
            features = model.get_text_features(**batch)
            features = features.pooler_output if hasattr(features, "pooler_output") else features
            out.append(features)
            mask = batch["attention_mask"].bool()
            ids.extend(row[m].tolist() for row, m in zip(batch["input_ids"], mask))
    embeddings = torch.cat(out).float().numpy()
    seconds = time.perf_counter() - start
    return seconds, ids, embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def vtr_side(binary, index, csv_path):
    start = time.perf_counter()
    proc = subprocess.run([binary, "encode-text", csv_path, "--index", index, "--name", "bench"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    manifest = json.loads((Path(index) / "manifest.json").read_text())
    tables = [pq.read_table(Path(index) / s["path"]) for s in manifest["tables"]["texts/bench"]]
    ids = [row for t in tables for row in t["token_ids"].to_pylist()]
    embeddings = np.concatenate([np.stack(t["embedding"].to_numpy(zero_copy_only=False)) for t in tables])
    return seconds, ids, embeddings.astype(np.float32)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--captions", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--binary", default="target/release/vtr-index")
    parser.add_argument("--work", default="benchmarks/work/text")
    parser.add_argument("--json", help="also write the rounds here")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("highest")
    torch.set_num_threads(os.cpu_count())
    model_dir = random_vit_b32(work)
    model_identity(args.binary, work, str(model_dir))
    index = str(work / f"one-video-{model_dir.name}")
    texts = captions(args.captions, 3)
    csv_path = work / "captions.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "sentence"])
        writer.writerows([f"video{i}", t] for i, t in enumerate(texts))
    tokenizer_dir = work / "tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    print(f"cores: {os.cpu_count()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{args.captions} captions, {args.rounds} alternating rounds")
    print("| round | transformers f32 | vtr-index f32 | transformers / vtr-index | token ids equal | lowest cosine |")
    print("|---|---|---|---|---|---|")
    rounds = []
    for round_no in range(1, args.rounds + 1):
        theirs_s, their_ids, theirs = transformers_side(model_dir, texts, tokenizer_dir)
        ours_s, our_ids, ours = vtr_side(args.binary, index, str(csv_path))
        same_ids = our_ids == their_ids
        lowest = float(np.min(np.sum(ours * theirs, axis=1)))
        rounds.append({"transformers_s": theirs_s, "vtr_index_s": ours_s, "ratio": theirs_s / ours_s,
                       "token_ids_equal": same_ids, "lowest_cosine": lowest})
        print(f"| {round_no} | {theirs_s:.2f} s | {ours_s:.2f} s | {theirs_s / ours_s:.2f}× | {same_ids} | "
              f"{lowest:.7f} |", flush=True)
    median = statistics.median(r["ratio"] for r in rounds)
    print(f"median ratio: {median:.2f}×")
    if args.json:
        Path(args.json).write_text(json.dumps({"captions": args.captions, "rounds": rounds, "median_ratio": median,
                                               "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
