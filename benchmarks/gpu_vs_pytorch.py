#!/usr/bin/env python3
"""GPU scoring: vtr-index's CUDA kernels against PyTorch on the same GPU, side by side.

Runs on a GPU machine with PyTorch; the Rust side is the `gpu_score` example (it loads no
GStreamer), carried there by the device check (benchmarks/device_check/), with NVRTC's folder on
LD_LIBRARY_PATH. Both sides read the same embeddings (D = 512, unit rows, text i's video is
video i, written here with seed 0).

- copy: device-to-device copy bandwidth, the denominator of the bandwidth floor.
- stored N: CAMoE's dual softmax of a stored N × N matrix: ours (column statistics, then the
  revision into f64) against PyTorch's `S * S.softmax(0)` (f32), each against the floor
  (its bytes moved / copy bandwidth); the first rows' sums must agree.
- score N INPUTS: the whole score (dsl, top-10, T2V ranks and metrics) against PyTorch doing the
  same problem in row blocks after a first pass for the column statistics (`torch.matmul` on f32
  or f16 inputs), with time, peak device memory and R@1 of each.
- --ncu: our stored run and our score runs at the first --score size again under Nsight Compute
  (`ncu --section SpeedOfLight`), the first launch of each kernel: its duration and its share of
  the compute and memory roofs.

Usage: python3 benchmarks/gpu_vs_pytorch.py --bin PATH/gpu_score [--stored 32768] [--score 32768 100000]
  [--ncu] [--json results.json] [--torch-device cpu --copy-mib 64]  (the last two: a rehearsal
  against the emulated device, where PyTorch has no GPU)
"""

import argparse
import csv
import json
import re
import subprocess
import tempfile
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


# Nsight Compute's names for the SpeedOfLight metrics kept, by the key they are kept under.
SPEED_OF_LIGHT = {"Duration": "duration_us", "Compute (SM) Throughput": "compute_pct", "Memory Throughput": "memory_pct"}
TO_MICROSECONDS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def speed_of_light(csv_text):
    """Each kernel's first profiled launch from `ncu --csv` output: duration and roof shares."""
    kernels = {}
    rows = csv.DictReader(line for line in csv_text.splitlines() if line.startswith('"'))
    for row in rows:
        key = SPEED_OF_LIGHT.get(row.get("Metric Name"))
        if key is None:
            continue
        name, launch = row["Kernel Name"].split("(")[0], row["ID"]
        kernel = kernels.setdefault(name, {"kernel": name, "launch": launch})
        if kernel["launch"] != launch:
            continue
        value = float(row["Metric Value"].replace(",", ""))
        if key == "duration_us":
            value *= TO_MICROSECONDS[row["Metric Unit"]]
        kernel[key] = value
    for kernel in kernels.values():
        kernel["roof_pct"] = max(kernel.get("compute_pct", 0.0), kernel.get("memory_pct", 0.0))
        del kernel["launch"]
    return list(kernels.values())


def profiled(binary, *args):
    """Our run under ncu: one profiled launch per kernel (up to 40 launches in all)."""
    with tempfile.NamedTemporaryFile("r", suffix=".csv") as log:
        subprocess.run(["ncu", "--csv", "--section", "SpeedOfLight", "--launch-count", "40", "--log-file", log.name,
                        binary, *map(str, args)], check=True, capture_output=True, text=True)
        kernels = speed_of_light(log.read())
    for kernel in kernels:
        print(f"  ncu {kernel['kernel']}: {kernel.get('duration_us', float('nan')):.1f} µs, "
              f"compute {kernel.get('compute_pct', float('nan')):.0f} %, memory {kernel.get('memory_pct', float('nan')):.0f} %")
    return kernels


class Torch:
    """PyTorch on the device the comparison runs on: the GPU, or the CPU in a rehearsal."""

    def __init__(self, device):
        self.device = device

    def synchronize(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def load(self, path, n, dim, dtype):
        return torch.from_numpy(np.fromfile(path, dtype=np.float32).reshape(n, dim)).to(self.device, dtype)

    def timed(self, fn, rounds=5):
        fn()
        self.synchronize()
        started = time.perf_counter()
        for _ in range(rounds):
            result = fn()
        self.synchronize()
        return (time.perf_counter() - started) / rounds, result

    def stored(self, texts, videos, n, dim):
        t, v = self.load(texts, n, dim, torch.float32), self.load(videos, n, dim, torch.float32)
        s = 100.0 * (t @ v.T)
        del t, v
        seconds, revised = self.timed(lambda: s * s.softmax(0))
        checksum = revised[:4].double().sum().item()
        # softmax(0) reads S twice and writes once; the product reads S and the softmax, writes once.
        return seconds, s.numel() * 4 * 6, checksum

    def blocks(self, texts, videos, n, dim, dtype, block=8192, k=10):
        """The problem in row blocks: column max and sum of exponentials first, then revise,
        top-k, ranks, as a researcher would write it for a matrix that does not fit."""
        device = self.device
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t, v = self.load(texts, n, dim, dtype), self.load(videos, n, dim, dtype)
        self.synchronize()
        started = time.perf_counter()
        col_max = torch.full((n,), -float("inf"), device=device, dtype=torch.float64)
        col_sum = torch.zeros(n, device=device, dtype=torch.float64)
        for start in range(0, n, block):
            s = 100.0 * (t[start:start + block] @ v.T).double()
            new_max = torch.maximum(col_max, s.max(0).values)
            col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(s - new_max).sum(0)
            col_max = new_max
        ranks = torch.empty(n, device=device, dtype=torch.int64)
        top = torch.empty((n, min(k, n)), device=device, dtype=torch.int64)
        for start in range(0, n, block):
            s = 100.0 * (t[start:start + block] @ v.T).double()
            revised = s * torch.exp(s - col_max) / col_sum
            rows = torch.arange(s.shape[0], device=device)
            truth = revised[rows, rows + start]
            ranks[start:start + s.shape[0]] = (revised > truth[:, None]).sum(1) + 1
            top[start:start + s.shape[0]] = revised.topk(min(k, n), dim=1).indices
        self.synchronize()
        seconds = time.perf_counter() - started
        r1 = 100.0 * (ranks == 1).double().mean().item()
        peak_mib = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        return seconds, peak_mib, r1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True, help="the gpu_score example")
    parser.add_argument("--stored", type=int, default=32768)
    parser.add_argument("--score", type=int, nargs="*", default=[32768, 100000])
    parser.add_argument("--copy-mib", type=int, default=4096)
    parser.add_argument("--ncu", action="store_true", help="profile our kernels with Nsight Compute")
    parser.add_argument("--torch-device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--json", help="also write every figure here (the device check reads it)")
    parser.add_argument("--work", default="benchmarks/work/gpu")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dim = 512
    pytorch = Torch(args.torch_device)
    name = torch.cuda.get_device_name() if args.torch_device == "cuda" else "CPU"
    results = {"pytorch": f"torch {torch.__version__} on {name}", "stored": [], "score": []}
    print(results["pytorch"])
    copy = float(ours(args.bin, "copy", args.copy_mib)["copy_gb_per_s"])
    results["copy_gb_per_s"] = copy
    print(f"copy bandwidth: {copy:.0f} GB/s")

    def write():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    n = args.stored
    texts, videos = embeddings(n, dim, work)
    mine = ours(args.bin, "stored", texts, videos, dim)
    ours_s, ours_bytes = float(mine["seconds"]), float(mine["bytes"])
    torch_s, torch_bytes, torch_checksum = pytorch.stored(texts, videos, n, dim)
    stored = {"n": n, "vtr_index_s": ours_s, "vtr_index_floor_pct": 100 * ours_bytes / copy / 1e9 / ours_s,
              "pytorch_s": torch_s, "pytorch_floor_pct": 100 * torch_bytes / copy / 1e9 / torch_s,
              "speedup": torch_s / ours_s, "checksum_first_4_rows": float(mine["checksum_first_4_rows"]),
              "pytorch_checksum_first_4_rows": torch_checksum}
    print(f"| stored {n}² | vtr-index {ours_s * 1e3:.2f} ms ({stored['vtr_index_floor_pct']:.0f} % of floor) | PyTorch "
          f"S*S.softmax(0) {torch_s * 1e3:.2f} ms ({stored['pytorch_floor_pct']:.0f} % of floor) | {torch_s / ours_s:.2f}× | "
          f"first rows {stored['checksum_first_4_rows']:.9e} vs {torch_checksum:.9e} |")
    if args.ncu:
        stored["ncu"] = profiled(args.bin, "stored", texts, videos, dim)
    results["stored"].append(stored)
    write()

    for position, n in enumerate(args.score):
        texts, videos = embeddings(n, dim, work)
        for inputs, dtype in [("f32", torch.float32), ("f16", torch.float16)]:
            mine = ours(args.bin, "score", texts, videos, dim, inputs, "dsl")
            torch_s, torch_mib, torch_r1 = pytorch.blocks(texts, videos, n, dim, dtype)
            ours_s = float(mine["seconds"])
            row = {"n": n, "inputs": inputs, "vtr_index_s": ours_s, "vtr_index_peak_mib": float(mine["peak_device_mib"]),
                   "vtr_index_r1": float(mine["t2v_r1"]), "pytorch_s": torch_s, "pytorch_peak_mib": torch_mib,
                   "pytorch_r1": torch_r1, "speedup": torch_s / ours_s}
            memory = f"{torch_mib:.0f} MiB" if torch_mib is not None else "host memory"
            print(f"| score {n}² {inputs} | vtr-index {ours_s:.3f} s, {mine['peak_device_mib']} MiB, "
                  f"R@1 {row['vtr_index_r1']:.3f} | PyTorch blocks {torch_s:.3f} s, {memory}, R@1 {torch_r1:.3f} | "
                  f"{torch_s / ours_s:.2f}× |")
            if args.ncu and position == 0:
                row["ncu"] = profiled(args.bin, "score", texts, videos, dim, inputs, "dsl")
            results["score"].append(row)
            write()


if __name__ == "__main__":
    main()
