"""The process heap (glibc's malloc): what vl3 hands back to the system, and what it keeps.

Two moments matter:
- after loading, the heap pages that the loader's block buffers used are handed back
  (`return_freed_memory`): glibc would keep them otherwise (about 0.45 GB after quantizing the 2B
  model);
- in vl3's own processes (the `vl3` command, a Ray actor), once the model is loaded, freed memory
  is kept for the next forward pass (`keep_freed_memory`). A layer's activations are freed when
  the next layer starts. By default glibc maps blocks above a threshold that it moves with
  the sizes it sees (at most 32 MB). It also gives the top of the heap back to the system as
  soon as more than twice that threshold is free there. So a forward pass over a few hundred
  tokens faults its activation pages in afresh, layer after layer: 0.55 GB of page faults per
  prefill of 290 tokens at the 2B geometry, 0.5-1.0 s of its 5-6 s on two Xeon cores.
  `keep_freed_memory` fixes the threshold at that 32 MB maximum and keeps up to 256 MB free at
  the top of the heap. The peak memory of a run stays the same (2B geometry: within 10 MB).

Both change the whole process's allocator, so the Python API leaves the second to its caller (a
program may have its own reasons), and neither does anything where there is no glibc.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest (its dynamic threshold stops there): larger blocks are mapped
TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap's top: a layer's activations, 7B geometry included


def _libc():
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):  # no C library to open by name (Windows)
        return None


def return_freed_memory() -> None:
    """Hand free heap pages back to the system (glibc's malloc_trim). A no-op without it."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def keep_freed_memory() -> bool:
    """Keep freed blocks of up to 32 MB, and up to 256 MB free at the heap's top, for reuse (see
    the module doc). True when glibc took both settings."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return False  # not glibc (musl, macOS): its allocator is left as it is
    mapped = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    kept = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mapped and kept)
