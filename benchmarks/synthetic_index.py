"""Helpers for the benchmarks that write a vtr-index index directly with pyarrow: shards in the
project's Parquet schema (embeddings as FixedSizeList<Float32, D>) and the manifest that lists them."""

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def embedding_array(matrix):
    """An (n, D) float32 matrix as the index's embedding column."""
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), matrix.shape[1])


def write_shard(index, rel, table):
    """Writes one shard and returns its manifest entry."""
    path = index / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="snappy")
    data = path.read_bytes()
    return {"path": rel, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def manifest(dim, roots, tables, max_frames=12, logit_scale=4.605170249938965):
    """A manifest for a synthetic model of width `dim` that is never loaded."""
    return {
        "format_version": 1,
        "model": {"id": "synthetic", "source": "/nonexistent/synthetic-model", "sha256": "0" * 64,
                  "embed_dim": dim, "image_size": 224, "logit_scale": logit_scale},
        "sampling": {"fps": 1.0, "max_frames": max_frames},
        "preprocess": {"resize": "bicubic-antialias", "shortest_edge": 224, "crop": 224,
                       "mean": CLIP_MEAN, "std": CLIP_STD},
        "roots": roots,
        "tables": tables,
    }
