"""A disk cache of rewritten models, so a model is rewritten once, not on every run.

An entry is keyed by the SHA-256 of the model file's bytes, the layer and score asked for, and
the onnxcam and onnx versions (a new version may rewrite differently). It holds the rewritten
``.onnx`` and a ``.json`` with the GradientModel fields and the SHA-256 of that ``.onnx``. Both are
written atomically, the JSON last, so a JSON on disk means a complete entry; an entry that fails
to read, parse or match its checksum is rebuilt, and a cache that cannot be written is skipped:
the cache never makes a run fail.

Location: ``$ONNXCAM_CACHE_DIR``, else ``~/.cache/onnxcam`` (``$XDG_CACHE_HOME/onnxcam`` when
set). Delete the folder to empty it. For a model with external data files, the key also holds
each data file's real path, size and modification time (its weights are not in the hashed file);
the entry is the rewritten graph, whose large weights stay in those files.

A model whose weights are in its own file and add up to more than ``SPILL_BYTES`` has them
written once to ``<model sha256>.weights`` (``external.spill``), before the rewrite: the rewritten
graphs of all its layers refer to them there, and ONNX Runtime maps that file, so the sessions of
an explanation share one copy of the weights instead of each holding its own. A weights file
goes when no entry refers to it any more, it has not been used for ``LEFTOVER_AGE_S``, and no
rewritten model in memory, in any process, refers to it (``file_hold``: an explainer may make a
new session from it at any time).

A model file of at least ``REMEMBER_BYTES`` has its SHA-256 remembered in ``<stat key>.sha256``,
keyed by its real path, device, inode, size and modification and change times, so the next run
need not read and hash it again (VGG-16: 1.4 s of a second run's 8 s). Any write to the file
changes that stat; a file written in the last ``SETTLED_S`` is not remembered, as a later write in
the same timestamp tick could leave the stat as it was. A remembered hash unused for
``DIGEST_AGE_S`` goes at the next prune.

Size: ``$ONNXCAM_CACHE_SIZE`` (default 2G; ``0`` turns the cache off). Each entry is a whole copy
of a model, so a new onnxcam version, layer or model adds one; after each write the least
recently used entries (a hit counts as a use) are deleted until the folder fits. An entry
larger than the whole budget is not written. Leftovers of interrupted writes older than an
hour are deleted too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxcam.atomic import atomic_write_bytes
from onnxcam.errors import OptionError
from onnxcam.graph import external
from onnxcam.graph.locate import Candidate
from onnxcam.graph.rewrite import GradientModel, build_gradient_model
from onnxcam.runtime.file_hold import hold, remove_unless_held

log = logging.getLogger("onnxcam.cache")

FORMAT = 4  # bump when the entry layout changes
#: Weights in a model's own file above which they go to a shared weights file (see the top)
SPILL_BYTES = 64 << 20

#: Model files this large or larger have their SHA-256 remembered (see the top)
REMEMBER_BYTES = 16 << 20
#: ... unless modified less than this before they were hashed
SETTLED_S = 2.0
#: A remembered SHA-256 unused this long is deleted at the next prune
DIGEST_AGE_S = 7 * 86400

#: The cache's size when ``ONNXCAM_CACHE_SIZE`` is not set.
DEFAULT_SIZE = "2G"
#: Files of an interrupted write (an .onnx without its .json, an atomic write's temporary file)
#: are deleted once older than this: younger ones may belong to a write in progress elsewhere.
LEFTOVER_AGE_S = 3600
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    configured = os.environ.get("ONNXCAM_CACHE_DIR", "").strip()
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "onnxcam"


def cache_budget() -> int:
    """The cache's size limit in bytes, from ``ONNXCAM_CACHE_SIZE`` ("500M", "2G", "1.5T"; binary
    units; "0": no cache)."""
    given = os.environ.get("ONNXCAM_CACHE_SIZE", "").strip() or DEFAULT_SIZE
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*(?:([KMGT])(?:I?B)?)?", given.upper())
    if match is None or (match.group(2) is None and float(match.group(1)) != 0):
        raise OptionError(f"ONNXCAM_CACHE_SIZE={given!r} must be a size such as 500M or 2G "
                          "(K, M, G, T: binary units), or 0 to turn the model cache off")
    return int(float(match.group(1)) * _UNITS[match.group(2)]) if match.group(2) else 0


@functools.lru_cache(maxsize=1)
def rewriter_fingerprint() -> str:
    """A hash of the rewriter's own source (graph preparation and gradient rules), so that a
    changed rule never serves a model rewritten by the old one, even within one version."""
    import onnxcam.gradients
    import onnxcam.graph

    digest = hashlib.sha256()
    for package in (onnxcam.graph, onnxcam.gradients):
        for path in sorted(Path(package.__file__).parent.glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(model_sha256: str, layer: str | None, score: str | None) -> str:
    from onnxcam import __version__

    text = json.dumps({"format": FORMAT, "model": model_sha256, "layer": layer, "score": score,
                       "onnxcam": __version__, "onnx": onnx.__version__,
                       "rewriter": rewriter_fingerprint()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def load_gradient_model(model: str | os.PathLike | onnx.ModelProto, layer: str | None = None,
                        score: str | None = None, use_cache: bool = True) -> tuple[GradientModel, bool]:
    """The rewritten model for (model, layer, score), from the cache when possible.

    Returns (gradient model, whether it came from the cache). Every error about the model itself
    comes from ``build_gradient_model`` (ModelError, LayerError...), cache or not.
    """
    budget = cache_budget() if use_cache else 0
    keys = _key_for(model, layer, score) if budget > 0 else None
    if keys is None:  # no cache: large weights go to a file of this process's own
        model, data_path, _ = _spilled(model, None, 0)
        if data_path is None:
            return build_gradient_model(model, layer=layer, score=score), False
        _private_users[data_path] = _private_users.get(data_path, 0) + 1
        try:
            built = build_gradient_model(model, layer=layer, score=score)
        except BaseException:
            _release_private(data_path)
            raise
        weakref.finalize(built, _release_private, data_path)
        return built, False
    key, model_sha = keys
    cached = _read(key)
    if cached is not None:
        return cached, True
    model, data_path, written = _spilled(model, model_sha, budget)
    handle = hold(data_path) if data_path is not None else None
    try:
        built = build_gradient_model(model, layer=layer, score=score)
    except BaseException:
        if handle is not None:
            handle.close()
        if written and not _referenced().get(data_path.stem):
            remove_unless_held(data_path)  # written for this build alone
        raise
    _keep_held(built, handle)
    _write(key, built, budget, data_path)
    return built, False


def _keep_held(gm: GradientModel, handle) -> None:
    """Keep the weights file open under ``handle`` for as long as ``gm`` lives: pruning, in any
    process, leaves it alone meanwhile."""
    if handle is not None:
        weakref.finalize(gm, handle.close)


def _spilled(model, model_sha: str | None, budget: int) -> tuple:
    """(the model, with its weights moved to the model's weights file when they are large enough
    and fit the cache; that file or None; whether this call wrote it). The file is written once
    per model and serves the entries of all its layers. Without a cache (``model_sha`` None) the
    file goes to a temporary folder of this process (``_release_private`` deletes it). Models with external
    data already, and any failure to write, keep the model as it is."""
    from onnxcam.graph.prepare import load_model

    if not isinstance(model, onnx.ModelProto) and (not Path(model).is_file()
                                                   or Path(model).stat().st_size <= SPILL_BYTES):
        return model, None, False
    proto = load_model(model)  # the model's own errors, with its path
    if external.has_external_data(proto):
        return proto, None, False
    size = external.spillable_bytes(proto)
    if size <= SPILL_BYTES or (model_sha is not None and size > budget // 2):
        return proto, None, False  # small, or an entry that would not leave room for others
    if isinstance(model, onnx.ModelProto):  # the caller's proto stays as it was
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    try:
        data_path = _weights_path(model_sha) if model_sha is not None else _private_weights_path(model)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        written = external.spill(proto, data_path)
    except OSError as exc:
        log.info("could not write the weights of model %s (%s)", model_sha[:12], exc)
        return proto, None, False
    return proto, data_path, written


def _key_for(model, layer, score) -> tuple[str, str] | None:
    """(the entry's key, the model's own SHA-256), or None when the model cannot be read."""
    try:
        if isinstance(model, onnx.ModelProto):
            proto, folder = model, external.folder_of(model)
            data = model.SerializeToString(deterministic=True)
        else:
            path = Path(model)
            if not path.is_file() or (stat := path.stat()).st_size == 0:
                return None  # let the builder say what is wrong with it
            remembered = _remembered_sha(path, stat)
            if remembered is not None:
                return cache_key(remembered, layer, score), remembered
            data = path.read_bytes()
            proto, folder = onnx.load_from_string(data), path.parent
        if external.has_external_data(proto):
            stamp = external.data_stamp(proto, folder)
            if stamp is None:
                return None  # let the builder say what is wrong with it
            data += stamp
    except Exception:  # noqa: BLE001 - unreadable, not ONNX (DecodeError), over 2 GB (EncodeError):
        return None    # the builder says what is wrong with it
    model_sha = hashlib.sha256(data).hexdigest()
    if not isinstance(model, onnx.ModelProto) and not external.has_external_data(proto):
        _remember_sha(path, stat, model_sha)
    return cache_key(model_sha, layer, score), model_sha


def _digest_path(path: Path, stat: os.stat_result) -> Path:
    """Where the SHA-256 of the model file ``path``, as ``stat`` found it, is remembered."""
    text = f"{path.resolve()}\0{stat.st_dev}\0{stat.st_ino}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}"
    key = hashlib.sha256(text.encode()).hexdigest()
    return cache_dir() / key[:2] / f"{key}.sha256"


def _remembered_sha(path: Path, stat: os.stat_result) -> str | None:
    if stat.st_size < REMEMBER_BYTES:
        return None
    digest = _digest_path(path, stat)
    try:
        text = digest.read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        return None
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        return None
    _mark_used(digest)
    return text


def _remember_sha(path: Path, stat: os.stat_result, model_sha: str) -> None:
    """Remember the SHA-256 of the bytes read, if the file is large, settled, and still as
    ``stat`` (taken before the read) found it."""
    try:
        after = path.stat()
        if (stat.st_size < REMEMBER_BYTES or time.time() - stat.st_mtime < SETTLED_S
                or (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino)
                != (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)):
            return
        digest = _digest_path(path, stat)
        digest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(digest, model_sha.encode("ascii"))
    except Exception as exc:  # noqa: BLE001 - a cache we cannot write is simply not used
        log.info("could not remember the SHA-256 of %s (%s)", path, exc)


def _paths(key: str) -> tuple[Path, Path]:
    folder = cache_dir() / key[:2]
    return folder / f"{key}.onnx", folder / f"{key}.json"


def _weights_path(model_sha: str) -> Path:
    return cache_dir() / model_sha[:2] / f"{model_sha}.weights"


_private_folder: list = []  # this process's temporary folder for weights, made when first needed


_private_users: dict = {}  # this process's weights files -> the rewritten models that refer to them


def _release_private(data_path: Path) -> None:
    """One rewritten model less refers to ``data_path``: delete it after the last, so a process
    that explains many large models without the cache holds only the weights of those in use."""
    _private_users[data_path] -= 1
    if not _private_users[data_path]:
        del _private_users[data_path]
        _remove(data_path)


def _private_weights_path(model) -> Path:
    """A weights file in a temporary folder that lives as long as this process: one per model
    file (its path, size and modification time), a new one for each ModelProto."""
    if not _private_folder:
        _private_folder.append(tempfile.TemporaryDirectory(prefix="onnxcam-weights-"))
    if isinstance(model, onnx.ModelProto):
        name = secrets.token_hex(8)
    else:
        stat = Path(model).stat()
        name = hashlib.sha256(f"{Path(model).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    return Path(_private_folder[0].name) / f"{name[:16]}.weights"


def _read(key: str) -> GradientModel | None:
    model_path, info_path = _paths(key)
    handle = None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        data = model_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != info["onnx_sha256"]:
            raise ValueError("checksum mismatch")
        model = onnx.load_from_string(data)
        if info.get("weights") is not None:  # the model's weights, in its weights file
            weights = _weights_path(info["weights"]["model"])
            handle = hold(weights)
            if handle is None:
                raise FileNotFoundError(weights)
            if os.fstat(handle.fileno()).st_size != info["weights"]["bytes"]:
                raise ValueError("weights file of the wrong size")
            external.set_folder(model, str(weights.parent))
            _mark_used(weights)
        _mark_used(info_path)
        gm = GradientModel(
            model=model,
            layer=info["layer"], score=info["score"], input_name=info["input_name"],
            input_shape=tuple(info["input_shape"]), activation_shape=tuple(info["activation_shape"]),
            seed_shape=tuple(info["seed_shape"]), num_classes=info["num_classes"],
            candidates=tuple(Candidate(c["tensor"], c["node"], c["op"], tuple(c["shape"]), c["layout"])
                             for c in info["candidates"]),
            path_is_linear=bool(info["path_is_linear"]), batch_built_in=info["batch_built_in"],
            layer_layout=info["layer_layout"],
            class_grid=tuple(info["class_grid"]) if info.get("class_grid") else None,
            class_axis=info.get("class_axis", 1))
    except Exception as exc:  # noqa: BLE001 - a missing or corrupt entry is rebuilt, never fatal
        if handle is not None:
            handle.close()
        if not isinstance(exc, FileNotFoundError):
            log.info("cache entry %s is unusable (%s); rebuilding it", key[:12], exc)
        return None
    _keep_held(gm, handle)
    return gm


def _write(key: str, gm: GradientModel, budget: int, weights: Path | None = None) -> None:
    """Write the entry; its model's weights file, if any, is already there (``_spilled``) and is
    left to pruning when the entry is not written: the model in memory still needs it."""
    model_path, info_path = _paths(key)
    try:
        data = gm.model.SerializeToString()
        spilled = None if weights is None else {"model": weights.stem, "bytes": weights.stat().st_size}
        size = len(data) + (spilled["bytes"] if spilled else 0)
        if size > budget:
            log.info("not caching the rewritten model (%d MiB): larger than ONNXCAM_CACHE_SIZE", size >> 20)
            return
        info = {
            "format": FORMAT, "onnx_sha256": hashlib.sha256(data).hexdigest(),
            "layer": gm.layer, "score": gm.score, "input_name": gm.input_name,
            "input_shape": list(gm.input_shape), "activation_shape": list(gm.activation_shape),
            "seed_shape": list(gm.seed_shape), "num_classes": gm.num_classes,
            "candidates": [{"tensor": c.tensor, "node": c.node, "op": c.op, "shape": list(c.shape),
                            "layout": c.layout} for c in gm.candidates],
            "path_is_linear": gm.path_is_linear, "batch_built_in": gm.batch_built_in,
            "layer_layout": gm.layer_layout, "weights": spilled,
            "class_grid": list(gm.class_grid) if gm.class_grid else None, "class_axis": gm.class_axis,
        }
        model_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(model_path, data)
        atomic_write_bytes(info_path, json.dumps(info, indent=1).encode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - a cache we cannot write is simply not used
        log.info("could not write cache entry %s (%s)", key[:12], exc)
        return
    prune(budget, keep=key)


def mark_weights_used(model: onnx.ModelProto) -> None:
    """Touch the cache's weights file a session of ``model`` is about to map, if it has one: an
    explainer may make a session long after it read the entry, and pruning keeps a weights file
    that no entry refers to any more only for LEFTOVER_AGE_S after its last use."""
    folder = external.folder_of(model)
    if folder is None or Path(folder).resolve().parent != cache_dir().resolve():
        return
    for path in external.data_files(model, folder):
        _mark_used(path)


def _mark_used(info_path: Path) -> None:
    """A hit makes the entry the most recently used (its JSON's modification time)."""
    try:
        os.utime(info_path)
    except OSError:
        pass  # a read-only cache still serves; its order just stays as it was


@dataclass(frozen=True)
class CachedModel:
    """One complete cache entry: a rewritten model and its JSON."""

    key: str
    nbytes: int        # both files
    last_used: float   # the JSON's modification time (a hit touches it)

    @property
    def layer(self) -> str | None:
        """The layer its JSON records (None if unreadable); read only when asked for, so pruning
        after a write reads no JSON."""
        try:
            return json.loads(_paths(self.key)[1].read_text(encoding="utf-8")).get("layer")
        except (OSError, ValueError, AttributeError):
            return None


def cached_models() -> tuple[list[CachedModel], list[tuple[Path, os.stat_result]]]:
    """The complete entries, least recently used first, and onnxcam's other files in the cache
    (models' shared weights files, and leftovers of interrupted writes or writes in progress).
    Only files with onnxcam's own names are looked at; files that vanish meanwhile are skipped."""
    entries, others = [], []
    for path in sorted(cache_dir().glob("*/*")):
        if not _ours(path):  # only onnxcam's own files, whatever else the folder holds
            continue
        try:
            stat = path.stat()
        except OSError:
            continue
        if path.suffix == ".onnx" and _ENTRY.fullmatch(path.name) and path.with_suffix(".json").exists():
            continue  # counted with its JSON
        if path.suffix != ".json" or path.name.startswith("."):
            others.append((path, stat))
            continue
        try:
            model_bytes = path.with_suffix(".onnx").stat().st_size
        except OSError:
            model_bytes = 0
        entries.append(CachedModel(path.stem, stat.st_size + model_bytes, stat.st_mtime))
    entries.sort(key=lambda entry: entry.last_used)
    return entries, others


def _referenced(entries: list[CachedModel] | None = None) -> dict[str, int]:
    """How many of ``entries`` (default: every complete entry) refer to each model's weights
    file (by the model's SHA-256)."""
    counts: dict[str, int] = {}
    for entry in cached_models()[0] if entries is None else entries:
        try:
            weights = json.loads(_paths(entry.key)[1].read_text(encoding="utf-8")).get("weights")
        except (OSError, ValueError):
            continue
        if isinstance(weights, dict) and isinstance(weights.get("model"), str):
            counts[weights["model"]] = counts.get(weights["model"], 0) + 1
    return counts


def prune(budget: int, keep: str | None = None) -> int:
    """Delete the least recently used entries until the cache holds at most ``budget`` bytes
    (never ``keep``); then the weights files no entry refers to and leftovers of interrupted
    writes, once unused for ``LEFTOVER_AGE_S`` (``budget`` 0: at once); a weights file that a
    rewritten model in memory still refers to stays (``file_hold``).
    Returns the bytes left (``prune(0)`` empties the cache but for writes in progress)."""
    entries, others = cached_models()
    total = sum(entry.nbytes for entry in entries) + sum(stat.st_size for _, stat in others)
    kept = []
    for entry in entries:
        if total <= budget or entry.key == keep:
            kept.append(entry)
            continue
        model_path, info_path = _paths(entry.key)
        _remove(info_path)  # the JSON first: without it the entry is incomplete, never half-read
        _remove(model_path)
        total -= entry.nbytes
    referenced = _referenced(kept) if any(path.suffix == ".weights" for path, _ in others) else {}
    now = time.time()
    for path, stat in others:
        if path.suffix == ".weights" and referenced.get(path.stem):
            continue
        if path.suffix == ".weights":
            if (budget == 0 or now - stat.st_mtime > LEFTOVER_AGE_S) and remove_unless_held(path):
                total -= stat.st_size
        elif is_remembered_hash(path):
            if budget == 0 or now - stat.st_mtime > DIGEST_AGE_S:
                _remove(path)
                total -= stat.st_size
        elif now - stat.st_mtime > LEFTOVER_AGE_S:
            _remove(path)
            total -= stat.st_size
    return total


_ENTRY = re.compile(r"(?P<key>[0-9a-f]{64})\.(?:onnx|json|weights|sha256)")
_TEMPORARY = re.compile(r"\.(?P<key>[0-9a-f]{64})\.[0-9a-f]{8}\.tmp\.(?:onnx|json|weights|sha256)")  # onnxcam.atomic's


def is_remembered_hash(path: Path) -> bool:
    """Whether ``path``, one of ``cached_models``' other files, is a remembered SHA-256 (not the
    temporary file of one being written)."""
    return path.suffix == ".sha256" and _ENTRY.fullmatch(path.name) is not None


def _ours(path: Path) -> bool:
    """Whether ``path`` is an entry file of this cache or the temporary file of one."""
    match = _ENTRY.fullmatch(path.name) or _TEMPORARY.fullmatch(path.name)
    return match is not None and path.parent.name == match.group("key")[:2]


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
