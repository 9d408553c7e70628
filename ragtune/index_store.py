"""A content-addressed store of index embeddings: each passage-encoder state's index is saved once.

What: `<root>/<key>.pt` holds the (N, H) float32 embeddings of one index, its `key` (a hash of
everything the embeddings depend on: the passage tower's weights, the tokenizer, the passage
texts and the encoding settings, `ragtune.index_cache.index_key`) and `digest` (a SHA-256 of the
embedding bytes). `final.pt` and checkpoints hold an `IndexRef` (key, digest, version, shape)
instead of the embeddings; loading one verifies that the entry's key and digest are the ones
referenced. `root` defaults to `<data.cache_dir>/index` (`index.store`), where the initial-index
cache (`ragtune.index_cache`) keeps its entries too, so every run of an experiment that never
trains the passage tower, and all its checkpoints, share one file.

Why: the index is the largest object of a run at scale (1M passages x 384 floats = 1.5 GB);
it used to be copied into every final.pt and, once rebuilt, into every checkpoint.

Lifetime: a file that references an entry pins it (`pin`: `<root>/refs/<key>/<id>` names the
referrer); `release(referrer, keep)` unpins the referrer's other keys once it has been rewritten,
and an unpinned entry is deleted unless it is a cache entry (one stored with the build's ledger
charges, kept for future runs). `gc()` also drops pins whose referrer file is gone or no longer
references the key, so deleting a run directory frees its entries at the next `gc`
(`python -m ragtune.index_store gc ROOT`). Writers take an flock on `<root>/.lock`.

A missing or unreadable entry raises `MissingIndexEntry` (`DenseIndex` then asks the pipeline to
rebuild it, which it can only do when the current passage tower is the one that built it).
"""

from __future__ import annotations

import hashlib
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from ragtune import fileio

FORMAT = 1


class MissingIndexEntry(RuntimeError):
    """A referenced index entry is not in the store (or is unreadable, or is not the one referenced)."""


def digest_of(emb: torch.Tensor) -> str:
    """SHA-256 of the embedding bytes (float32, row-major) and the shape."""
    t = emb.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}".encode())
    h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


class IndexRef(dict):
    """What final.pt and checkpoints hold instead of the embeddings: {"ref": key, "digest",
    "version", "n", "dim", "batch_size", "store"}. `ref["emb"]` still works: it loads the
    embeddings from the store (verified), so code that read `final["index"]["emb"]` keeps working."""

    __slots__ = ()

    def __missing__(self, name):
        if name != "emb":
            raise KeyError(name)
        return IndexStore(self["store"]).get(self["ref"], self.get("digest"))["emb"]


def _rid(referrer: Path) -> str:
    return hashlib.sha256(str(Path(referrer).resolve()).encode()).hexdigest()[:16]


class IndexStore:
    def __init__(self, root):
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        lock = fileio.DirLock(self.root, ".lock").acquire(wait=True)
        try:
            yield
        finally:
            lock.release()

    # ---- entries ---------------------------------------------------------------------------
    def put(self, key: str, emb: torch.Tensor, digest: Optional[str] = None, charges: Optional[dict] = None) -> str:
        """Store `emb` (N, H) under `key` unless a readable entry with that key exists; returns the
        digest. `charges` (the build's ledger state) marks a cache entry, kept when unpinned."""
        digest = digest or digest_of(emb)
        with self._locked():
            if self.has(key):
                try:
                    head = self._read(key)
                    if head.get("digest") == digest:
                        return digest
                except MissingIndexEntry:
                    pass  # torn or foreign: rewritten below
            entry = {"format": FORMAT, "key": key, "digest": digest, "emb": emb.detach().cpu().contiguous()}
            if charges is not None:
                entry["charges"] = charges
            fileio.save_torch(entry, self.path(key))
        return digest

    def _read(self, key: str) -> dict:
        path = self.path(key)
        if not path.exists():
            raise MissingIndexEntry(f"index entry {key} is not in {self.root}")
        try:
            entry = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # noqa: BLE001 - torn, truncated or not a torch file
            raise MissingIndexEntry(f"{path}: unreadable index entry ({type(e).__name__})") from e
        if not isinstance(entry, dict) or "emb" not in entry:
            raise MissingIndexEntry(f"{path}: not an index entry")
        return entry

    def get(self, key: str, digest: Optional[str] = None) -> dict:
        """The entry of `key` ({"emb", "digest", "charges"?}), verified: its recorded key must be
        `key` and its embeddings must hash to its digest (and to `digest` when given)."""
        entry = self._read(key)
        path = self.path(key)
        if entry.get("key", key) != key:
            raise MissingIndexEntry(f"{path}: holds index {entry.get('key')}, not {key}")
        actual = digest_of(entry["emb"])
        if "digest" in entry and entry["digest"] != actual:
            raise MissingIndexEntry(f"{path}: embeddings do not match their digest (corrupt file)")
        if digest is not None and actual != digest:
            raise MissingIndexEntry(f"{path}: embeddings differ from the ones referenced (digest {digest[:12]}...)")
        entry["emb"] = entry["emb"].clone()  # off the memory map: the file may be replaced or deleted later
        entry["digest"] = actual
        return entry

    # ---- references ------------------------------------------------------------------------
    def pin(self, key: str, referrer) -> None:
        """Record that the file `referrer` references entry `key`."""
        with self._locked():
            folder = self.root / "refs" / key
            folder.mkdir(parents=True, exist_ok=True)
            fileio.write_text(folder / _rid(referrer), str(Path(referrer).resolve()))

    def pins(self, key: str) -> List[Path]:
        folder = self.root / "refs" / key
        return [Path(p.read_text()) for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []

    def release(self, referrer, keep: Optional[str] = None) -> List[str]:
        """`referrer` now references `keep` only (or nothing): drop its other pins and delete the
        entries left unpinned (cache entries excepted). Returns the deleted keys."""
        rid, deleted = _rid(referrer), []
        with self._locked():
            refs = self.root / "refs"
            for folder in sorted(refs.iterdir()) if refs.is_dir() else []:
                if folder.name == keep or not (folder / rid).exists():
                    continue
                (folder / rid).unlink()
                if self._drop_if_unpinned(folder.name):
                    deleted.append(folder.name)
        return deleted

    def _drop_if_unpinned(self, key: str) -> bool:
        folder = self.root / "refs" / key
        if folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir()):
            return False
        if folder.is_dir():
            folder.rmdir()
        path = self.path(key)
        if not path.exists():
            return False
        try:
            if "charges" in self._read(key):
                return False  # a cache entry: future runs start from it
        except MissingIndexEntry:
            pass  # unreadable: nothing worth keeping
        path.unlink()
        return True

    def gc(self) -> List[str]:
        """Drop stale pins (referrer gone, or no longer referencing the key), then every unpinned
        non-cache entry. Returns the deleted keys."""
        deleted = []
        with self._locked():
            refs = self.root / "refs"
            for folder in sorted(refs.iterdir()) if refs.is_dir() else []:
                for pin in list(folder.iterdir()):
                    if not _still_references(Path(pin.read_text()), folder.name):
                        pin.unlink()
                if not any(folder.iterdir()):
                    folder.rmdir()
            for path in sorted(self.root.glob("*.pt")):
                if self._drop_if_unpinned(path.stem):
                    deleted.append(path.stem)
        return deleted

    def sizes(self) -> Dict[str, int]:
        """{key: bytes} of the stored entries."""
        return {p.stem: p.stat().st_size for p in sorted(self.root.glob("*.pt"))}


def _still_references(referrer: Path, key: str) -> bool:
    if not referrer.exists():
        return False
    try:
        obj = torch.load(referrer, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - a torn referrer is being rewritten: keep the pin
        return True
    index = obj.get("index") if isinstance(obj, dict) else None
    return isinstance(index, dict) and index.get("ref") == key


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "gc":
        print("usage: python -m ragtune.index_store gc ROOT", file=sys.stderr)
        return 2
    store = IndexStore(argv[1])
    before = sum(store.sizes().values())
    deleted = store.gc()
    freed = before - sum(store.sizes().values())
    print(f"{store.root}: deleted {len(deleted)} unreferenced entries, {freed / 2**20:.1f} MiB freed")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
