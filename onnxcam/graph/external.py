"""Models whose weights live in external data files stay there: on disk, not in the proto.

Protobuf cannot hold a message over 2 GB, so a model exported with external data (the only way to
write one over 2 GB) cannot be loaded whole into a ``ModelProto`` and serialized for ONNX Runtime.
Its large tensors therefore keep their external references all the way through preparation and
rewriting, and every session is told their folder
(``session.model_external_initializers_file_folder_path``). Small external tensors (shapes, axes,
biases) are read in, because the preparation and the rules look at their values.

The folder travels with the proto as a metadata property, since every stage passes protos on and
the rewriter keeps the source model's metadata.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import external_data_helper, helper

from onnxcam.atomic import atomic_path, atomic_write_bytes
from onnxcam.errors import ModelError, OptionError

FOLDER_KEY = "onnxcam.external_data_folder"
#: External tensors up to this size are read into the proto; larger ones stay on disk.
READ_IN_BYTES = 1 << 20
#: Tensors from this size on go to the data file of a written model (onnx's own default):
#: ONNX Runtime wants shape tensors in the model itself.
WRITE_OUT_BYTES = 1024
#: The ONNX Runtime session option that resolves external data of a model given as bytes.
FOLDER_OPTION = "session.model_external_initializers_file_folder_path"
PREPACK_SWITCH = "ONNXCAM_PREPACK"
#: Weights on disk above which sessions do not prepack them (see ``tell_folder``)
PREPACK_LIMIT = 1 << 30
#: Where ``spill`` starts each tensor in its file: the allocation granularity of memory maps
SPILL_ALIGN = 1 << 16


def tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from tensors(subgraph)


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(is_external(tensor) for tensor in tensors(model.graph))


def attach_small_tensors(model: onnx.ModelProto, model_path: Path, where: str) -> None:
    """Read the external tensors of up to READ_IN_BYTES into ``model``; check that the others'
    files are inside the model's folder and hold their bytes, and record where they are."""
    folder = Path(os.path.abspath(model_path.parent))
    # where the files may really be: the folder, or the real folder of a linked model file (the
    # Hugging Face cache links both files into blobs/), as ONNX Runtime allows for a path
    homes = (folder.resolve(), model_path.resolve().parent)
    kept: list[tuple[onnx.TensorProto, Path]] = []
    for tensor in tensors(model.graph):
        if not is_external(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        path = _named_inside(folder, info.location, tensor.name, where)
        real = path.resolve()
        if not any(real.is_relative_to(home) for home in homes):
            raise ModelError(f"{where}: the external data file '{info.location}' of tensor '{tensor.name}' "
                             f"links to '{real}', outside the model's folder: copy the file next to the model")
        size = tensor_bytes(tensor)
        available = real.stat().st_size - (info.offset or 0)
        needed = info.length if info.length else size
        if needed is not None and needed > available:
            raise ModelError(f"{where}: the external data of tensor '{tensor.name}' ends past the end "
                             f"of '{info.location}': check that the data file was copied whole")
        if size is not None and size <= READ_IN_BYTES:
            # read here, from the checked real file: onnx's own reader refuses any symlink
            with open(real, "rb") as stream:
                stream.seek(info.offset or 0)
                tensor.raw_data = stream.read(needed)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        else:
            kept.append((tensor, real))
    if kept:
        # sessions get the model as bytes and resolve links themselves: name the real files
        common = Path(os.path.commonpath([str(real.parent) for _, real in kept]))
        for tensor, real in kept:
            _set_location(tensor, real.relative_to(common).as_posix())
        set_folder(model, str(common))


def _named_inside(folder: Path, location: str, name: str, where: str) -> Path:
    """The data file's path, checked by name to be inside ``folder`` and to exist."""
    path = Path(os.path.normpath(folder / location))
    if os.path.isabs(location) or not path.is_relative_to(folder):
        raise ModelError(f"{where}: the external data of tensor '{name}' points outside the model's "
                         f"folder ('{location}'): keep external data files inside the model's folder")
    if not path.is_file():
        raise ModelError(f"{where}: the external data file '{location}' of tensor '{name}' is missing: "
                         "copy it next to the model")
    return path


def tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """The size of a tensor's values from its dims and type, wherever they are (None: unknown type)."""
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def data_bytes(path: Path) -> int:
    """How many bytes of the model file ``path``'s tensors are in external data files."""
    return disk_bytes(onnx.load(str(path), load_external_data=False))


def data_files(model: onnx.ModelProto, folder: str | os.PathLike) -> set[Path]:
    """The real paths of ``model``'s external data files (locations relative to ``folder``)."""
    return {(Path(folder) / external_data_helper.ExternalDataInfo(tensor).location).resolve()
            for tensor in tensors(model.graph) if is_external(tensor)}


def data_stamp(model: onnx.ModelProto, folder: str | os.PathLike | None) -> bytes | None:
    """The real path, size and modification time of each external data file of ``model``
    (locations relative to ``folder``): what a cache key needs besides the graph's bytes.
    None when a file cannot be found."""
    if folder is None:
        return None
    stamps = []
    for real in sorted(data_files(model, folder)):
        try:
            stat = real.stat()
        except OSError:
            return None
        stamps.append(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}")
    return "\n".join(stamps).encode()


def _set_location(tensor: onnx.TensorProto, location: str) -> None:
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location


def folder_of(model: onnx.ModelProto) -> str | None:
    """The folder holding ``model``'s external data files, if it has any left on disk."""
    for prop in model.metadata_props:
        if prop.key == FOLDER_KEY:
            return prop.value
    return None


def set_folder(model: onnx.ModelProto, folder: str | None) -> None:
    """Record ``folder`` in ``model`` (None: remove the record)."""
    kept = [prop for prop in model.metadata_props if prop.key != FOLDER_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if folder is not None:
        model.metadata_props.add(key=FOLDER_KEY, value=folder)


def check_resolvable(model: onnx.ModelProto, where: str) -> None:
    """A ModelError when ``model`` refers to external data and nobody recorded where it is."""
    if folder_of(model) is None and has_external_data(model):
        raise ModelError(f"{where} refers to external data files but not to their folder: give the "
                         "model's path instead (or load it with onnx.load, which reads the data in)")


def serialize(model: onnx.ModelProto, what: str = "the model") -> bytes:
    """The model's bytes, or a ModelError when protobuf cannot hold it (over 2 GB in memory)."""
    try:
        return model.SerializeToString()
    except EncodeError:  # upb's only failure here is the size (its ByteSize serializes too)
        raise too_large(what) from None


def too_large(what: str) -> ModelError:
    return ModelError(f"{what} is larger than protobuf's 2 GB limit in memory: save the model with "
                      "external data (onnx.save_model(..., save_as_external_data=True)) and give its path")


def session_options_for(model: onnx.ModelProto, options):
    """``options`` (an onnxruntime SessionOptions) told where ``model``'s external data is."""
    folder = folder_of(model)
    if folder is not None:
        tell_folder(options, folder, disk_bytes(model))
    return options


def disk_bytes(model: onnx.ModelProto) -> int:
    """How many bytes of ``model``'s tensors stay in external data files."""
    return sum(tensor_bytes(t) or 0 for t in tensors(model.graph) if is_external(t))


def spillable_bytes(model: onnx.ModelProto) -> int:
    """The bytes :func:`spill` would move out of ``model``."""
    return sum(tensor_bytes(t) for t in _spillable(model))


def _spillable(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The initializers over READ_IN_BYTES in raw_data. Sizes come from the dims: reading
    ``raw_data`` copies it (half a second for VGG-16's 0.5 GB), and the checker has made sure it
    is not shorter; ``spill`` checks each length as it writes."""
    return [t for t in model.graph.initializer
            if not is_external(t) and t.HasField("raw_data") and (tensor_bytes(t) or 0) > READ_IN_BYTES]


def spill(model: onnx.ModelProto, data_path: Path) -> bool:
    """Move ``model``'s initializers over READ_IN_BYTES into ``data_path`` (written whole, each
    at a SPILL_ALIGN boundary; a file of the right size there already is taken as written by an
    earlier spill of the same model), in place: the model then refers to them there, its folder
    recorded, as if it had been exported with external data. ONNX Runtime maps the file, so the
    two or three sessions of an explanation share one copy of the weights instead of each
    holding its own (VGG-16's Smooth Grad-CAM++ peaked at 1.6 GB instead of 3.3 GB). Returns
    whether it wrote the file."""
    moved = _spillable(model)
    places, end = [], 0
    for tensor in moved:
        offset = -(-end // SPILL_ALIGN) * SPILL_ALIGN
        places.append((offset, tensor_bytes(tensor)))
        end = offset + places[-1][1]
    written = not (data_path.is_file() and data_path.stat().st_size == end)  # else: written before, the same
    if written:
        with atomic_path(data_path) as temporary, open(temporary, "wb") as stream:
            for tensor, (offset, length) in zip(moved, places):
                data = tensor.raw_data
                if len(data) != length:  # longer than its dims say: leave the model as it is
                    raise OSError(f"tensor {tensor.name!r} holds {len(data)} bytes, its shape {length}")
                stream.write(bytes(offset - stream.tell()))
                stream.write(data)
    for tensor, (offset, length) in zip(moved, places):
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=value)
    set_folder(model, str(data_path.parent))
    return written


def tell_folder(options, folder: str, on_disk: int = 0) -> None:
    """Set FOLDER_OPTION, which onnxruntime reads from 1.21 on (older ones ignore it and look in
    the working directory): a ModelError before then. With more than PREPACK_LIMIT bytes of
    weights ``on_disk``, turn weight prepacking off, unless ``ONNXCAM_PREPACK=1``: onnxruntime
    maps the data files, so every session of the model (an explanation needs two or three)
    shares their pages, where prepacked weights are a private copy per session, made when it
    loads. A 2.3 GB classifier head peaked at 6.8 GB with prepacking and 2.8 GB without, and its
    first explanation took 14 s instead of 2.3 s; later calls took 2.3 s instead of 1.0 s
    (ViT-H: 7.2 s instead of 7.0 s). Below the limit prepacking stays: VGG-16's 0.5 GB cost
    0.5 GB more with it and ran 10% faster."""
    import onnxruntime as ort

    found = tuple(int(part) for part in re.findall(r"\d+", ort.__version__)[:2])
    if found < (1, 21):
        raise ModelError(f"this model keeps its weights in external data files, which onnxcam hands to "
                         f"onnxruntime 1.21 or newer; this is onnxruntime {ort.__version__}: upgrade it "
                         "(pip install -U onnxruntime-gpu)")
    options.add_session_config_entry(FOLDER_OPTION, folder)
    if on_disk > PREPACK_LIMIT and not prepack_disk_weights():
        options.add_session_config_entry("session.disable_prepacking", "1")


def prepack_disk_weights() -> bool:
    """``ONNXCAM_PREPACK=1``: prepack the weights of models with more than PREPACK_LIMIT bytes of
    weights on disk anyway (faster runs after a slower start, one packed copy per session)."""
    value = os.environ.get(PREPACK_SWITCH, "0").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", ""):
        raise OptionError(f"{PREPACK_SWITCH}={value!r} must be 1 or 0")
    return value in ("1", "true", "yes")


def checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` for ``onnx.checker.check_model``, which looks for external data files relative to
    the working directory: a copy whose tensors left on disk are empty stand-ins (their files were
    checked when the model was read)."""
    if not has_external_data(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in tensors(copy.graph):
        if is_external(tensor):
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.dims[:]
            tensor.dims.append(0)
    return copy


def read_in(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every external tensor read in (for writing it elsewhere)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    folder = folder_of(copy)
    if folder is not None:
        external_data_helper.load_external_data_for_model(copy, folder)
    set_folder(copy, None)
    return copy


def write_model(model: onnx.ModelProto, out: Path, inline: bool = False) -> Path | None:
    """Write ``model`` to ``out``, whole or not at all. A model with weights left on disk gets its
    own data file beside ``out`` (``<out>.data``, written first), which is returned; with
    ``inline`` (a model that came as one file, whose weights onnxcam moved to its cache) they are
    read back into the one file."""
    folder = folder_of(model)
    if folder is None or inline:
        atomic_write_bytes(out, serialize(model if folder is None else read_in(model), "the rewritten model"))
        return None
    data_path = out.parent / f"{out.name}.data"
    if data_path.resolve() in data_files(model, folder):
        raise OptionError(f"{out}: its weights would go to '{data_path}', the input model's own external "
                          "data file: give another -o/--output")
    whole = read_in(model)
    with atomic_path(out) as model_file, atomic_path(data_path) as data_file:
        external_data_helper.convert_model_to_external_data(
            whole, all_tensors_to_one_file=True, location=data_file.name, size_threshold=WRITE_OUT_BYTES)
        external_data_helper.write_external_data_tensors(whole, str(data_file.parent))
        for tensor in tensors(whole.graph):
            _set_location(tensor, data_path.name)
        model_file.write_bytes(serialize(whole, "the rewritten model"))
    return data_path
