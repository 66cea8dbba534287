"""One MAG block's decode step (`step.cpp`) and its small-chunk twin (`chunk.cpp`: one
stream's 1 .. W new tokens in one call per layer, memsvc/model/chunk_fast.py) as one C++
extension, for the CPU.

The decoder's step is about 75 small ATen ops per layer, and at a (1, 128) row each
costs its dispatch (1.1-1.5 us, `memsvc bench dispatch`) more than its arithmetic. The
extension keeps the four GEMMs as ATen calls and does everything between them in plain
loops over the rows: two calls per layer. `memsvc/model/decode.py` is its reference
and its caller; tests/kernels/test_decode_step.py holds the two equal.

Compiling takes about a minute the first time (torch caches the build under
~/.cache/torch_extensions), so `module()` never waits for it: the first call starts the
build in a background thread and returns None, and the caller runs the eager step
until the build is ready. `load()` waits (tests, benchmarks). Set
MEMSVC_DECODE_CPP=0 to never build or use it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import structlog

_lock = threading.Lock()
_state: dict[str, object] = {"module": None, "error": None, "thread": None}


def enabled() -> bool:
    return os.environ.get("MEMSVC_DECODE_CPP", "1") != "0"


NAME = "memsvc_decode_step"
BUILD_TIMEOUT_S = 900


def build_directory() -> Path:
    """Where the extension is built and cached: per torch version, under torch's root
    ($TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    tag = torch.__version__.replace("+", "_")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"{NAME}_{tag}"


def _compile() -> ModuleType:
    """Build (or find built) and import the extension, in this process."""
    from torch.utils.cpp_extension import load

    try:  # the `ninja` wheel (a runtime dependency) when no ninja is on the PATH
        import ninja

        os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), ninja.BIN_DIR])
    except ImportError:
        pass
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    # torch's own lock file outlives a process killed while holding it, and then every
    # later `load` waits on it forever. So builders first take a lock the kernel drops
    # when its holder dies; holding it, any torch lock left is a dead builder's.
    with open(directory / "build.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        return load(
            name=NAME,
            sources=[str(Path(__file__).with_name(name)) for name in ("step.cpp", "chunk.cpp")],
            # -ffp-contract=fast: multiply-adds as FMAs (ISO C++ mode turns that off).
            extra_cflags=["-O3", "-march=native", "-ffp-contract=fast"],
            build_directory=str(directory),
            verbose=False,
        )


def _import_built() -> ModuleType:
    """Import the library the build child left, without torch's `load`: that takes the
    build directory's lock even when nothing is to be built, and a process killed while
    holding it (a server under `kill -9`) left a lock on which every later build waited
    (15 minutes, then gave up). Only the build child, in a session of its own, takes it."""
    import torch  # noqa: F401  (the library links against torch's, loaded first)

    path = build_directory() / f"{NAME}.so"
    spec = importlib.util.spec_from_file_location(NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"no extension module at {path}")
    built = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(built)
    return built


def _build() -> None:
    """Compile in a child process of its own session, so a parent that exits (or is
    killed) mid-build leaves no half-built extension or held lock behind, then import."""
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import kernels.decode_step as d; d._compile()"],
            capture_output=True,
            text=True,
            start_new_session=True,
            timeout=BUILD_TIMEOUT_S,
            cwd=Path(__file__).parents[2],
        )
        if done.returncode != 0:
            raise RuntimeError(f"the build failed: {done.stderr.strip()[-400:]}")
        _state["module"] = _import_built()
        seconds = round(time.perf_counter() - started, 1)
        structlog.get_logger().info("decode_cpp_ready", seconds=seconds)
    except Exception as error:  # no compiler or headers: the eager step stays
        _state["error"] = f"{type(error).__name__}: {error}"[:500]
        structlog.get_logger().warning("decode_cpp_unavailable", error=_state["error"])


def module() -> ModuleType | None:
    """The built extension, or None while it builds (started here) or when it cannot."""
    if not enabled():
        return None
    if _state["module"] is not None:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if _state["thread"] is None and _state["error"] is None:
            thread = threading.Thread(target=_build, name="decode-step-build", daemon=True)
            _state["thread"] = thread
            thread.start()
    return _state["module"]  # type: ignore[return-value]


def load() -> ModuleType:
    """The built extension, building it now if needed; RuntimeError when it cannot be."""
    if not enabled():
        raise RuntimeError("MEMSVC_DECODE_CPP=0: the C++ decode step is switched off")
    module()
    thread = _state["thread"]
    if isinstance(thread, threading.Thread):
        thread.join()
    if _state["module"] is None:
        raise RuntimeError(f"the C++ decode step did not build: {_state['error']}")
    return _state["module"]  # type: ignore[return-value]


def error() -> str | None:
    """Why the extension is not available, once a build has failed."""
    return _state["error"]  # type: ignore[return-value]
