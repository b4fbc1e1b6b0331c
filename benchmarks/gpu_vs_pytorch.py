#!/usr/bin/env python3
"""GPU scoring: vtr-index's CUDA kernels against PyTorch on the same GPU, side by side.

Runs on a GPU machine with PyTorch; the Rust side is the `gpu_score` example, built elsewhere
with `cargo build --release --features cuda --example gpu_score` and carried with NVRTC 13.0's
lib folder on LD_LIBRARY_PATH (it loads no GStreamer). Both sides read the same embeddings
(D = 512, unit rows, text i's video is video i, written here with seed 0).

- copy: device-to-device copy bandwidth, the denominator of the bandwidth floor.
- stored N: CAMoE's dual softmax of a stored N × N matrix: ours (column statistics, then the
  revision into f64) against PyTorch's `S * S.softmax(0)` (f32), each against the floor
  (its bytes moved / copy bandwidth); the first rows' sums must agree.
- score N INPUTS: the whole score (dsl, top-10, T2V ranks and metrics) against PyTorch doing the
  same problem in row blocks after a first pass for the column statistics (`torch.matmul` on f32
  or f16 inputs), with time, peak device memory and R@1 of each.

Usage: python3 benchmarks/gpu_vs_pytorch.py --bin PATH/gpu_score [--stored 32768] [--score 32768 100000]
"""

import argparse
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import torch


def embeddings(n, dim, work):
    """Unit video rows and unit text rows near their videos, as raw f32 files (cached)."""
    texts, videos = work / f"texts_{n}.f32", work / f"videos_{n}.f32"
    if not texts.exists():
        rng = np.random.default_rng(0)
        v = rng.standard_normal((n, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        t = v + 1.5 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        t.astype(np.float32).tofile(texts)
        v.astype(np.float32).tofile(videos)
    return texts, videos


def ours(binary, *args):
    out = subprocess.run([binary, *map(str, args)], check=True, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def load(path, n, dim, dtype):
    return torch.from_numpy(np.fromfile(path, dtype=np.float32).reshape(n, dim)).cuda().to(dtype)


def timed(fn, rounds=5):
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(rounds):
        result = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / rounds, result


def pytorch_stored(texts, videos, n, dim):
    t, v = load(texts, n, dim, torch.float32), load(videos, n, dim, torch.float32)
    s = 100.0 * (t @ v.T)
    del t, v
    seconds, revised = timed(lambda: s * s.softmax(0))
    checksum = revised[:4].double().sum().item()
    # softmax(0) reads S twice and writes once; the product reads S and the softmax, writes once.
    return seconds, s.numel() * 4 * 6, checksum


def pytorch_blocks(texts, videos, n, dim, dtype, block=8192, k=10):
    """The problem in row blocks: column max and sum of exponentials first, then revise, top-k,
    ranks, as a researcher would write it for a matrix that does not fit."""
    torch.cuda.reset_peak_memory_stats()
    t, v = load(texts, n, dim, dtype), load(videos, n, dim, dtype)
    torch.cuda.synchronize()
    started = time.perf_counter()
    col_max = torch.full((n,), -float("inf"), device="cuda", dtype=torch.float64)
    col_sum = torch.zeros(n, device="cuda", dtype=torch.float64)
    own = torch.empty(n, device="cuda", dtype=torch.float64)
    for start in range(0, n, block):
        s = 100.0 * (t[start:start + block] @ v.T).double()
        rows = torch.arange(s.shape[0], device="cuda")
        own[start:start + s.shape[0]] = s[rows, rows + start]
        new_max = torch.maximum(col_max, s.max(0).values)
        col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(s - new_max).sum(0)
        col_max = new_max
    ranks = torch.empty(n, device="cuda", dtype=torch.int64)
    top = torch.empty((n, k), device="cuda", dtype=torch.int64)
    for start in range(0, n, block):
        s = 100.0 * (t[start:start + block] @ v.T).double()
        revised = s * torch.exp(s - col_max) / col_sum
        rows = torch.arange(s.shape[0], device="cuda")
        truth = revised[rows, rows + start]
        ranks[start:start + s.shape[0]] = (revised > truth[:, None]).sum(1) + 1
        top[start:start + s.shape[0]] = revised.topk(k, dim=1).indices
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    r1 = 100.0 * (ranks == 1).double().mean().item()
    return seconds, torch.cuda.max_memory_allocated() / 2**20, r1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True, help="target/release/examples/gpu_score")
    parser.add_argument("--stored", type=int, default=32768)
    parser.add_argument("--score", type=int, nargs="*", default=[32768, 100000])
    parser.add_argument("--work", default="benchmarks/work/gpu")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dim = 512
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    copy = float(ours(args.bin, "copy", 4096)["copy_gb_per_s"])
    print(f"copy bandwidth: {copy:.0f} GB/s")

    n = args.stored
    texts, videos = embeddings(n, dim, work)
    mine = ours(args.bin, "stored", texts, videos, dim)
    ours_s, ours_bytes = float(mine["seconds"]), float(mine["bytes"])
    torch_s, torch_bytes, torch_checksum = pytorch_stored(texts, videos, n, dim)
    print(f"| stored {n}² | vtr-index {ours_s * 1e3:.2f} ms ({ours_bytes / ours_s / 1e9:.0f} GB/s, "
          f"{100 * ours_bytes / copy / 1e9 / ours_s:.0f} % of floor) | PyTorch S*S.softmax(0) {torch_s * 1e3:.2f} ms "
          f"({100 * torch_bytes / copy / 1e9 / torch_s:.0f} % of floor) | {torch_s / ours_s:.2f}× | "
          f"first rows {float(mine['checksum_first_4_rows']):.9e} vs {torch_checksum:.9e} |")

    for n in args.score:
        texts, videos = embeddings(n, dim, work)
        for inputs, dtype in [("f32", torch.float32), ("f16", torch.float16)]:
            mine = ours(args.bin, "score", texts, videos, dim, inputs, "dsl")
            torch_s, torch_mib, torch_r1 = pytorch_blocks(texts, videos, n, dim, dtype)
            print(f"| score {n}² {inputs} | vtr-index {float(mine['seconds']):.3f} s, {mine['peak_device_mib']} MiB, "
                  f"R@1 {float(mine['t2v_r1']):.3f} | PyTorch blocks {torch_s:.3f} s, {torch_mib:.0f} MiB, R@1 {torch_r1:.3f} | "
                  f"{torch_s / float(mine['seconds']):.2f}× |")


if __name__ == "__main__":
    main()
