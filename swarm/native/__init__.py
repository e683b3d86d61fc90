"""Optional native kernels, compiled on this machine the first time they are needed.

The int8 codec is a few passes over memory in torch; in C it is one pass per 256-value block and 3-9x faster. We
ship the C source, compile it with the system's C compiler on first use (about half a second) into a per-user cache,
and load it with ctypes, which releases the GIL during the call. Without a compiler, or if the build fails, the
codec stays on its numpy/torch path: every machine still decodes the same bytes to the same bits, since decoding is
one table lookup and one IEEE float32 multiply on either path.

Set SWARM_NATIVE=0 to never build or load native code.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sqblock.c")
# -march=native: the library is built for, and cached per, the CPU it runs on. No -ffast-math, and no contraction
# into fused multiply-adds: results must be the IEEE float32 operations the source spells out.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def _cache_dir() -> str:
    base = os.environ.get("SWARM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "swarm"
    )
    return os.path.join(base, "native")


def _build(compiler: str, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, "-o", tmp, _SOURCE, "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)  # atomic: processes building at the same time each install a whole library
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sqblock() -> ctypes.CDLL | None:
    """The native int8-sqblock kernels (encode, decode, accumulate, reduce, decode_dots), or None if unavailable."""
    with _lock:
        if "sqblock" in _loaded:
            return _loaded["sqblock"]
        lib = None
        if os.environ.get("SWARM_NATIVE", "1") != "0":
            try:
                lib = _load()
            except Exception as e:
                logger.info(f"native int8 codec unavailable ({e}); using the torch/numpy codec (same results)")
        _loaded["sqblock"] = lib
        return lib


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found")
    with open(_SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + version.encode() + _cpu_signature().encode())
    target = os.path.join(_cache_dir(), f"sqblock-{key.hexdigest()[:16]}.so")
    if not os.path.exists(target):
        _build(compiler, target)
    lib = ctypes.CDLL(target)
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    lib.sqblock_encode.argtypes = [ptr, i64, i32, ptr, ptr]
    lib.sqblock_encode.restype = None
    lib.sqblock_decode.argtypes = [ptr, ptr, i64, i32, ptr]
    lib.sqblock_decode.restype = None
    lib.sqblock_accumulate.argtypes = [ptr, ptr, i64, i32, ctypes.c_float, ptr]
    lib.sqblock_accumulate.restype = None
    lib.sqblock_reduce.argtypes = [i32, ptr, ptr, ptr, ptr, i64, i32, ptr, ptr, ptr]
    lib.sqblock_reduce.restype = None
    lib.sqblock_decode_dots.argtypes = [ptr, ptr, i64, i32, ptr, ptr, ptr]
    lib.sqblock_decode_dots.restype = None
    return lib
