"""Streaming safetensors reading and writing, one tensor in memory at a time.

The ``safetensors`` package writes a file from a dict that must be complete in memory; converting a 5B model
that way holds the whole model twice.  Here the header (names, dtypes, shapes, offsets) is computed first from a
*plan* and the tensors are then written one after the other, so only the tensor being written is resident.
Files follow the format exactly (8-byte little-endian header length, JSON header padded with spaces to a multiple
of 8, ``__metadata__ {"format": "pt"}``, data in header order), so ``safetensors``, diffusers and transformers read
them as their own.  Sharding and the ``*.safetensors.index.json`` file follow diffusers/transformers' naming.

Reading uses a private (copy-on-write) memory map: tensors are views of the file's pages, nothing is copied.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

from sat_cogvideo.errors import UserError

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def parse_size(size) -> int:
    """``"5GB"`` / ``"200MB"`` / ``"10KB"`` / an int -> bytes (decimal units, as diffusers)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit, factor in (("GIB", 2 ** 30), ("MIB", 2 ** 20), ("KIB", 2 ** 10), ("GB", 10 ** 9), ("MB", 10 ** 6),
                         ("KB", 10 ** 3), ("B", 1)):
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--max_shard_size {size!r} is not a size: use e.g. 5GB, 500MB or a number of bytes") from None


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


def _header_bytes(entries: Sequence[PlannedTensor]) -> bytes:
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy())


def shard_names(prefix: str, count: int) -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class StreamingShardWriter:
    """Write planned tensors into ``folder/<prefix>[-0000i-of-0000n].safetensors`` (+ index when sharded).

    ``plan`` is the ordered list of tensors that will be written; :meth:`write` must then be called with each of
    them, in the same order (checked: name, shape and dtype after casting).  Shards are cut at ``max_shard_size``
    bytes (a tensor larger than that gets a shard of its own), as diffusers does.
    """

    def __init__(self, folder: str, plan: Sequence[PlannedTensor], *, prefix: str = "diffusion_pytorch_model",
                 max_shard_size="5GB"):
        limit = parse_size(max_shard_size)
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for entry in plan:
            if shards[-1] and size + entry.nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += entry.nbytes
        self.folder = folder
        self.prefix = prefix
        self.shards = [s for s in shards if s] or [[]]
        self.names = shard_names(prefix, len(self.shards))
        self.total_size = sum(e.nbytes for e in plan)
        self._shard = -1
        self._pos = 0
        self._file = None
        self._written = 0

    def _open_next(self):
        if self._file is not None:
            self._file.close()
        self._shard += 1
        self._pos = 0
        self._file = open(os.path.join(self.folder, self.names[self._shard]), "wb")
        self._file.write(_header_bytes(self.shards[self._shard]))

    def write(self, name: str, tensor: torch.Tensor):
        while self._file is None or self._pos >= len(self.shards[self._shard]):
            if self._shard + 1 >= len(self.shards):
                raise RuntimeError(f"tensor {name} was not in the write plan")
            self._open_next()
        entry = self.shards[self._shard][self._pos]
        if entry.name != name or tuple(tensor.shape) != tuple(entry.shape):
            raise RuntimeError(f"write order broken: expected {entry.name} {list(entry.shape)}, "
                               f"got {name} {list(tensor.shape)}")
        self._file.write(_tensor_bytes(tensor.to(entry.dtype)))
        self._pos += 1
        self._written += 1

    def close(self):
        """Finish the last shard (and the empty ones, if a plan had none) and write the index if sharded."""
        if self._written != sum(len(s) for s in self.shards):
            raise RuntimeError(f"only {self._written} of {sum(len(s) for s in self.shards)} planned tensors written")
        while self._shard + 1 < len(self.shards):
            self._open_next()
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {e.name: self.names[i] for i, shard in enumerate(self.shards) for e in shard}}
            with open(os.path.join(self.folder, f"{self.prefix}.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")


def write_streaming(folder: str, groups: Iterable[tuple[Mapping, Callable[[Mapping], Mapping]]],
                    *, prefix: str = "diffusion_pytorch_model", max_shard_size="5GB",
                    dtype: torch.dtype | None = None) -> list[str]:
    """Convert and write group by group: each group is ``(inputs, convert)`` with ``convert(inputs) -> outputs``.

    ``convert`` is first run on meta copies of the inputs (shapes only) to plan the files, then on the real
    inputs, one group at a time; floating tensors are cast to ``dtype`` when given.  Returns the file names.
    """
    groups = list(groups)
    plan = []
    for inputs, convert in groups:
        meta = {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in inputs.items()}
        for name, t in convert(meta).items():
            out_dtype = dtype if (dtype is not None and t.dtype.is_floating_point) else t.dtype
            plan.append(PlannedTensor(name, tuple(t.shape), out_dtype))
    names = [p.name for p in plan]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"two checkpoint tensors map to the same name {dup[0]}: is the checkpoint a merge of two?")
    writer = StreamingShardWriter(folder, plan, prefix=prefix, max_shard_size=max_shard_size)
    for inputs, convert in groups:
        out = convert(inputs)
        for name in list(out):
            writer.write(name, out.pop(name))
        del out
    writer.close()
    return list(writer.names)


# ----------------------------------------------------------------------------------------------------------------
# reading

def read_header(path: str) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file; UserError if it is not one or is truncated."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("too short")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 2 ** 20 or length > os.path.getsize(path):
                raise ValueError("bad header length")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a safetensors file or is truncated ({err}): fetch it again") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (its header is not a table)")
    data = [info.get("data_offsets", (0, 0))[1] for name, info in header.items() if name != "__metadata__"]
    need, size = 8 + length + max(data, default=0), os.path.getsize(path)
    if size < need:
        raise UserError(f"{path} is truncated: it holds {size} bytes, its header describes {need}; fetch it again")
    return 8 + length, header


def open_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as zero-copy views of a private memory map (file order)."""
    start, header = read_header(path)
    header.pop("__metadata__", None)
    size = os.path.getsize(path)
    if size == start:  # no data (empty model part)
        return {name: torch.empty(info["shape"], dtype=NAME_DTYPES[info["dtype"]]) for name, info in header.items()}
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = NAME_DTYPES.get(info["dtype"])
        if dtype is None:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = info["shape"]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        out[name] = torch.frombuffer(mm, dtype=dtype, count=count, offset=start + begin).view(shape)
    return out


def weight_files(folder: str, prefix: str) -> list[str]:
    """The files of ``folder/<prefix>.safetensors`` or of its shards listed in ``<prefix>.safetensors.index.json``
    (each checked to exist)."""
    single = os.path.join(folder, f"{prefix}.safetensors")
    index = os.path.join(folder, f"{prefix}.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            try:
                files = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, AttributeError, TypeError):
                raise UserError(f"{index} is not a safetensors index (no weight_map)") from None
        paths = [os.path.join(folder, name) for name in files]
        lost = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
        if lost:
            raise UserError(f"{index} lists {', '.join(lost)}, which {'is' if len(lost) == 1 else 'are'} missing: "
                            f"the download is incomplete")
        return paths
    if os.path.isfile(single):
        return [single]
    raise UserError(f"{folder} holds no {prefix}.safetensors (or sharded index): is it a diffusers model folder?")


def open_weights_folder(folder: str, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors of ``folder/<prefix>.safetensors`` or of its shards listed in ``<prefix>.safetensors.index.json``."""
    out = {}
    for path in weight_files(folder, prefix):
        out.update(open_safetensors(path))
    return out


def header_tensors(folder: str, prefix: str) -> dict[str, torch.Tensor]:
    """Meta tensors (names, shapes, dtypes) of a weights folder, read from the file headers only."""
    out = {}
    for path in weight_files(folder, prefix):
        _, header = read_header(path)
        header.pop("__metadata__", None)
        for name, info in header.items():
            dtype = NAME_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
            out[name] = torch.empty(info["shape"], dtype=dtype, device="meta")
    return out


def iter_safetensors(path: str):
    """``(name, tensor)`` of a safetensors file in file order, each a view of a private memory map; the pages of a
    tensor are handed back to the kernel (``MADV_DONTNEED``) once the consumer asks for the next one, so reading a
    whole file keeps only about one tensor's pages resident (copy what you need before advancing)."""
    start, header = read_header(path)
    header.pop("__metadata__", None)
    if os.path.getsize(path) == start:
        for name, info in header.items():
            yield name, torch.empty(info["shape"], dtype=NAME_DTYPES[info["dtype"]])
        return
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    page = mmap.PAGESIZE
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = NAME_DTYPES.get(info["dtype"])
        if dtype is None:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = (start + o for o in info["data_offsets"])
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            yield name, torch.empty(info["shape"], dtype=dtype)
            continue
        yield name, torch.frombuffer(mm, dtype=dtype, count=count, offset=begin).view(info["shape"])
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            first = begin - begin % page
            mm.madvise(mmap.MADV_DONTNEED, first, end - first)
