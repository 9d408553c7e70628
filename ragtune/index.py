"""Dense passage index: build from embeddings, search top-k, look up stored embeddings.

Backends (`index.backend`): `exact` is a torch matmul + topk (faster than faiss flat at every
size on a 2-core CPU, and exact); `faiss_flat` / `faiss_hnsw` / `faiss_ivf` are faiss indexes;
`auto` (the default) is `exact` below `index.auto_min_passages` passages and on a GPU, and above
it on CPU an IVF index (`auto_backend`) with about sqrt(N) lists, `auto_nprobe` probed: at 1M
passages exact search scans the whole index for every batch, which is most of a training step.

Every approximate index is checked against exact search when it is built (`prepare`): the
top-`recall_k` rows of `recall_queries` passage embeddings drawn with a fixed seed (real
embeddings, the passages' own: a passage is its own nearest neighbour, so read recall@k as "of
the k - 1 neighbours after itself, plus itself"), searched both ways; the result is `info`
(printed, and written to result.json's `index` by the run). The check is a diagnostic and is
not charged to the ledger (like the gradient-variance diagnostic).

GPU: queries on a CUDA device are searched there when the index fits: exact search copies the
embeddings to the device once per build, in `index.device_dtype` (float32, or float16/bfloat16 for
half the memory: scores in that dtype, so the top-k may differ from float32's at near ties), if that
copy needs at most `index.gpu_memory_fraction` of the GPU's free memory; otherwise the index is
searched on CPU (as planned for CPU queries: `auto` may pick IVF there), with a warning. `lookup`
gathers rows on the GPU from a float32 copy, else on CPU and moves only those rows: the scores that
carry gradient always see float32 embeddings.

faiss-gpu is used only when `faiss.get_num_gpus() > 0` (the GPU wheel imports on machines without
a GPU and then silently returns empty indexes), the GPU's compute capability is one the installed
wheel was built for (`_WHEEL_ARCHS`) and a probe search on the GPU returns what faiss on CPU
returns; otherwise search falls back to exact torch search on the GPU, with a warning that says
why. Which wheel: `faiss-gpu` (faiss's own wheel, 1.14.3+; setup.cfg's `gpu` extra) has code for
compute capability 7.0-9.0 (Volta to Hopper, H100/H200 included); the community `faiss-gpu-cu12`
stops at 8.9 from 1.9 on, so on an H100/H200 it is not used; `faiss-gpu-cuvs` (the `gpu-cuvs`
extra, CUDA 13) is left to the probe. `auto` searches exactly on a GPU: one (B, N) matmul per batch
there (1M x 384 float32 is 1.5 GB of GPU memory; not measured here).

The float32 embeddings (N, H) are also kept on CPU in every case: strategies score arbitrary
candidate rows against them, and `state_dict()` saves them, or with a store
(`ragtune.index_store`) a reference to the store's one copy, keyed by the passage-encoder state
that built them (`key`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Tuple

import torch

from ragtune.index_store import IndexRef, IndexStore, MissingIndexEntry, digest_of
from ragtune.ledger import clock
from ragtune.precision import DTYPES, fp32

APPROXIMATE = ("faiss_ivf", "faiss_hnsw")


@dataclass(frozen=True)
class SearchPlan:
    """How an index of `n` passages is searched on a device: the backend actually used (never
    `auto`), where (`torch` on `device`, `faiss-cpu`, `faiss-gpu`), its parameters (the ones
    `ragtune.flops.search_flops` charges) and why."""

    backend: str  # exact | faiss_flat | faiss_ivf | faiss_hnsw
    where: str  # torch | faiss-cpu | faiss-gpu
    device: str  # cpu | cuda
    ivf_nlist: int = 0
    ivf_nprobe: int = 0
    hnsw_m: int = 0
    reason: str = ""

    @property
    def approximate(self) -> bool:
        return self.backend in APPROXIMATE


def auto_nlist(n: int) -> int:
    """IVF lists for `auto`: the power of two nearest sqrt(N) (1M passages: 1024 lists of ~1k)."""
    return max(1, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))


# compute capabilities (major, minor) each faiss GPU wheel on PyPI was built for; a cubin runs on
# a GPU of the same major version and an equal or higher minor one. None: unknown, the probe decides
_WHEEL_ARCHS = {
    "faiss-gpu-cu11": ((7, 0), (7, 5), (8, 0), (8, 6), (8, 9)),  # Volta..Ada (1.9+; 1.8: 6.0..9.0)
    "faiss-gpu-cu12": ((7, 0), (7, 5), (8, 0), (8, 6), (8, 9)),
    "faiss-gpu": ((7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0)),  # faiss's own wheel (1.14.3+)
}


def _wheel() -> Tuple[str, str]:
    """(distribution, version) that installed the `faiss` module ("", "") when unknown."""
    from importlib import metadata

    found = [((d.metadata["Name"] or "").lower(), d.version) for d in metadata.distributions()]
    found = [f for f in found if f[0].startswith("faiss")]
    gpu = [f for f in found if "gpu" in f[0]]  # faiss-cpu left beside a GPU wheel: the GPU one is asked about
    return (gpu or found or [("", "")])[0]


def _arch_supported(dist: str, version: str, cap: Tuple[int, int]) -> Optional[bool]:
    archs = _WHEEL_ARCHS.get(dist)
    if archs and dist in ("faiss-gpu-cu11", "faiss-gpu-cu12") and tuple(map(int, version.split(".")[:2])) < (1, 9):
        archs = ((6, 0), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0))
    if archs is None:
        return None
    return any(a[0] == cap[0] and a[1] <= cap[1] for a in archs)


@functools.cache
def faiss_gpu_status() -> Tuple[bool, str]:
    """(usable, why): faiss-gpu sees a GPU, the wheel supports its architecture, a probe works."""
    try:
        import faiss
    except ImportError:
        return False, "faiss is not installed"
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        dist, _ = _wheel()
        why = f"installed: {dist or 'faiss'}; sm_90 needs faiss-gpu, not faiss-gpu-cu12"
        return False, f"faiss.get_num_gpus() == 0 ({why})"
    dist, version = _wheel()
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    if _arch_supported(dist, version, cap) is False:
        return False, f"{dist} {version} has no code for compute capability {cap[0]}.{cap[1]}"
    try:  # the probe: a GPU flat search must return what faiss on CPU returns
        import numpy as np

        x = np.random.default_rng(0).standard_normal((64, 8)).astype("float32")
        cpu = faiss.IndexFlatIP(8)
        cpu.add(x)
        gpu = faiss.index_cpu_to_all_gpus(cpu)
        if not np.array_equal(gpu.search(x[:4], 4)[1], cpu.search(x[:4], 4)[1]):
            return False, f"a probe search on the GPU with {dist or 'faiss'} returned wrong rows"
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        return False, f"a probe search on the GPU failed ({type(e).__name__}: {str(e)[:120]})"
    return True, f"{dist or 'faiss'} {version} on compute capability {cap[0]}.{cap[1]}"


def device_bytes(cfg, n: int, dim: int) -> int:
    """Bytes of the (N, H) search copy on the GPU (`index.device_dtype`)."""
    return n * dim * torch.empty((), dtype=DTYPES[cfg.device_dtype]).element_size()


def plan_search(
    cfg,
    n: int,
    device_type: str,
    gpu_status: Callable[[], Tuple[bool, str]] = None,
    dim: int = 0,
    free_bytes: Optional[int] = None,
) -> SearchPlan:
    """The `SearchPlan` for `cfg.backend` over `n` passages of `dim` with queries on `device_type`.
    On a GPU with `free_bytes` free, an index whose search copy needs more than
    `index.gpu_memory_fraction` of it is searched on CPU instead (planned as for CPU queries), with
    a warning: the embeddings live where search runs, and a GPU has to hold the models too."""
    gpu_status = gpu_status or faiss_gpu_status
    if device_type == "cuda" and free_bytes is not None and dim:
        need = device_bytes(cfg, n, dim)
        if need > cfg.gpu_memory_fraction * free_bytes:
            why = (
                f"the index ({need / 2**30:.2f} GiB in {cfg.device_dtype}) exceeds index.gpu_memory_fraction="
                f"{cfg.gpu_memory_fraction} of the GPU's free {free_bytes / 2**30:.2f} GiB"
            )
            warnings.warn(f"{why}: searched on CPU (index.device_dtype=float16 halves it)", stacklevel=3)
            plan = plan_search(cfg, n, "cpu", gpu_status)
            return dataclasses.replace(plan, reason=f"{why}; on CPU: {plan.reason}")
    backend, reason = cfg.backend, "index.backend"
    on_gpu = device_type == "cuda"
    if backend == "auto":
        if on_gpu:
            backend, reason = "exact", "auto: exact search on the GPU"
        elif n >= cfg.auto_min_passages:
            backend, reason = cfg.auto_backend, f"auto: {n} passages >= index.auto_min_passages={cfg.auto_min_passages}"
            try:
                import faiss  # noqa: F401
            except ImportError:
                warnings.warn(
                    f"index.backend=auto: faiss is not installed; exact search over {n} passages", stacklevel=3
                )
                backend, reason = "exact", "auto: faiss not installed"
        else:
            backend, reason = "exact", f"auto: {n} passages < index.auto_min_passages={cfg.auto_min_passages}"
    where = "torch"
    if backend != "exact":
        where = "faiss-cpu"
        if on_gpu and cfg.use_gpu and backend != "faiss_hnsw":
            ok, why = gpu_status()
            if ok:
                where = "faiss-gpu"
            else:
                warnings.warn(
                    f"index.backend={backend}: faiss-gpu not used ({why}); exact torch search on the GPU", stacklevel=3
                )
                backend, where, reason = "exact", "torch", f"faiss-gpu unusable: {why}"
    params = {}
    if backend == "faiss_ivf":
        auto = cfg.backend == "auto"
        nlist = auto_nlist(n) if auto else cfg.ivf_nlist
        nlist = min(nlist, max(1, n // 39))  # faiss wants >= 39 training points per list
        params = {"ivf_nlist": nlist, "ivf_nprobe": min(cfg.auto_nprobe if auto else cfg.ivf_nprobe, nlist)}
    elif backend == "faiss_hnsw":
        params = {"hnsw_m": cfg.hnsw_m}
    return SearchPlan(backend, where, "cuda" if on_gpu else "cpu", reason=reason, **params)


class DenseIndex:
    def __init__(self, cfg, store: Optional[IndexStore] = None):
        self.cfg = cfg
        self.store = store  # None: state_dict() holds the embeddings themselves
        self.emb: Optional[torch.Tensor] = None  # (N, H), float32, CPU
        self.version = 0  # bumped on every (re)build
        self.key: Optional[str] = None  # the passage-encoder state that built emb (index_cache.index_key)
        self.batch_size: Optional[int] = None  # the embedding batch size that key was computed with
        self.digest: Optional[str] = None  # sha256 of emb, computed when first needed
        self.plan: Optional[SearchPlan] = None
        self.info: dict = {}  # the plan, build seconds and, for an approximate index, its recall vs exact
        # called with an IndexRef whose store entry is missing; returns True if it rebuilt the index
        self.on_missing: Optional[Callable[[dict], bool]] = None
        self._faiss = None
        self._emb_dev: Optional[torch.Tensor] = None  # emb on the search device (GPU exact search)
        self._planned_for: Optional[str] = None  # the query device type `plan` was made for
        self._pins: dict = {}  # referrer path -> key it was last given

    def build(self, emb: torch.Tensor, key: Optional[str] = None, batch_size: Optional[int] = None) -> None:
        """New embeddings (N, H); `key` names the passage-encoder state that produced them. The
        search structure is made by `prepare` (or the first search, on the queries' device)."""
        self.emb = emb.detach().float().cpu().contiguous()
        self.version += 1
        self.key, self.batch_size, self.digest = key, batch_size, None
        self.plan, self.info, self._faiss, self._emb_dev, self._planned_for = None, {}, None, None, None

    def __len__(self) -> int:
        return 0 if self.emb is None else self.emb.shape[0]

    # ---- search ----------------------------------------------------------------------------
    def prepare(self, device=None) -> SearchPlan:
        """Make the search structure for queries on `device` (default: CUDA when available, where
        the trainer puts the pipeline) and, for an approximate one, measure its recall."""
        if self.emb is None:
            raise RuntimeError("index searched before it was built")
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.plan is not None and self._planned_for == device.type:
            return self.plan
        t0 = clock()
        free = None
        if device.type == "cuda":  # the driver's free memory + what torch holds cached but unused
            free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
            free -= torch.cuda.memory_allocated(device)
            if self._emb_dev is not None:  # the copy this one replaces (still referenced)
                free += self._emb_dev.numel() * self._emb_dev.element_size()
        plan = plan_search(self.cfg, len(self), device.type, dim=self.emb.shape[1], free_bytes=free)
        self._faiss = self._build_faiss(plan) if plan.where != "torch" else None
        self._emb_dev = None
        if plan.where == "torch" and plan.device == "cuda":  # exact search on the GPU: one copy, made once
            self._emb_dev = self.emb.to(device, DTYPES[self.cfg.device_dtype])
        self.plan, self._planned_for = plan, device.type
        self.info = {
            **asdict(plan),
            "backend_config": self.cfg.backend,
            "device_dtype": self.cfg.device_dtype if self._emb_dev is not None else "float32",
            "build_seconds": clock() - t0,
        }
        if plan.approximate and self.cfg.recall_queries > 0:
            self.info.update(self.measure_recall(self.cfg.recall_queries, self.cfg.recall_k))
            print(
                f"index: {plan.backend} ({plan.reason}; {plan.where}), recall@{self.info['recall_k']} vs exact "
                f"{self.info['recall']:.3f} on {self.info['recall_queries']} passage embeddings",
                flush=True,
            )
        return plan

    def search(self, q: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """q (B, H) -> inner products (B, k) and rows (B, k), best first. No gradient."""
        if self.emb is None:
            raise RuntimeError("index searched before it was built")
        if k > len(self):
            raise ValueError(f"k={k} is larger than the corpus ({len(self)} passages)")
        q = q.detach().float()
        plan = self.prepare(q.device)
        if plan.where == "torch":
            if self._emb_dev is not None and self._emb_dev.device != q.device:  # another GPU (a rank's)
                self._emb_dev = self.emb.to(q.device, self._emb_dev.dtype)
            emb = self._emb_dev if self._emb_dev is not None else self.emb  # on the GPU, or on CPU
            scores, rows = self._exact(q.to(emb.device), k, emb)
            return scores.to(q.device), rows.to(q.device)
        scores, rows = self._faiss.search(q.cpu().numpy(), k)
        if (rows < 0).any():  # faiss pads with -1 when the search reaches fewer than k passages
            raise RuntimeError(
                f"index.backend={plan.backend} found fewer than k={k} passages for some queries; "
                f"raise index.ivf_nprobe / index.auto_nprobe, use a smaller k or index.backend=exact"
            )
        return torch.from_numpy(scores).to(q.device), torch.from_numpy(rows).long().to(q.device)

    @staticmethod
    def _exact(q: torch.Tensor, k: int, emb: torch.Tensor, chunk: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
        """Brute force, `chunk` queries at a time so the (chunk, N) score matrix stays bounded; in
        the embeddings' dtype (float32, or `index.device_dtype` on the GPU), never lowered by an
        autocast region around the search (`ragtune.precision.fp32`)."""
        with fp32(q):
            q = q.to(emb.dtype)
            if q.shape[0] <= chunk:
                return (q @ emb.T).float().topk(k, dim=-1)  # (B, N) -> (B, k)
            parts = [(q[i : i + chunk] @ emb.T).float().topk(k, dim=-1) for i in range(0, q.shape[0], chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def measure_recall(self, n_queries: int, k: int) -> dict:
        """Recall@k of the current structure against exact search, on `n_queries` passage
        embeddings drawn with a fixed seed (the same rows for the same N)."""
        n = len(self)
        k = min(k, n)
        g = torch.Generator().manual_seed(0)
        rows = torch.randperm(n, generator=g)[: min(n_queries, n)]
        q = self.emb[rows].to(self._planned_for or "cpu")  # (S, H), where the plan's queries come from
        t0 = clock()
        want = self._exact(q.cpu(), k, self.emb)[1]  # (S, k)
        exact_s = clock() - t0
        t0 = clock()
        got = self.search(q, k)[1].cpu()  # (S, k)
        approx_s = clock() - t0
        hits = sum(len(set(a) & set(b)) for a, b in zip(got.tolist(), want.tolist()))
        return {
            "recall": hits / want.numel(),
            "recall_k": k,
            "recall_queries": int(rows.numel()),
            "recall_exact_seconds": exact_s,
            "recall_approx_seconds": approx_s,
        }

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (...) -> stored float32 embeddings (..., H) on rows' device: gathered from the GPU
        copy when it is float32 and there, else gathered on CPU and only those rows moved (never
        the whole matrix; a float16 search copy is not used for the scores that carry gradient)."""
        dev = self._emb_dev
        if dev is not None and dev.device == rows.device and dev.dtype == torch.float32:
            return dev[rows]
        return self.emb[rows.cpu()].to(rows.device)

    def _build_faiss(self, plan: SearchPlan):
        import faiss

        x = self.emb.numpy()
        n, dim = x.shape
        if plan.backend == "faiss_flat":
            index = faiss.IndexFlatIP(dim)
        elif plan.backend == "faiss_hnsw":
            index = faiss.IndexHNSWFlat(dim, plan.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:  # faiss_ivf
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, plan.ivf_nlist, faiss.METRIC_INNER_PRODUCT)
            # k-means on a sample of ivf_train_per_list points per list (faiss: 256): at 1M
            # passages x 1024 lists training on 262k points costs more than the whole search saves
            index.cp.max_points_per_centroid = self.cfg.ivf_train_per_list
            index.train(x)
            index.nprobe = plan.ivf_nprobe
        if plan.where == "faiss-gpu":
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(x)
        return index

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self, referrer=None) -> dict:
        """The index as saved in final.pt / checkpoints: the embeddings themselves without a store,
        else an `IndexRef` to the store's entry (written now if absent), pinned by `referrer`."""
        if self.store is None:
            return {"emb": self.emb, "version": self.version}
        if self.digest is None:
            self.digest = digest_of(self.emb)
        key = self.key or f"content-{self.digest[:24]}"  # built without an encoder state: by content
        self.digest = self.store.put(key, self.emb, self.digest)
        if referrer is not None:
            self.store.pin(key, referrer)
            self._pins[str(referrer)] = key
        n, dim = self.emb.shape
        return IndexRef(
            ref=key,
            digest=self.digest,
            version=self.version,
            n=n,
            dim=dim,
            batch_size=self.batch_size,
            store=str(self.store.root),
        )

    def release(self, referrer) -> None:
        """`referrer` has been rewritten: unpin (and delete, when nothing else needs them) the
        entries it referenced before, keeping the one the last `state_dict(referrer)` gave it."""
        if self.store is not None:
            self.store.release(referrer, keep=self._pins.get(str(referrer)))

    def load_state_dict(self, state: dict) -> None:
        if "ref" not in state:  # embeddings saved inline (index.store=inline, or older files)
            self.build(state["emb"])
            self.version = state["version"]
            return
        entry, missing = None, MissingIndexEntry(f"index {state['ref']}: no index store configured")
        for root in dict.fromkeys(r for r in (self.store and self.store.root, state.get("store")) if r):
            try:
                entry = IndexStore(root).get(state["ref"], state.get("digest"))
                break
            except MissingIndexEntry as e:
                missing = e
        if entry is None:
            rebuilt = self.on_missing is not None and self.on_missing(state)
            if not rebuilt or self.key != state["ref"]:
                raise MissingIndexEntry(
                    f"{missing}; it was built by a passage tower whose weights are not loaded here, so it "
                    "cannot be rebuilt: restore the store (index.store) or start the run over"
                )
            if state.get("digest") and digest_of(self.emb) != state["digest"]:
                warnings.warn(
                    f"index {state['ref']} rebuilt, but not bit-identical to the one referenced", stacklevel=2
                )
        else:
            self.build(entry["emb"], state["ref"], state.get("batch_size"))
            self.digest = entry["digest"]
        self.version = state["version"]
