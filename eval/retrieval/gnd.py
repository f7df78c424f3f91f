"""Ground truth for retrieval: the revisited Oxford/Paris gnd files (read without running code), and the
file-name rule that pairs edited copies with their originals.

A gnd file is a dict ``{"imlist": [gallery names], "qimlist": [query names], "gnd": [one entry per
query]}`` where an entry holds gallery indices, either ``{"easy", "hard", "junk"}`` (the revisitop
``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``) or ``{"ok", "junk"}`` (one positive set; junk optional).
Pickles are read by an unpickler that rebuilds only plain containers, numbers, strings and numpy arrays:
a pickle naming any other class or function is refused (a hostile one cannot run code). The same dict
as JSON (lists of integers) is accepted too.
"""

from __future__ import annotations

import importlib
import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dino_train.data.datasets import IMAGE_EXTENSIONS
from eval.retrieval.metrics import QueryTruth

# (module, name) pairs a gnd pickle may use: numpy's array and scalar rebuilders, which only allocate
# memory and copy bytes. numpy 2 moved numpy.core to numpy._core; pickles name either.
_NUMPY_GLOBALS = {"_reconstruct", "scalar", "_frombuffer", "ndarray", "dtype"}
_NUMPY_MODULES = {"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric"}
_NUMPY_MODULES |= {"numpy._core.numeric"}
SEPARATORS = "_-."  # a copy's name is its original's stem, then one of these, then anything


class GroundTruthError(ValueError):
    """A ground-truth file or layout that cannot be used; the message names the file and key."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _NUMPY_MODULES and name in _NUMPY_GLOBALS:
            target = module.replace("numpy.core.", "numpy._core.") if module != "numpy" else module
            try:
                return getattr(importlib.import_module(target), name)
            except (ImportError, AttributeError):
                return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}: gnd files hold only lists and arrays")


def read_gnd(path: str | Path) -> dict[str, Any]:
    """The gnd dict of ``path`` (.pkl/.pickle read safely, else JSON), checked: imlist and qimlist lists
    of names, gnd one entry per query with in-range integer indices (numpy int64 arrays)."""
    path = Path(path)
    if not path.is_file():
        raise GroundTruthError(f"ground-truth file {path} does not exist")
    try:
        if path.suffix.lower() in (".pkl", ".pickle"):
            with path.open("rb") as f:
                raw = _PlainUnpickler(f).load()
        else:
            raw = json.loads(path.read_text())
    except Exception as err:  # any decoding failure of a foreign file: unpickling, JSON, UTF-8, numpy
        raise GroundTruthError(f"{path} is not a readable gnd file: {err}") from err
    return _check_gnd(raw, path)


def _names(raw: dict, key: str, path: Path) -> list[str]:
    names = raw.get(key)
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise GroundTruthError(f"{path}: {key!r} must be a list of image names")
    return list(names)


def _check_gnd(raw: Any, path: Path) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise GroundTruthError(f"{path} holds a {type(raw).__name__}, not a dict with imlist/qimlist/gnd")
    imlist, qimlist = _names(raw, "imlist", path), _names(raw, "qimlist", path)
    entries = raw.get("gnd")
    if not isinstance(entries, list | tuple) or len(entries) != len(qimlist):
        raise GroundTruthError(f"{path}: 'gnd' must be a list with one entry per query ({len(qimlist)})")
    gnd = [_check_entry(e, i, len(imlist), path) for i, e in enumerate(entries)]
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def _check_entry(entry: Any, i: int, n: int, path: Path) -> dict[str, np.ndarray]:
    if not isinstance(entry, dict) or not ({"easy", "hard"} <= set(entry) or "ok" in entry):
        raise GroundTruthError(f"{path}: gnd[{i}] needs keys easy/hard/junk (revisited) or ok/junk")
    out: dict[str, np.ndarray] = {}
    for key in ("easy", "hard", "junk", "ok"):
        if key not in entry:
            continue
        try:
            idx = np.asarray(entry[key], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise GroundTruthError(f"{path}: gnd[{i}][{key!r}] is not a list of indices") from err
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise GroundTruthError(f"{path}: gnd[{i}][{key!r}] has an index outside the {n} gallery images")
        out[key] = idx
    return out


def is_revisited(gnd: Sequence[dict[str, np.ndarray]]) -> bool:
    """True for easy/hard/junk entries (evaluated under the easy, medium and hard protocols)."""
    return all("easy" in g and "hard" in g for g in gnd)


def plain_truths(gnd: Sequence[dict[str, np.ndarray]]) -> list[QueryTruth]:
    """Truths of {ok, junk} entries."""
    return [QueryTruth(g["ok"], g.get("junk", np.zeros(0, dtype=np.int64))) for g in gnd]


def list_images(root: str | Path, what: str) -> list[Path]:
    """Every image under ``root`` (sub-folders included), sorted; ``what`` names the flag in errors."""
    root = Path(root)
    if not root.is_dir():
        raise GroundTruthError(f"{what} {root} is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if not files:
        raise GroundTruthError(f"{what} {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def find_named(root: str | Path, names: Sequence[str], what: str) -> list[Path]:
    """The image files of a gnd list: ``root/<name>`` with its extension, or with any image extension
    added (``.jpg`` first); revisitop's ``<root>/jpg/`` folder is looked in too."""
    root = Path(root)
    folders = [root, root / "jpg"]
    found: list[Path] = []
    for name in names:
        candidates = [f / name for f in folders]
        candidates += [f / f"{name}{ext}" for f in folders for ext in IMAGE_EXTENSIONS]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise GroundTruthError(
                f"{what}: image {name!r} of the gnd file is not in {root} (nor {root}/jpg)"
            )
        found.append(hit)
    return found


def name_truths(
    queries: Sequence[Path], gallery: Sequence[Path], prefix: int | None = None
) -> list[QueryTruth]:
    """Which gallery images each query is a copy of, from file names.

    Default rule: a query's positives are the gallery images whose stem is the query's stem, or a start of
    it followed by one of ``_-.`` (``00042.png`` is the original of ``00042.png``, ``00042_crop.jpg`` and
    ``00042-jpeg30.jpg``, not of ``000421.png``). With ``prefix`` N: the first N characters of the stems
    agree (Copydays' "strong" block names copies this way, N = 4)."""
    by_key: dict[str, list[int]] = {}
    for i, g in enumerate(gallery):
        by_key.setdefault(g.stem[:prefix] if prefix else g.stem, []).append(i)
    truths = []
    for q in queries:
        stem = q.stem
        if prefix:
            keys = {stem[:prefix]}
        else:
            keys = {stem} | {stem[:i] for i, c in enumerate(stem) if c in SEPARATORS and i > 0}
        hits = sorted(i for k in keys for i in by_key.get(k, []))
        truths.append(QueryTruth(np.asarray(hits, dtype=np.int64)))
    return truths


def blocks_of(files: Sequence[Path], root: str | Path) -> list[str]:
    """Each file's block: its folder relative to ``root`` (``"."`` for files directly in it), e.g.
    ``strong`` or ``jpegqual/30`` for the Copydays layout."""
    return [str(p.parent.relative_to(root)) for p in files]
