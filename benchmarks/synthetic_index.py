"""Helpers for the benchmarks that write a vtr-index index directly with pyarrow: shards in the
project's Parquet schema (embeddings as FixedSizeList<Float32, D>) and the manifest that lists them."""

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def embedding_array(matrix):
    """An (n, D) float32 matrix as the index's embedding column."""
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), matrix.shape[1])


def write_shard(index, rel, table):
    """Writes one shard (in row groups of 65,536 rows, with a page index, as the index's writer
    does) and returns its manifest entry."""
    path = index / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="snappy", row_group_size=64 * 1024, write_page_index=True)
    data = path.read_bytes()
    return {"path": rel, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def manifest(dim, roots, tables, max_frames=12, logit_scale=4.605170249938965, model=None):
    """A format-1 manifest for a synthetic model of width `dim` that is never loaded, or for
    `model`, the identity another index records of a real checkpoint."""
    return {
        "format_version": 1,
        "model": model or {"id": "synthetic", "source": "/nonexistent/synthetic-model", "sha256": "0" * 64,
                           "embed_dim": dim, "image_size": 224, "logit_scale": logit_scale},
        "sampling": {"fps": 1.0, "max_frames": max_frames},
        "preprocess": {"resize": "bicubic-antialias", "shortest_edge": 224, "crop": 224,
                       "mean": CLIP_MEAN, "std": CLIP_STD},
        "roots": roots,
        "tables": tables,
    }


def unit_rows(rng, n, dim):
    """`n` random unit vectors of width `dim` (float32)."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def write_tables(index, root, n, frames, dim, rng, video_rows=100_000, frame_rows=20_000, files=None):
    """Writes the videos and frames shards (format 1: no `stream_index`) of `n` synthetic videos
    of `frames` frames each under the root `root`, one shard's rows in memory at a time; returns
    the manifest's `tables`. Video `i` is `v/<i>`; its frames are at 0, 1, 2… s. Its file is
    `<id>.mp4`, which does not exist, or, with `files` (`(path under root, size, mtime_ns)`
    each), those real files in turn, so that what reads a video's file finds one."""
    tables = {"videos": [], "frames": []}
    frame_part = 0
    for part, start in enumerate(range(0, n, video_rows)):
        count = min(video_rows, n - start)
        ids = [f"v/{i:07d}" for i in range(start, start + count)]
        videos = pa.table({
            "video_id": pa.array(ids),
            "root": pa.array([root] * count),
            "path": pa.array([files[j % len(files)][0] for j in range(start, start + count)] if files
                             else [f"{i}.mp4" for i in ids]),
            "size_bytes": pa.array([files[j % len(files)][1] for j in range(start, start + count)] if files
                                   else np.full(count, 1000, np.uint64), pa.uint64()),
            "mtime_ns": pa.array([files[j % len(files)][2] for j in range(start, start + count)] if files
                                 else np.full(count, 0, np.int64), pa.int64()),
            "content_hash": pa.array([hashlib.blake2b(i.encode()).hexdigest()[:64] for i in ids]),
            "duration_s": pa.array(np.full(count, float(frames))),
            "width": pa.array(np.full(count, 320, np.uint32)),
            "height": pa.array(np.full(count, 240, np.uint32)),
            "fps": pa.array(np.full(count, 25.0)),
            "n_frames": pa.array(np.full(count, frames, np.uint32)),
            "embedding": embedding_array(unit_rows(rng, count, dim)),
        })
        tables["videos"].append(write_shard(index, f"videos/part-1-{part:05d}.parquet", videos))
        per_shard = max(1, frame_rows // max(frames, 1))
        for first in range(0, count, per_shard):
            chunk = ids[first:first + per_shard]
            frame_table = pa.table({
                "video_id": pa.array([v for v in chunk for _ in range(frames)]),
                "frame_index": pa.array(np.tile(np.arange(frames, dtype=np.uint32), len(chunk))),
                "pts_s": pa.array(np.tile(np.arange(frames, dtype=np.float64), len(chunk))),
                "embedding": embedding_array(unit_rows(rng, len(chunk) * frames, dim)),
            })
            tables["frames"].append(write_shard(index, f"frames/part-1-{frame_part:05d}.parquet", frame_table))
            frame_part += 1
    return tables
