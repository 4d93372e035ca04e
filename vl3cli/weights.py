"""Checkpoint weights: safetensors shards -> vl3's parameters, one tensor at a time.

- Only safetensors are read. `.bin` / `.pt` / `.pth` / `.ckpt` (pickle) are refused, never
  unpickled; `*.py` files in a checkpoint are ignored. `SafetensorsFile` reads the format's
  header itself and checks it as the `safetensors` library does before any byte is used (a
  regular file; shapes and offsets integers; the tensors' bytes tile the data section exactly).
- Nothing is guessed (`open_files`, `load_into`): an index's shards are names inside the folder
  (a Hub snapshot's symlinks into blobs/ are fine) and each tensor is in the shard the index names;
  a tensor stored twice, or a weight that is not floating-point, is an error.
- `rename_key(key, fmt)` is the one pure function per format that maps a checkpoint key to the
  name of the parameter in `vl3cli.model.VideoLlama3` (None = not a weight of ours); the model
  fuses q/k/v and gate/up (`FusedLinear.parts`), and the loader places each checkpoint tensor in
  its rows of the fused matrix.
- How each tensor gets into memory, so that nothing is held twice:
  * stored in the dtype asked for, on CPU, used as is: a zero-copy view of the memory-mapped file
    (a bf16 checkpoint loaded in bf16 copies nothing but the fused matrices). `load_into` returns
    where those views lie (`MappedPages`), by module: a module used in bursts can hand its pages
    back after each use (the vision tower does, layer by layer, in every encode: `Engine.load`);
  * fused, converted (another dtype, another device), packed or quantized: its bytes are copied
    from the mapping straight into the destination (or a block of rows at a time through a small
    buffer), and the pages they came from are handed back at once (`madvise(MADV_DONTNEED)`: the
    file stays in the page cache), so they never add up in the process's memory. Copying from the
    mapping runs at about 1.7x `pread`'s speed (2-core Xeon VM, 3.4 GB from the page cache: 7.6
    against 4.6 GB/s); where pages cannot be handed back (no madvise), bytes are read with `pread`.
- `--quantize` (`quantize.QuantizedLinear`) fills each quantized layer a block of rows at a time.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
from collections import Counter
from dataclasses import dataclass
from functools import partial
from math import prod
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from .config import read_json
from .errors import WeightsError
from .heap import return_freed_memory
from .products import PackedLinear
from .quantize import INT4_BLOCK, QuantizedLinear, quantizable

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# checkpoint prefix -> vl3 prefix, tried in order (the first that matches wins).
_PREFIXES = {
    "hf": (
        ("model.vision_model.", "vision."),
        ("model.projector.", "projector."),
        ("model.language_model.", "language."),
        ("lm_head.", "lm_head."),
    ),
    "original": (
        ("model.vision_encoder.", "vision."),
        ("model.mm_projector.", "projector."),
        ("model.", "language."),
        ("lm_head.", "lm_head."),
    ),
}
# Other spellings of a prefix: checkpoints fine-tuned with the authors' training code wrap the
# vision tower once more (their convert script renames vision_encoder -> vision_encoder.vision_encoder).
_ALIASES = {
    "hf": (),
    "original": (("model.vision_encoder.vision_encoder.", "model.vision_encoder."),),
}

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 * 1024 * 1024
BLOCK_BYTES = 32 * 1024 * 1024  # rows read (and converted or quantized) at a time
RELEASE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")  # see the module docstring


def _count(x) -> bool:
    """A JSON integer >= 0 (not a bool, not a float)."""
    return type(x) is int and x >= 0


def rename_key(key: str, fmt: str) -> str | None:
    """Checkpoint key -> vl3 parameter name, or None for keys that are not ours."""
    for alias, canonical in _ALIASES[fmt]:
        if key.startswith(alias):
            key = canonical + key[len(alias) :]
            break
    for src, dst in _PREFIXES[fmt]:
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def checkpoint_key(name: str, fmt: str) -> str:
    """The inverse of `rename_key`: how the checkpoint of format `fmt` spells parameter `name`."""
    for src, dst in _PREFIXES[fmt]:
        if name.startswith(dst):
            return src + name[len(dst) :]
    return name


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder without an index; refuses pickle-only folders."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{path} holds only pickle weights ({', '.join(pickles[:3])}); vl3 loads safetensors only, "
            "because unpickling can run arbitrary code. Convert the checkpoint to safetensors first."
        )
    raise WeightsError(f"{path} holds no *.safetensors weights")


def weight_index(path: Path) -> dict[str, str] | None:
    """`weight_map` of model.safetensors.index.json (checkpoint key -> shard file name), validated:
    every shard is a file inside `path`. None when the checkpoint has no index."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return None
    weight_map = read_json(index, WeightsError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index}: 'weight_map' must map tensor names to shard file names")
    for name in dict.fromkeys(weight_map.values()):
        # The name as written, not where a symlink leads: a Hub cache snapshot's files are
        # symlinks into its repo's blobs/ folder, and those are fine.
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if not name or PurePosixPath(name).is_absolute() or Path(name).is_absolute() or ".." in parts:
            raise WeightsError(f"{index}: shard {name!r} is not a file inside the checkpoint folder; refusing to read it")
    missing = [name for name in dict.fromkeys(weight_map.values()) if not (path / name).is_file()]
    if missing:
        raise WeightsError(f"{path}: shards listed in {index.name} are missing: {', '.join(missing)}")
    return weight_map


def open_files(path: Path) -> list[SafetensorsFile]:
    """The checkpoint's safetensors files, headers read and checked (see `SafetensorsFile`). With an
    index, each tensor must be in the shard the index names: a shard holding a tensor the index
    places elsewhere (or not at all), or lacking one it places there, is refused rather than trusted."""
    weight_map = weight_index(path)
    names = list(dict.fromkeys(weight_map.values())) if weight_map is not None else None
    files: list[SafetensorsFile] = []
    try:
        for f in [path / name for name in names] if names is not None else weight_files(path):
            files.append(SafetensorsFile(f))
        if weight_map is not None:
            where = dict(zip(names, files))
            for name, f in where.items():
                for key in f.tensors:
                    if weight_map.get(key) != name:
                        listed = f"in {weight_map[key]}" if key in weight_map else "nowhere"
                        raise WeightsError(f"{f.path}: holds tensor {key}, which model.safetensors.index.json "
                                           f"places {listed}; the checkpoint is inconsistent")
            for key, name in weight_map.items():
                if key not in where[name].tensors:
                    raise WeightsError(f"{path / name}: lacks tensor {key}, which model.safetensors.index.json "
                                       "places there")
    except BaseException:
        for f in files:
            f.close()
        raise
    return files


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file
    nbytes: int
    stored: str = ""  # the dtype as the header names it ("BF16", "I32"...)


class SafetensorsFile:
    """One .safetensors file: its validated header, zero-copy views and direct reads."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = -1
        try:
            # Non-blocking, so that a FIFO named like a shard cannot hang the open; refused below.
            self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("not a regular file")
            size = st.st_size
            head = os.pread(self._fd, 8, 0)
            if len(head) < 8:
                raise ValueError("file too short")
            n = int.from_bytes(head, "little")
            if n > min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(os.pread(self._fd, n, 8))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            self.tensors = {k: self._info(k, v, 8 + n, size) for k, v in header.items() if k != "__metadata__"}
            self._check_tiling(8 + n, size)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            if self._fd >= 0:
                os.close(self._fd)
            raise WeightsError(f"cannot read {path}: {exc}") from None
        self._map: mmap.mmap | None = None

    @staticmethod
    def _info(key: str, entry: dict, data_start: int, size: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise TypeError(f"{key}: entry is not a JSON object")
        if not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ValueError(f"{key}: entry needs dtype, shape and data_offsets")
        name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        dtype = DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise ValueError(f"{key}: unsupported dtype {name!r}")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise ValueError(f"{key}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(x) for x in offsets)):
            raise ValueError(f"{key}: data_offsets {offsets!r} are not two non-negative integers")
        begin, end = offsets
        if not begin <= end <= size - data_start:
            raise ValueError(f"{key}: offsets out of range")
        if end - begin != prod(shape) * dtype.itemsize:
            raise ValueError(f"{key}: {end - begin} bytes for shape {shape} in {name}")
        return TensorInfo(dtype, tuple(shape), data_start + begin, end - begin, name)

    def _check_tiling(self, data_start: int, size: int) -> None:
        """The tensors' byte ranges cover the data section exactly, in order: no overlap (one tensor
        reading another's bytes), no gap, nothing after the last, as the format requires."""
        at = data_start
        for key, info in sorted(self.tensors.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes)):
            if info.offset != at:
                raise ValueError(f"{key}: data_offsets {'overlap another tensor' if info.offset < at else 'leave a gap'}")
            at += info.nbytes
        if at != size:
            raise ValueError(f"{size - at} bytes after the last tensor")

    def close(self) -> None:
        """Close the file (again: nothing); views already taken stay valid (the mapping lives as long as they do)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def view(self, key: str) -> torch.Tensor:
        """The tensor as a zero-copy view of the mapped file (pages load when first touched)."""
        info = self.tensors[key]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        count = info.nbytes // info.dtype.itemsize
        return torch.frombuffer(self._mapping(), dtype=info.dtype, count=count, offset=info.offset).view(info.shape)

    def release(self, key: str) -> None:
        """Hand back the pages of `key` once its bytes have been copied elsewhere: they stay in the
        page cache, out of this process's memory. A view of it stays valid (nothing writes to the
        mapping, so a page touched again is read again from the file)."""
        info = self.tensors[key]
        self.release_range(info.offset, info.nbytes)

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            # Private and writable (copy on write): torch.frombuffer wants a writable buffer.
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
        return self._map

    def release_rows(self, key: str, start: int, stop: int) -> None:
        """Hand back the pages of rows start..stop-1 of `key` (see `release`)."""
        info = self.tensors[key]
        row_bytes = prod(info.shape[1:]) * info.dtype.itemsize
        self.release_range(info.offset + start * row_bytes, (stop - start) * row_bytes)

    def release_range(self, offset: int, nbytes: int) -> None:
        """Hand back the mapped pages wholly inside bytes offset..offset+nbytes (see `release`)."""
        # Only the pages wholly inside the range: a page shared with a neighbouring tensor, which
        # may be in use as a view, stays. Pages never written to are simply read again if touched.
        first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if RELEASE and end > first and self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED, first, end - first)

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start..stop-1 (along dim 0) copied into `out` (contiguous, CPU, stored dtype); the
        pages they were copied from are handed back (see the module docstring)."""
        info = self.tensors[key]
        row_bytes = prod(info.shape[1:]) * info.dtype.itemsize
        if out is None:
            out = torch.empty((stop - start, *info.shape[1:]), dtype=info.dtype)
        offset, nbytes = info.offset + start * row_bytes, (stop - start) * row_bytes
        if RELEASE and nbytes:
            out.view(-1).view(torch.uint8).copy_(torch.frombuffer(self._mapping(), dtype=torch.uint8, count=nbytes,
                                                                  offset=offset))  # fmt: skip
            self.release_range(offset, nbytes)
            return out
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(buffer):
            got = os.preadv(self._fd, [buffer[done:]], offset + done)
            if got <= 0:
                raise WeightsError(f"cannot read {self.path}: file ends inside {key}")
            done += got
        return out


class MappedPages:
    """Where the parameters that are views of a mapped file lie in it, by parameter name.

    `release(prefix)` hands back the pages of the views under a module (the whole span of its
    tensors in each file, gaps under a page merged): they leave the process's memory, stay in the
    page cache, and are mapped again, without a copy, when next touched (2B-geometry vision tower,
    786 MB: about 10 ms to hand back and 20-30 ms to map again on a 2-core Xeon). Nothing writes
    to these views, so what is read again is what was there. Parameters that were copied
    (converted, fused, packed, quantized, moved to a GPU) are never listed: their memory is the
    only copy.
    """

    def __init__(self):
        self._spans: dict[str, tuple[SafetensorsFile, int, int]] = {}  # parameter -> (file, offset, nbytes)
        self._merged: dict[str, list[tuple[SafetensorsFile, int, int]]] = {}  # by prefix, built once

    def add(self, param: str, file: SafetensorsFile, key: str) -> None:
        info = file.tensors[key]
        self._spans[param] = (file, info.offset, info.nbytes)
        self._merged.clear()

    def under(self, prefix: str) -> list[tuple[SafetensorsFile, int, int]]:
        """The spans of the parameters of module `prefix` and its children, merged, in file order."""
        if prefix in self._merged:
            return self._merged[prefix]
        spans = sorted((s for name, s in self._spans.items() if name.startswith(prefix + ".")),
                       key=lambda s: (str(s[0].path), s[1]))  # fmt: skip
        merged: list[tuple[SafetensorsFile, int, int]] = []
        for file, offset, nbytes in spans:
            if merged and merged[-1][0] is file and offset - (merged[-1][1] + merged[-1][2]) < mmap.PAGESIZE:
                _, first, _ = merged[-1]
                merged[-1] = (file, first, max(merged[-1][2], offset + nbytes - first))
            else:
                merged.append((file, offset, nbytes))
        self._merged[prefix] = merged
        return merged

    def release(self, prefix: str) -> None:
        """Hand back the pages of module `prefix`'s mapped parameters."""
        for file, offset, nbytes in self.under(prefix):
            file.release_range(offset, nbytes)


def stored_dtype(files: list[SafetensorsFile]) -> torch.dtype | None:
    """The floating dtype holding most of the checkpoint's bytes."""
    counts: Counter = Counter()
    for f in files:
        for info in f.tensors.values():
            if info.dtype.is_floating_point:
                counts[info.dtype] += info.nbytes
    return counts.most_common(1)[0][0] if counts else None


@dataclass
class _Part:
    """A checkpoint tensor and where it goes: rows row..row+len of parameter `param`."""

    param: str
    row: int
    shape: tuple[int, ...]
    file: SafetensorsFile | None = None
    key: str = ""


def _parts(model: nn.Module) -> dict[str, _Part]:
    """Every checkpoint-level tensor the model needs, under its unfused vl3 name."""
    parts = {}
    for module_name, module in model.named_modules():
        prefix = module_name + "." if module_name else ""
        tensors = {name: tuple(p.shape) for name, p in module.named_parameters(recurse=False)}
        if isinstance(module, QuantizedLinear):
            tensors["weight"] = (module.out_features, module.in_features)
        fused = getattr(module, "parts", None)
        for tname, shape in tensors.items():
            if fused is None:
                parts[prefix + tname] = _Part(prefix + tname, 0, shape)
                continue
            parent, row = module_name.rpartition(".")[0], 0
            for name, rows in fused:
                parts[f"{parent}.{name}.{tname}"] = _Part(prefix + tname, row, (rows, *shape[1:]))
                row += rows
    return parts


def checkpoint_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint holds for `model`, under vl3 names (q/k/v, gate/up apart), with shapes."""
    return {name: part.shape for name, part in _parts(model).items()}


def _quantize_modules(model: nn.Module, mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Swap the quantizable linears of a meta-device model for empty QuantizedLinear layers."""
    for name, module in list(model.named_modules()):
        if quantizable(name, module):
            q = QuantizedLinear(module.in_features, module.out_features, mode, module.bias is not None, dtype, device)
            if hasattr(module, "parts"):
                q.parts = module.parts
            _swap(model, name, q)


def load_into(
    model: nn.Module, path: Path, fmt: str, device: torch.device, dtype: torch.dtype, tie_lm_head: bool,
    quantize: str | None = None, vision_dtype: torch.dtype | None = None, pack: bool = False,
    files: list[SafetensorsFile] | None = None, wide: bool = False,
) -> MappedPages:
    """Fill a meta-device `model` with the checkpoint's weights (assign, no second copy).

    Floating-point weights become `dtype`, those of the vision tower and projector `vision_dtype`
    (default: `dtype`). With `pack` (bf16 on a CPU that computes in it natively) the language
    model's linears and the head become `products.PackedLinear`s: each weight is reordered for
    oneDNN straight from the mapping (a block of rows at a time, see `PackedLinear`) or, when fused
    or converted, from a staging buffer, one weight at a time; with `wide` too, those stored in
    `dtype` keep their mapped rows for products of many rows (see `products.wide_product`).
    Raises WeightsError naming every missing, unexpected or wrongly shaped key, any tensor stored
    twice (in two files, or under both spellings of a prefix) and any weight that is not
    floating-point, before reading any. `files`: the
    checkpoint's files already opened with `open_files` (their headers read once), which the
    caller closes; without them, the files are opened and closed here.
    Returns where the parameters used as views of the mapped files lie (`MappedPages`).
    """
    opened = open_files(path) if files is None else []
    try:
        pages = _load(model, files or opened, path, fmt, device, dtype, tie_lm_head, quantize, vision_dtype, pack, wide)
    finally:
        for f in opened:
            f.close()
    return_freed_memory()  # the block buffers' heap pages
    return pages


def _load(model, files, path, fmt, device, dtype, tie_lm_head, quantize, vision_dtype, pack=False,
          wide=False) -> MappedPages:  # fmt: skip
    if quantize:
        _quantize_modules(model, quantize, device, dtype)
    parts = _parts(model)
    unexpected: list[str] = []
    wrong_shape: list[str] = []
    seen: dict[str, tuple[SafetensorsFile, str]] = {}  # vl3 name -> where it was found first
    for f in files:
        for key, info in f.tensors.items():
            name = rename_key(key, fmt)
            part = parts.get(name) if name else None
            if name in seen:
                first, first_key = seen[name]
                where = (f"in {first.path} and in {f.path}" if first_key == key
                         else f"as {first_key} in {first.path} and as {key} in {f.path}")  # fmt: skip
                raise WeightsError(f"tensor {key} is stored twice, {where}: remove one copy (vl3 will not guess "
                                   "which is right)")
            if name is not None:
                seen[name] = (f, key)
            if part is None:
                unexpected.append(key)
            elif not info.dtype.is_floating_point:
                raise WeightsError(f"{f.path}: tensor {key} has dtype {info.stored}; vl3 expects floating-point weights")
            elif info.shape != part.shape:
                wrong_shape.append(f"{key} {info.shape} (expected {part.shape})")
                part.key = "wrong shape"
            else:
                part.file, part.key = f, key
    head, embed = parts.get("lm_head.weight"), parts["language.embed_tokens.weight"]
    if tie_lm_head and head is not None and not head.key:  # no lm_head stored: the embedding is the head
        head.file, head.key = embed.file, embed.key
    # A quantized or packed head gets its own copy, read from the embedding's bytes; otherwise they share one tensor.
    shared_head = (head is not None and head.key == embed.key and not isinstance(model.lm_head, QuantizedLinear)
                   and not pack)  # fmt: skip
    missing = sorted(name for name, p in parts.items() if not p.key)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_names([checkpoint_key(n, fmt) for n in missing])}")
    if wrong_shape:
        problems.append(f"wrong shape: {_names(wrong_shape)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
    if problems:
        raise WeightsError(f"{path}: the weights do not match config.json: " + "; ".join(problems))

    by_param: dict[str, list[_Part]] = {}
    for p in parts.values():
        by_param.setdefault(p.param, []).append(p)
    state: dict[str, torch.Tensor] = {}
    pages = MappedPages()
    staging = None  # packing: one read buffer for every weight, each reordered out of it
    if pack:
        largest = max((sum(math.prod(p.shape) for p in group) for param, group in by_param.items()
                       if param.endswith(".weight") and not _maps(group, dtype, device)
                       and quantizable(param.rpartition(".")[0], model.get_submodule(param.rpartition(".")[0]))),
                      default=0)  # fmt: skip
        staging = torch.empty(largest, dtype=dtype, device=device)
    for param, group in by_param.items():
        module_name = param.rpartition(".")[0]
        module = model.get_submodule(module_name)
        if isinstance(module, QuantizedLinear) and param.endswith(".weight"):
            for p in group:
                for start, block in _blocks(p):
                    module.fill_rows(p.row + start, block)
            module.finish()
            continue
        if param == "lm_head.weight" and shared_head:
            continue  # the same tensor as the embedding, below
        vision = param.startswith(("vision.", "projector."))
        packed = pack and param.endswith(".weight") and quantizable(module_name, module)
        target = (vision_dtype or dtype) if vision else dtype
        tensor = _materialise(group, target, device, staging=staging if packed else None)
        if packed:  # reordered out of the mapping (a block of rows at a time) or the staging buffer now
            module.weight = nn.Parameter(tensor, requires_grad=False)
            first = group[0]
            release = partial(first.file.release_rows, first.key) if _maps(group, target, device) else None
            plain = None
            if wide and all(p.file.tensors[p.key].dtype == dtype for p in group):
                plain = [(p.row, p.file.view(p.key), partial(p.file.release_rows, p.key)) for p in group]
            _swap(model, module_name, PackedLinear(module, release, plain))
            for p in group:  # also the pages that straddle two blocks (copies were handed back as read)
                p.file.release(p.key)
        else:
            state[param] = tensor
            if _maps(group, target, device):
                pages.add(param, group[0].file, group[0].key)
    if shared_head:
        state["lm_head.weight"] = state["language.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    return pages


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _blocks(p: _Part):
    """(first row, tensor) blocks of one checkpoint tensor, read through a small buffer."""
    info = p.file.tensors[p.key]
    rows = info.shape[0] if info.shape else 1
    step = max(1, BLOCK_BYTES // max(1, info.nbytes // max(1, rows)))
    if step > INT4_BLOCK:  # whole blocks of the int4 kernel's layout (see QuantizedLinear.fill_rows)
        step -= step % INT4_BLOCK
    for start in range(0, rows, step):
        yield start, p.file.read_rows(p.key, start, min(rows, start + step))


def _materialise(group: list[_Part], dtype: torch.dtype, device: torch.device,
                 staging: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One parameter from its checkpoint tensor(s): a mapped view when usable as is (for a weight
    about to be packed, its caller then releases the pages), else read into place: into `staging`
    (a flat buffer reused from one packed weight to the next, so its pages are faulted in once)
    when given and the dtypes agree."""
    first = group[0]
    if _maps(group, dtype, device):
        return first.file.view(first.key)
    rows = sum(p.shape[0] for p in group)
    shape = (rows, *first.shape[1:])
    if staging is not None and staging.dtype == dtype:
        out = staging[: math.prod(shape)].view(shape)
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    for p in group:
        if p.file.tensors[p.key].dtype == dtype and device.type == "cpu":
            p.file.read_rows(p.key, 0, p.shape[0], out=out[p.row : p.row + p.shape[0]])
            continue
        for start, block in _blocks(p):
            out[p.row + start : p.row + start + block.shape[0]].copy_(block)
    return out


def _maps(group: list[_Part], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the parameter made of `group` is used as a view of the mapped file (see `_materialise`)."""
    info = group[0].file.tensors[group[0].key]
    return len(group) == 1 and device.type == "cpu" and info.dtype == dtype


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
