"""The score explorer at scale: `serve --scores` over two generated score folders of 180,000
captions against a fabricated index of 1,000,000 videos, beside what a notebook does with pyarrow.

1. The index: 1,000,000 videos × 2 frames at D = 512 (a ViT-B/32-shaped random model, as
   serve_load.py's; `--width 32` for the sample model's) by `synthetic_index.write_tables`, rows
   pointing at the sample corpus's files in turn, so thumbnails read real videos, and a text set
   `captions` of 180,000 rows, each the caption of a random video; Parquet with a page index, as
   the index's writer writes it; format 1, upgraded by a writer (`ingest` of an empty folder).
2. Two score folders, `none` and `dsl`, generated in `score`'s layout (scoring 180,000 ×
   1,000,000 on 2 cores takes hours; the explorer's work is paging): `none` ranks drawn
   log-normal (median about 20), `dsl` from them (six in ten improved, one in ten worsened);
   `topk.parquet` with 10 rows a caption, the true video at its rank where it is within 10;
   `t2v_ranks`, `v2t_ranks`, `metrics.json` (from those ranks) and `run.json` naming the index's
   shards, one run id in all (a hash of the record, not `score`'s own).
3. `serve` without and with `--scores` (both folders): the time until it listens and its
   resident memory: the explorer's own cost.
4. Requests, each repeated: the folder list; pages of queries for every outcome × order at
   three offsets within the outcome's count (none empty); the first page of improved captions (the first builds the
   comparison) and a deep page; the histogram. Per kind: median and worst, in ms.
5. Side by side: pyarrow reading what a notebook reads for the same answers (both folders'
   `t2v_ranks.parquet` whole, joined and sorted by change; `topk.parquet` whole filtered to one
   caption), its time and the growth of its resident memory while it holds what it read.

Writes the figures as JSON (`--json`) and prints them; RESULTS.md records a run.
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import model_identity, resident_bytes, run, sample_files  # noqa: E402
from synthetic_index import embedding_array, manifest, unit_rows, write_shard, write_tables  # noqa: E402
from tower_vs_pytorch import random_vit_b32  # noqa: E402

ROW_GROUP = 64 * 1024
TOP_K = 10


def fabricated_index(binary, work, videos, captions, model):
    index = work / f"index-{videos}x2-{captions}"
    if (index / "manifest.json").exists():
        return index
    identity = model_identity(binary, work, model)
    dim = identity["embed_dim"]
    root, files = sample_files()
    rng = np.random.default_rng(11)
    tables = write_tables(index, root, videos, 2, dim, rng, files=files)
    owners = rng.integers(0, videos, captions)
    texts = pa.table({
        "text_id": pa.array(np.arange(captions, dtype=np.uint64)),
        "text": pa.array([f"caption {i} of video {v}" for i, v in enumerate(owners)]),
        "video_id": pa.array([f"v/{v:07d}" for v in owners]),
        "token_ids": pa.array([[] for _ in range(captions)], pa.list_(pa.field("item", pa.int32(), False))),
        "embedding": embedding_array(unit_rows(rng, captions, dim)),
    })
    tables["texts/captions"] = [write_shard(index, "texts/captions/part-1-00000.parquet", texts)]
    (index / "manifest.json").write_text(json.dumps(manifest(dim, [root], tables, 2, model=identity)))
    empty = work / "upgrade-root"
    empty.mkdir(exist_ok=True)
    run([binary, "ingest", empty, "--index", index])
    return index


def metrics(ranks):
    ranks = np.asarray(ranks, dtype=np.float64)
    return {"r1": 100 * float(np.mean(ranks <= 1)), "r5": 100 * float(np.mean(ranks <= 5)),
            "r10": 100 * float(np.mean(ranks <= 10)), "mdr": float(np.median(ranks)),
            "mnr": float(np.mean(ranks)), "n": int(len(ranks))}


def write_parquet(table, path, run_id):
    table = table.replace_schema_metadata({"vtr_index.run_id": run_id})
    pq.write_table(table, path, compression="snappy", row_group_size=ROW_GROUP, write_page_index=True)


def score_folder(out, index, revise, ranks, owners, videos, rng):
    """A score folder as `score` writes it, of generated ranks."""
    out.mkdir(parents=True, exist_ok=True)
    m = json.loads((index / "manifest.json").read_text())
    captions = len(ranks)
    record = {"run_id": "", "revise": revise, "temperature": 1.0, "beta": None, "scale": 100.0, "top_k": TOP_K,
              "texts": "captions", "texts_sha256": [s["sha256"] for s in m["tables"]["texts/captions"]],
              "videos_sha256": [s["sha256"] for s in m["tables"]["videos"]], "bank": None, "bank_sha256": [],
              "n_texts": captions, "n_videos": videos,
              "outputs": ["topk.parquet", "t2v_ranks.parquet", "v2t_ranks.parquet", "metrics.json", "run.json"]}
    run_id = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]
    record["run_id"] = run_id
    true_ids = np.array([f"v/{v:07d}" for v in owners], dtype=object)
    write_parquet(pa.table({"text_id": pa.array(np.arange(captions, dtype=np.uint64)),
                            "video_id": pa.array(true_ids, pa.string()),
                            "rank": pa.array(ranks.astype(np.uint32))}), out / "t2v_ranks.parquet", run_id)
    others = rng.integers(0, videos, (captions, TOP_K))
    top_ids = np.char.add("v/", np.char.zfill(others.astype(str), 7)).astype(object)
    within = ranks <= TOP_K
    top_ids[np.nonzero(within)[0], ranks[within] - 1] = true_ids[within]
    scores = np.sort(rng.normal(20, 3, (captions, TOP_K)), axis=1)[:, ::-1]
    write_parquet(pa.table({"text_id": pa.array(np.repeat(np.arange(captions, dtype=np.uint64), TOP_K)),
                            "rank": pa.array(np.tile(np.arange(1, TOP_K + 1, dtype=np.uint32), captions)),
                            "video_id": pa.array(top_ids.reshape(-1), pa.string()),
                            "score": pa.array(scores.reshape(-1))}), out / "topk.parquet", run_id)
    queried = np.unique(owners)
    v2t = np.maximum(1, rng.lognormal(1.5, 1.5, len(queried)).astype(np.int64)).astype(np.uint32)
    write_parquet(pa.table({"video_id": pa.array([f"v/{v:07d}" for v in queried]), "rank": pa.array(v2t)}),
                  out / "v2t_ranks.parquet", run_id)
    (out / "metrics.json").write_text(json.dumps({
        "run_id": run_id, "t2v": metrics(ranks), "v2t": metrics(v2t), "revise": revise, "temperature": 1.0,
        "scale": 100.0, "beta": None, "bank": None, "texts": "captions", "n_texts": captions, "n_videos": videos,
        "n_texts_unmatched": 0, "n_texts_without_video_id": 0}))
    (out / "run.json").write_text(json.dumps(record))


def serve(binary, index, scores):
    start = time.perf_counter()
    args = [binary, "serve", "--index", str(index), "--bind", "127.0.0.1:0"]
    if scores:
        args += ["--scores", *map(str, scores)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    started = time.perf_counter() - start
    if "http://127.0.0.1:" not in line:
        proc.kill()
        sys.exit(f"serve did not start: {line!r}")
    time.sleep(0.5)
    return proc, int(line.split("http://127.0.0.1:")[1].split("/")[0]), started


def timed_get(port, path):
    start = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as response:
        body = response.read()
        assert response.status == 200, (path, response.status)
    return time.perf_counter() - start, body


def notebook(none, dsl, text_id):
    """The same answers as a notebook gets them with pyarrow; prints its figures as JSON."""
    before = resident_bytes(os.getpid())
    start = time.perf_counter()
    a = pq.read_table(none / "t2v_ranks.parquet")
    b = pq.read_table(dsl / "t2v_ranks.parquet")
    change = pc.subtract(a["rank"].cast(pa.int64()), b["rank"].cast(pa.int64()))
    joined = a.append_column("change", change)
    improved = joined.filter(pc.greater(change, 0)).sort_by([("change", "descending"), ("text_id", "ascending")])
    first_improved = improved.slice(0, 20).to_pylist()
    changes_s = time.perf_counter() - start
    start = time.perf_counter()
    topk = pq.read_table(dsl / "topk.parquet")
    one = topk.filter(pc.equal(topk["text_id"], text_id)).to_pylist()
    topk_s = time.perf_counter() - start
    assert len(one) == TOP_K and first_improved
    print(json.dumps({"changes_first_page_ms": 1e3 * changes_s, "one_caption_top_k_ms": 1e3 * topk_s,
                      "rss_growth_bytes": resident_bytes(os.getpid()) - before, "improved": improved.num_rows,
                      "pyarrow": pa.__version__}))


def main():
    if sys.argv[1:2] == ["--notebook"]:
        notebook(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/vtr-index")
    parser.add_argument("--work", default="benchmarks/work/explorer")
    parser.add_argument("--videos", type=int, default=1_000_000)
    parser.add_argument("--captions", type=int, default=180_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, choices=[32, 512], default=512,
                        help="the model's: the sample model's 32, or a ViT-B/32-shaped random one's 512")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = random_vit_b32(work) if args.width == 512 else "sample/model"
    index = fabricated_index(args.binary, work, args.videos, args.captions, model)
    owners = pq.read_table(index / "texts/captions/part-1-00000.parquet", columns=["video_id"])["video_id"]
    owners = np.array([int(v[2:]) for v in owners.to_pylist()])
    rng = np.random.default_rng(12)
    none = np.minimum(args.videos, np.maximum(1, rng.lognormal(3.0, 2.0, args.captions).astype(np.int64)))
    fate = rng.random(args.captions)
    dsl = np.where(fate < 0.6, np.maximum(1, none // rng.integers(2, 10, args.captions)),
                   np.where(fate < 0.7, np.minimum(args.videos, none * 2 + 1), none))
    folders = [work / "scores-none", work / "scores-dsl"]
    for folder, revise, ranks in zip(folders, ["none", "dsl"], [none, dsl]):
        if not (folder / "run.json").exists():
            score_folder(folder, index, revise, ranks, owners, args.videos, np.random.default_rng(13))
    print(f"index and folders ready in {time.perf_counter() - start:.0f} s", flush=True)
    figures = {"videos": args.videos, "captions": args.captions, "top_k": TOP_K, "cpus": os.cpu_count(),
               "folder_bytes": sum(f.stat().st_size for f in folders[0].iterdir())}

    proc, port, started = serve(args.binary, index, [])
    figures["plain"] = {"startup_s": started, "rss_bytes": resident_bytes(proc.pid)}
    proc.kill()
    proc.wait()
    proc, port, started = serve(args.binary, index, folders)
    try:
        figures["explorer"] = {"startup_s": started, "rss_bytes": resident_bytes(proc.pid)}
        last = args.captions - 10
        paths = {"scores": ["/api/v1/scores"]}
        _, body = timed_get(port, "/api/v1/scores")
        counts = json.loads(body)["folders"][1]["outcomes"]
        for outcome in ["all", "r1", "r5", "r10", "beyond"]:
            offsets = sorted({0, counts[outcome] // 12, counts[outcome] // 3})
            for sort in ["text", "rank", "-rank"]:
                key = f"queries {outcome} {sort}"
                paths[key] = [f"/api/v1/scores/queries?folder=1&outcome={outcome}&sort={sort}&offset={o}&limit=10"
                              for o in offsets]
        first_changes, body = timed_get(port, "/api/v1/scores/changes?a=0&b=1&limit=20")
        figures["first_comparison_ms"] = 1e3 * first_changes
        summary = json.loads(body)
        figures["comparison"] = {k: summary[k] for k in ("improved", "worsened", "unchanged")}
        paths["changes improved"] = ["/api/v1/scores/changes?a=0&b=1&change=improved&offset=0&limit=20",
                                     "/api/v1/scores/changes?a=0&b=1&change=improved&offset=100000&limit=20"]
        paths["changes worsened"] = ["/api/v1/scores/changes?a=0&b=1&change=worsened&offset=0&limit=20"]
        paths["histogram"] = ["/api/v1/plots/changes.svg?a=0&b=1"]
        latency = {}
        for kind, urls in paths.items():
            times = []
            for _ in range(args.repeats):
                for url in urls:
                    seconds, body = timed_get(port, url)
                    if "/queries?" in url:
                        assert json.loads(body)["page"]["items"], url
                    times.append(seconds)
            latency[kind] = {"p50_ms": 1e3 * statistics.median(times), "max_ms": 1e3 * max(times), "n": len(times)}
        figures["latency"] = latency
        # The deepest page of every query: the last text, in text order.
        _, body = timed_get(port, f"/api/v1/scores/queries?folder=1&offset={last}&limit=10")
        page = json.loads(body)["page"]
        figures["last_page"] = {"total": page["total"], "items": len(page["items"]), "next_offset": page["next_offset"]}
        figures["explorer"]["rss_end_bytes"] = resident_bytes(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    figures["explorer_rss_over_plain_bytes"] = figures["explorer"]["rss_end_bytes"] - figures["plain"]["rss_bytes"]

    # What a notebook does, in a process of its own (for its memory): read the ranks whole, join,
    # sort; read topk whole, filter.
    answered = subprocess.run([sys.executable, __file__, "--notebook", str(folders[0]), str(folders[1]),
                               str(args.captions // 3)],
                              capture_output=True, text=True, check=True)
    figures["pyarrow"] = json.loads(answered.stdout)
    assert figures["pyarrow"]["improved"] == figures["comparison"]["improved"], figures
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
