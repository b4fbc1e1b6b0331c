"""What an inverted-file index would trade for speed above a million videos (docs/search-at-scale.md):
faiss's `IndexIVFFlat` over the videos of the index `search_vs_faiss.py` fabricated, the same
queries, recall@k against the exact top k (`IndexFlatIP`) and the median time per query (one query
per call, 2 threads) for several `nprobe`, with the training time. Random unit vectors have no
cluster structure, so they are the worst case for an inverted file; CLIP's embeddings cluster, so
`--clustered C` also measures vectors drawn around C random centres (each a centre plus noise of
the same norm, so a video's cosine with its centre is about 0.7 and with another's about 0).
"""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from search_vs_faiss import make_queries, timed_faiss, video_matrix  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", default="benchmarks/work/search/engine-1000000x3")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--clustered", type=int, default=0, help="centres of a clustered set instead")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    faiss.omp_set_num_threads(2)
    _, matrix = video_matrix(Path(args.index))
    if args.clustered:
        rng = np.random.default_rng(5)
        centres = rng.standard_normal((args.clustered, matrix.shape[1]), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        matrix = centres[rng.integers(0, args.clustered, len(matrix))] + matrix
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    queries = make_queries(matrix, args.queries)
    flat = faiss.IndexFlatIP(matrix.shape[1])
    flat.add(matrix)
    _, exact = flat.search(queries, args.k)
    del flat
    quantizer = faiss.IndexFlatIP(matrix.shape[1])
    ivf = faiss.IndexIVFFlat(quantizer, matrix.shape[1], args.nlist, faiss.METRIC_INNER_PRODUCT)
    sample = matrix[np.random.default_rng(4).choice(len(matrix), min(len(matrix), 64 * args.nlist), replace=False)]
    start = time.perf_counter()
    ivf.train(sample)
    ivf.add(matrix)
    figures = {"videos": len(matrix), "nlist": args.nlist, "clustered_centres": args.clustered, "faiss": faiss.__version__,
               "train_and_add_s": time.perf_counter() - start, "nprobe": {}}
    for nprobe in [1, 8, 32, 128]:
        ivf.nprobe = nprobe
        timing, found = timed_faiss(ivf, queries, args.k)
        hits = sum(len(set(rows.tolist()) & set(want.tolist())) for (_, rows), want in zip(found, exact))
        figures["nprobe"][nprobe] = dict(timing, recall=hits / (args.k * len(queries)))
        print(nprobe, figures["nprobe"][nprobe], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
