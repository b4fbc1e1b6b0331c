"""The service under load: `vtr-index serve` on a fabricated index, on loopback.

1. A ViT-B/32-shaped random CLIP (tower_vs_pytorch.py's) and a fabricated index of N videos × F
   frames (`synthetic_index.write_tables`, upgraded by a writer), whose rows point at the sample
   corpus's real files in turn, so that thumbnails and byte ranges read real videos.
2. `serve` starts: the time until it listens, and its resident memory.
3. Thumbnails, cold and cached: each sample file at three times, one at a time, then again.
4. C clients (default 32) × R requests each (default 5,000), a warm-up of 2,000 before: text
   queries, nine in ten from a vocabulary of 500 (first pages and later ones) and one in ten new
   (so the model embeds it), "more like this", video facts,
   thumbnails, byte ranges, the state, runs and failures, and malformed and hostile requests
   (bad escapes, unknown parameters, oversized pages, a rebound Host, a path outside the
   index, bytes that are not HTTP). Per kind: p50 and p99; the statuses; the 503s counted; any
   other 5xx, or a connection closed without an answer, is an error.
5. Resident memory after the warm-up and at the end: at most the warm figure plus the thumbnail
   cache's bound and the query cache's.

Writes the figures as JSON (`--json`) and prints them; RESULTS.md records a run.
"""

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_index import manifest, write_tables  # noqa: E402
from tower_vs_pytorch import random_vit_b32  # noqa: E402

WORDS = ("dog cat man woman child car street beach ocean forest city night snow rain guitar piano dance "
         "football kitchen cooking bird horse river mountain train plane crowd stage light red blue").split()
THUMBNAIL_CACHE_MIB = 64


def run(cmd):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def sample_files():
    root = Path("sample/videos").resolve()
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in (".mp4", ".webm", ".avi", ".mov", ".mkv"):
            st = path.stat()
            files.append((str(path.relative_to(root)), st.st_size, st.st_mtime_ns))
    return str(root), files


def model_identity(binary, work, model):
    """The identity an index records of `model`: that of a one-video index made with it once."""
    one = work / f"one-video-{Path(model).name}"
    if not (one / "manifest.json").exists():
        src = work / "one-video-root"
        src.mkdir(parents=True, exist_ok=True)
        shutil.copy("sample/videos/short_h264.mp4", src)
        run([binary, "ingest", src, "--index", one, "--model", model])
    return json.loads((one / "manifest.json").read_text())["model"]


def fabricated_index(binary, work, videos, frames, model):
    index = work / f"index-{videos}x{frames}"
    if (index / "manifest.json").exists():
        return index
    identity = model_identity(binary, work, model)
    root, files = sample_files()
    dim = identity["embed_dim"]
    tables = write_tables(index, root, videos, frames, dim, np.random.default_rng(7), files=files)
    (index / "manifest.json").write_text(json.dumps(manifest(dim, [root], tables, frames, model=identity)))
    empty = work / "upgrade-root"
    empty.mkdir(exist_ok=True)
    run([binary, "ingest", empty, "--index", index])
    return index


def resident_bytes(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def exchange(port, raw):
    """Sends `raw`; returns (status, seconds); status 0 when the connection closed unanswered."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(raw)
        data = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    elapsed = time.perf_counter() - start
    try:
        status = int(data.split(b" ", 2)[1]) if data else 0
    except (IndexError, ValueError):
        status = 0
    return status, elapsed


def request(port, path, extra=""):
    return f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n{extra}Connection: close\r\n\r\n".encode()


def mixed(port, rng, videos, files):
    """One request of the mix: (kind, raw bytes)."""
    vid = f"v/{rng.randrange(videos):07d}"
    # Mostly the vocabulary (users repeat queries; a page is asked again), sometimes a new one.
    q = urllib.parse.quote(" ".join(rng.sample(WORDS, 3))) if rng.random() < 0.1 else rng.choice(QUERIES)
    pick = rng.randrange(20)
    if pick < 4:
        return "search", request(port, f"/api/v1/search?q={q}&limit=20")
    if pick < 6:
        return "search_page", request(port, f"/api/v1/search?q={rng.choice(QUERIES)}&offset={20 * rng.randrange(1, 10)}&limit=20")
    if pick < 7:
        return "similar", request(port, f"/api/v1/similar?id={urllib.parse.quote(vid, safe='')}&limit=20")
    if pick < 9:
        return "video", request(port, f"/api/v1/video?id={urllib.parse.quote(vid, safe='')}")
    if pick < 12:
        # A grid's thumbnails: one of the files the rows point at, at a sampled time.
        file_row = rng.randrange(len(files))
        vid = f"v/{file_row:07d}"
        return "thumbnail", request(port, f"/api/v1/thumbnail?id={urllib.parse.quote(vid, safe='')}&t={rng.randrange(3)}")
    if pick < 13:
        return "range", request(port, f"/api/v1/media?id={urllib.parse.quote(vid, safe='')}", "Range: bytes=0-65535\r\n")
    if pick < 14:
        return "state", request(port, rng.choice(["/api/v1/index", "/api/v1/runs", "/api/v1/failures", "/"]))
    hostile = [
        request(port, "/api/v1/search?q=%FF%FE"),
        request(port, "/api/v1/search?q=dog&limit=5000"),
        request(port, "/api/v1/search?q=dog&bogus=1"),
        request(port, "/api/v1/media?id=..%2F..%2Fetc%2Fpasswd"),
        request(port, "/api/v1/thumbnail?id=v%2F0000001&t=NaN"),
        b"GET /api/v1/index HTTP/1.1\r\nHost: rebind.attacker.example\r\nConnection: close\r\n\r\n",
        b"\xff\xfe not http\r\n\r\n",
        request(port, "/api/v1/media?id=v%2F0000001", "Range: bytes=0-1,5-9\r\n"),
    ]
    return "hostile", rng.choice(hostile)


QUERIES = [urllib.parse.quote(f"a {a} and a {b} near the {c}") for a, b, c in
           [random.Random(i).sample(WORDS, 3) for i in range(500)]]


def load(port, clients, per_client, videos, files, seed):
    results = [[] for _ in range(clients)]

    def client(n):
        rng = random.Random(seed * 1000 + n)
        for _ in range(per_client):
            kind, raw = mixed(port, rng, videos, files)
            status, seconds = exchange(port, raw)
            results[n].append((kind, status, seconds))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return [r for rs in results for r in rs], wall


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/vtr-index")
    parser.add_argument("--work", default="benchmarks/work/serve")
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=5000, help="per client")
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = random_vit_b32(work)
    start = time.perf_counter()
    index = fabricated_index(args.binary, work, args.videos, args.frames, model)
    print(f"index ready in {time.perf_counter() - start:.0f} s: {index}", flush=True)
    _, files = sample_files()

    start = time.perf_counter()
    proc = subprocess.Popen([args.binary, "serve", "--index", str(index), "--bind", "127.0.0.1:0",
                             "--thumbnail-cache-mib", str(THUMBNAIL_CACHE_MIB)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    started_s = time.perf_counter() - start
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    figures = {"videos": args.videos, "frames_per_video": args.frames, "clients": args.clients,
               "requests_per_client": args.requests, "startup_s": started_s,
               "rss_started_bytes": resident_bytes(proc.pid), "cpus": os.cpu_count()}
    try:
        cold, cached = [], []
        for row in range(len(files)):
            for t in range(3):
                path = f"/api/v1/thumbnail?id=v%2F{row:07d}&t={t}"
                status, seconds = exchange(port, request(port, path))
                assert status == 200, (path, status)
                cold.append(seconds)
        for row in range(len(files)):
            for t in range(3):
                status, seconds = exchange(port, request(port, f"/api/v1/thumbnail?id=v%2F{row:07d}&t={t}"))
                cached.append(seconds)
        figures["thumbnail_cold_ms"] = {"p50": 1e3 * percentile(cold, 50), "p99": 1e3 * percentile(cold, 99), "n": len(cold)}
        figures["thumbnail_cached_ms"] = {"p50": 1e3 * percentile(cached, 50), "p99": 1e3 * percentile(cached, 99)}

        load(port, args.clients, max(1, args.warmup // args.clients), args.videos, files, seed=1)
        figures["rss_warm_bytes"] = resident_bytes(proc.pid)
        results, wall = load(port, args.clients, args.requests, args.videos, files, seed=2)
        figures["rss_end_bytes"] = resident_bytes(proc.pid)
        figures["wall_s"] = wall
        figures["requests"] = len(results)
        figures["requests_per_s"] = len(results) / wall
        statuses = {}
        for _, status, _ in results:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        figures["statuses"] = dict(sorted(statuses.items()))
        figures["busy_503"] = statuses.get("503", 0)
        bad = {s: n for s, n in statuses.items() if s == "0" or (s.startswith("5") and s != "503")}
        figures["errors"] = bad
        kinds = {}
        for kind, status, seconds in results:
            kinds.setdefault(kind, []).append(seconds)
        figures["latency_ms"] = {k: {"n": len(v), "p50": 1e3 * percentile(v, 50), "p99": 1e3 * percentile(v, 99)}
                                 for k, v in sorted(kinds.items())}
        all_times = [s for _, _, s in results]
        figures["latency_ms"]["all"] = {"n": len(all_times), "p50": 1e3 * percentile(all_times, 50),
                                        "p99": 1e3 * percentile(all_times, 99)}
        bound = figures["rss_warm_bytes"] + (THUMBNAIL_CACHE_MIB << 20) + 1024 * 2048 * 2
        figures["rss_end_within_bound"] = figures["rss_end_bytes"] <= bound
        figures["alive"] = proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    if figures.get("errors") or not figures.get("alive") or not figures.get("rss_end_within_bound"):
        sys.exit("FAILED: 5xx other than 503, a dead service, or memory past its bound")


if __name__ == "__main__":
    main()
