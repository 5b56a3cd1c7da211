"""The C kernels in csrc/, compiled on first use for this machine and loaded with ctypes.

Compiled with the system C compiler (`$CC`, else `cc`) at -O3 -march=native with
OpenMP into a cache directory (`$LORAMUX_KERNEL_CACHE`, else
~/.cache/loramux/kernels), keyed by the source, the flags, the compiler and the
CPU, so a second start only loads the file. torch is imported first, so the
library shares torch's OpenMP runtime (one thread pool, not two fighting over
the cores). `LORAMUX_NATIVE_KERNELS=0` turns the kernels off; without a working
compiler loramux falls back to the torch ops and logs why, once.
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
from pathlib import Path

import torch  # noqa: F401  (loaded first: its libgomp is the one the kernels bind to)

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# -fno-trapping-math: nothing here reads floating-point exception flags, and without
# it GCC will not if-convert (so not vectorize) loops with floating-point selects.
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
if platform.machine() in ("x86_64", "AMD64"):
    # GCC keeps 256-bit vectors on AVX-512 parts unless told; the kernels' loops
    # are long, unit-stride and memory-bound, where full width measures faster.
    FLAGS.append("-mprefer-vector-width=512")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# name → argtypes of every exported function
SIGNATURES = {
    "lmx_lora_add_f32": [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64],
    "lmx_lora_add_f32_step": [_PTR, _PTR, _PTR, _I64, _PTR, _I64],
    "lmx_set_sgemm": [_PTR],
    "lmx_linear_lora_f32": [_PTR, _PTR],
    "lmx_kth_largest_abs_f32": [_PTR, _I64, _I64, _I64, _PTR, _PTR],
    "lmx_ties_merge_f32": [_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR],
    "lmx_paged_attention_f32": [_PTR, _PTR, _PTR, ctypes.c_double, ctypes.c_double],
    "lmx_attention_tiled": [],
    "lmx_rmsnorm_f32": [_I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_double, _I64],
    "lmx_add_rmsnorm_f32": [_I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_double, _I64],
    "lmx_rope_f32": [_I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64],
    "lmx_silu_mul_f32": [_I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64],
}
RESTYPES = {"lmx_attention_tiled": ctypes.c_int}  # the rest return nothing

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    env = os.environ.get("LORAMUX_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "loramux" / "kernels"


def enabled() -> bool:
    return os.environ.get("LORAMUX_NATIVE_KERNELS", "1") not in ("0", "false", "no")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's feature flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def build(name: str) -> Path:
    """Compile csrc/<name>.c for this machine (or find it in the cache); its path."""
    src = CSRC / f"{name}.c"
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\n".join([src.read_text(), " ".join(FLAGS), version, _cpu_id()]).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([cc, *FLAGS, str(src), "-o", str(tmp_out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {src.name} failed:\n{proc.stderr.strip()}")
        os.replace(tmp_out, out)  # atomic: a concurrent build finds a whole file or none
    return out


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library `name` with its signatures set, or None (disabled, or
    it cannot be built here: logged once, callers use the torch ops)."""
    with _lock:
        if name not in _loaded:
            _loaded[name] = _try_load(name)
        return _loaded[name]


def _try_load(name: str) -> ctypes.CDLL | None:
    if not enabled():
        log.info("native kernels disabled by LORAMUX_NATIVE_KERNELS")
        return None
    try:
        lib = ctypes.CDLL(str(build(name)))
    except (OSError, RuntimeError) as e:
        log.warning("native CPU kernels unavailable, using torch ops instead: %s", e)
        return None
    for fn, argtypes in SIGNATURES.items():
        if hasattr(lib, fn):
            getattr(lib, fn).argtypes = argtypes
            getattr(lib, fn).restype = RESTYPES.get(fn)
    return lib


def build_all() -> list[Path]:
    """Build every kernel in csrc/ ahead of time (set-up runs this)."""
    return [build(src.stem) for src in sorted(CSRC.glob("*.c"))]
