"""C kernels built at first use with the machine's C compiler, for the machine's own CPU, and loaded with ctypes.

Each library is cached in a per-user directory (`DGQ_KERNEL_CACHE`, default `~/.cache/dgq-serve/kernels`) under a
name keyed by its source, flags, compiler and CPU, so a changed source or another CPU builds anew and workers that
build at once each load a whole file. Without a compiler, or where the build fails, `build` returns None and the
caller runs its torch ops instead (logged once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read); read once."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.split(":", 1)[1].split())


class BuiltOnce:
    """A kernel library made by `make` at the first `get()` and kept for the process (None where it cannot be);
    threads that ask at once wait for the one build.

    Args:
        make (`Callable[[], ctypes.CDLL | None]`): builds and declares the library (usually through `build`).
    """

    def __init__(self, make: Callable[[], ctypes.CDLL | None]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self._made = False

    def get(self) -> ctypes.CDLL | None:
        if not self._made:
            with self._lock:
                if not self._made:
                    self._library, self._made = self._make(), True
        return self._library


def build(stem: str, source: str, flags: list[str], purpose: str) -> ctypes.CDLL | None:
    """The loaded library of C `source`, compiled with `flags` (and `-shared -fPIC`) on first use.

    Args:
        stem (`str`): the cached file's name prefix.
        source (`str`): the C source.
        flags (`list[str]`): compiler flags; libraries to link go last.
        purpose (`str`): what runs instead without it, for the log ("fake quantization runs as torch ops").
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: %s", purpose)
        return None
    identity = f"{platform.machine()} {' '.join(sorted(cpu_flags()))}"
    digest = hashlib.sha256("\0".join([source, *flags, compiler, identity]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("DGQ_KERNEL_CACHE") or Path.home() / ".cache" / "dgq-serve" / "kernels")
    library = cache / f"{stem}_{digest}.so"
    try:
        if not library.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as scratch:
                path = Path(scratch) / f"{stem}.c"
                path.write_text(source)
                built = Path(scratch) / library.name
                subprocess.run(
                    [compiler, "-fPIC", "-shared", "-o", str(built), str(path), *flags],
                    check=True, capture_output=True, timeout=120,
                )  # fmt: skip
                os.replace(built, library)  # atomic: workers building at once each see a whole library
        return ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        log.warning("%s: building its kernel failed: %s %s", purpose, error, detail.decode(errors="replace")[-500:])
        return None
