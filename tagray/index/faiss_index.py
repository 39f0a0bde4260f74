"""faiss vector indexes of a shard (seed 004 §2: f·q search; search by example for every head).

Inner product throughout (METRIC_INNER_PRODUCT). A factory string is faiss's `index_factory`
description: "flat" (exact, the default), "IVF1024,PQ16", "HNSW32", … An index that needs
training (IVF, PQ) is trained ONCE on a seeded sample of the corpus and every shard adds its
vectors to a copy of that trained index, so scores stay comparable across shards. GPU faiss
(`StandardGpuResources`, `index_cpu_to_gpu`) trains and adds when asked for and available;
the shard file always holds the CPU index.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np

from tagray.config import ConfigError

log = logging.getLogger(__name__)


def factory_string(factory: str) -> str:
    return "Flat" if factory.strip().lower() in ("flat", "exact") else factory.strip()


def empty_index(factory: str, dim: int):
    """An untrained faiss index for `factory`; ConfigError naming the string when faiss refuses it."""
    import faiss

    try:
        return faiss.index_factory(int(dim), factory_string(factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1][:200]
        raise ConfigError(f"--factory {factory!r}: not a faiss index_factory string for d={dim} ({first}); "
                          "use flat, IVF<lists>,PQ<m> or HNSW<M>") from None


def needs_training(factory: str, dim: int) -> bool:
    return not empty_index(factory, dim).is_trained


def gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def _on_device(index, gpu: bool):
    """(index to train/add on, whether it is on a GPU): a GPU copy when asked for and possible."""
    import faiss

    if not gpu:
        return index, False
    if not gpu_available():
        log.info("faiss: no GPU support in this faiss build (or no GPU visible); building on CPU")
        return index, False
    try:
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, 0, index), True
    except RuntimeError as e:  # an index type faiss cannot put on a GPU (e.g. HNSW)
        log.info("faiss: %s cannot run on the GPU (%s); building on CPU", type(index).__name__, str(e)[:120])
        return index, False


def _to_cpu(index, on_gpu: bool):
    import faiss

    return faiss.index_gpu_to_cpu(index) if on_gpu else index


def train(factory: str, sample: np.ndarray, gpu: bool = False) -> bytes:
    """The trained, empty index for `factory`, serialised (what every shard starts from)."""
    import faiss

    index = empty_index(factory, sample.shape[1])
    if not index.is_trained:
        dev, on_gpu = _on_device(index, gpu)
        try:
            dev.train(np.ascontiguousarray(sample, np.float32))
        except RuntimeError as e:
            raise ConfigError(f"--factory {factory!r}: training on {len(sample)} sample vectors failed "
                              f"({str(e).strip().splitlines()[-1][:200]}); raise --train-sample or use fewer "
                              "lists/centroids") from None
        index = _to_cpu(dev, on_gpu)
    return faiss.serialize_index(index).tobytes()


class Filling:
    """A shard's vector index being filled chunk by chunk in row order (faiss id = local row):
    a copy of the trained index (or a fresh flat/HNSW one), on the GPU when asked for and possible."""

    def __init__(self, trained: bytes | None, factory: str, dim: int, gpu: bool = False) -> None:
        import faiss

        if trained is not None:
            index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
        else:
            index = empty_index(factory, dim)
            if not index.is_trained:
                raise ConfigError(f"--factory {factory!r} needs training; no trained index was given")
        self.index, self.on_gpu = _on_device(index, gpu)

    def add(self, vectors: np.ndarray) -> None:
        if len(vectors):
            self.index.add(np.ascontiguousarray(vectors, np.float32))

    def finish(self):
        return _to_cpu(self.index, self.on_gpu)


def serialise(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialise(blob: bytes, nprobe: int = 16, ef_search: int = 64):
    """A stored index, with its search-time knobs set (IVF nprobe, HNSW efSearch)."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(blob, np.uint8))
    with contextlib.suppress(RuntimeError):
        faiss.extract_index_ivf(index).nprobe = nprobe
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = max(ef_search, hnsw.efSearch)
    return index


def reconstruct_all(index) -> np.ndarray:
    """Every stored vector in row order (exact for flat and HNSW, decoded codes for PQ)."""
    import faiss

    with contextlib.suppress(RuntimeError):
        faiss.extract_index_ivf(index).make_direct_map()
    return index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)


def reconstruct(index, row: int) -> np.ndarray:
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
        if ivf.direct_map.type == 0:
            ivf.make_direct_map()
    except RuntimeError:
        pass
    return index.reconstruct(int(row))


def search(index, query: np.ndarray, n: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, local rows) of the n best rows for `query` among `allowed` (a bool mask, None = all),
    the filter applied inside the search (an IDSelectorBitmap), so the top n are of the allowed rows."""
    import faiss

    n = min(n, index.ntotal)
    if n <= 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    q = np.ascontiguousarray(query, np.float32).reshape(1, -1)
    if allowed is None:
        scores, rows = index.search(q, n)
    else:
        bits = np.packbits(allowed.astype(bool), bitorder="little")
        sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
        inner = faiss.downcast_index(index)
        if hasattr(inner, "hnsw"):
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=inner.hnsw.efSearch)
        else:
            try:
                ivf = faiss.extract_index_ivf(index)
                params = faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe)
            except RuntimeError:
                params = faiss.SearchParameters(sel=sel)
        scores, rows = index.search(q, n, params=params)
        del bits
    keep = rows[0] >= 0
    return scores[0][keep], rows[0][keep].astype(np.int64)
