"""Run-time compilation of the CUDA backend's kernels, with a disk cache.

The kernels ship as CUDA C++ source and are compiled by NVRTC (through CuPy) for the GPU at hand:
one source serves every architecture and installing needs no CUDA toolkit. A compile takes
seconds, so each CUBIN is kept in the cache folder under a key of everything that changes it (the
source, every header beside it, the name expressions, the options, the architecture, CuPy's and
NVRTC's versions) and is memoised in the process. Processes that need the same CUBIN at once take
a file lock: one compiles, the others load its result.

CuPy is imported only when a kernel is compiled or loaded, so flashdispatch imports without it.

Environment:
    FLASHDISPATCH_CACHE_DIR      the cache folder (default ~/.cache/flashdispatch); CUBINs go in its
                                 `cuda` subfolder
    FLASHDISPATCH_CUDA_INCLUDE   the folder of CUDA's headers (cuda_fp16.h, cuda_bf16.h) for NVRTC,
                                 several separated by os.pathsep; found automatically otherwise
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

from ...cache import cache_dir, write_atomically

try:
    import fcntl
except ImportError:  # Windows: no flock. Processes compiling the same key at once then each compile,
    fcntl = None     # which costs time only: every file is renamed into place whole.

log = logging.getLogger("flashdispatch")

# Files in the source's folder that can change a compile: any of them may be #included.
KEYED_SUFFIXES = (".cu", ".cuh", ".h")
ARCH_OPTIONS = ("--gpu-architecture=", "-arch=")
STD_OPTIONS = ("-std=", "--std=")


@dataclass(frozen=True, eq=False)
class Module:
    """The kernels of one source file, compiled for one architecture and loaded."""

    source: Path
    arch: str  # "sm_90"
    functions: Mapping[str, Any] = field(repr=False)  # name expression -> launchable cupy.RawKernel
    seconds: float  # what the load_module() call that made it took
    from_cache: bool
    cubin: Path  # the file CuPy loaded
    not_cached_because: str = ""  # why a compiled CUBIN could not be kept in the cache folder

    def function(self, name_expression: str):
        try:
            return self.functions[name_expression]
        except KeyError:
            raise KeyError(f"{name_expression!r} was not compiled from {self.source.name}; its name expressions are "
                           f"{', '.join(map(repr, self.functions))}") from None

    def describe(self) -> str:
        if self.from_cache:
            return f"loaded from the disk cache ({self.cubin}) in {self.seconds:.2f} s"
        kept = f"not cached: {self.not_cached_because}" if self.not_cached_because else f"cached in {self.cubin}"
        return f"compiled for {self.arch} in {self.seconds:.1f} s; {kept}"


_modules: dict[tuple, Module] = {}
_modules_lock = threading.Lock()  # threads of one process compile a module once


def load_module(source: Path, name_expressions: Sequence[str], arch: tuple[int, int],
                options: Sequence[str] = ()) -> Module:
    """The kernels `name_expressions` (e.g. "attention_forward<128, true>") of the CUDA source file
    `source`, compiled for compute capability `arch`, or for the architecture an option
    `--gpu-architecture=sm_90a` in `options` names. A repeated call returns the first call's
    Module. Raises RuntimeError with NVRTC's log where the source does not compile."""
    memo_key = _memo_key(source, name_expressions, arch, options)
    module = _modules.get(memo_key)
    if module is None:
        with _modules_lock:
            module = _modules.get(memo_key)
            if module is None:
                module = _modules[memo_key] = _load_or_compile(Path(source).resolve(), memo_key[1], arch,
                                                               tuple(options))
    return module


def loaded(source: Path, name_expressions: Sequence[str], arch: tuple[int, int],
           options: Sequence[str] = ()) -> Module | None:
    """The Module `load_module` made in this process for these arguments, or None: compiles nothing."""
    return _modules.get(_memo_key(source, name_expressions, arch, options))


def _memo_key(source: Path, name_expressions: Sequence[str], arch: tuple[int, int], options: Sequence[str]) -> tuple:
    return source, tuple(sorted(name_expressions)), tuple(arch), tuple(options)


def _load_or_compile(source: Path, names: tuple[str, ...], arch: tuple[int, int], options: tuple[str, ...]) -> Module:
    started = time.perf_counter()
    options = _compile_options(source, arch, options)
    arch_name = _arch_name(options)
    key = _cache_key(source, names, arch_name, options)
    folder = cache_dir() / "cuda"

    def module(functions, cubin: Path, from_cache: bool, not_cached_because: str = "") -> Module:
        return Module(source, arch_name, types.MappingProxyType(functions), time.perf_counter() - started, from_cache,
                      cubin, not_cached_because)

    # Reading needs no lock: the JSON is written after the CUBIN, so a reader that finds it finds both whole.
    functions, _ = _load_cached(folder, key, names)
    if functions is not None:
        return module(functions, folder / f"{key}.cubin", from_cache=True)
    with contextlib.ExitStack() as locked:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            locked.enter_context(_exclusive_lock(folder / f"{key}.lock"))
        except OSError as exc:
            why = f"the cache folder {folder} cannot be written ({exc})"
            log.info("flashdispatch cuda: %s; compiled kernels are kept for this process only", why)
            compiled = _timed_compile(source, names, options)
            return module(*_keep_for_this_process(source, names, arch_name, key, *compiled, why), from_cache=False,
                          not_cached_because=why)
        # Another process may have compiled it while this one waited for the lock.
        functions, damage = _load_cached(folder, key, names)
        if functions is not None:
            return module(functions, folder / f"{key}.cubin", from_cache=True)
        if damage:
            log.info("flashdispatch cuda: the cache entry %s is damaged (%s); compiling it again",
                     folder / f"{key}.json", damage)
        cubin, lowered, seconds = _timed_compile(source, names, options)
        record = {"source": str(source), "arch": arch_name, "lowered_names": lowered, "options": list(options),
                  "compile_seconds": round(seconds, 3), "cubin_sha256": hashlib.sha256(cubin).hexdigest(),
                  **_toolchain_versions()._asdict()}
        try:
            write_atomically(folder / f"{key}.cubin", cubin)
            # Last: a reader that finds the JSON finds the whole CUBIN.
            write_atomically(folder / f"{key}.json", json.dumps(record, indent=1, sort_keys=True))
        except OSError as exc:
            why = f"could not write to the cache folder {folder} ({exc})"
            return module(*_keep_for_this_process(source, names, arch_name, key, cubin, lowered, seconds, why),
                          from_cache=False, not_cached_because=why)
        _log_compiled(source, names, arch_name, seconds, f"cached in {folder / f'{key}.cubin'}")
        return module(_load_cubin(folder / f"{key}.cubin", lowered), folder / f"{key}.cubin", from_cache=False)


def _keep_for_this_process(source: Path, names: tuple[str, ...], arch_name: str, key: str, cubin: bytes,
                           lowered: dict[str, str], seconds: float, why: str) -> tuple[dict[str, Any], Path]:
    path = _private_cubin(key, cubin)
    _log_compiled(source, names, arch_name, seconds, f"not cached: {why}")
    return _load_cubin(path, lowered), path


def _timed_compile(source: Path, names: tuple[str, ...], options: tuple[str, ...]) -> tuple[bytes, dict[str, str], float]:
    started = time.perf_counter()
    cubin, lowered = _nvrtc_compile(source.read_text(), str(source), names, options)
    return cubin, lowered, time.perf_counter() - started


def _log_compiled(source: Path, names: tuple[str, ...], arch_name: str, seconds: float, kept: str) -> None:
    log.info("flashdispatch cuda: compiled %s (%d kernels) for %s in %.2f s; %s", source.name, len(names), arch_name,
             seconds, kept)


def _load_cached(folder: Path, key: str, names: tuple[str, ...]) -> tuple[dict[str, Any] | None, str]:
    """The cached kernels, loaded; or None and what is wrong with the entry ("" where there is none)."""
    record_path, cubin_path = folder / f"{key}.json", folder / f"{key}.cubin"
    if not record_path.exists():
        return None, ""
    try:
        record = json.loads(record_path.read_text())
        if hashlib.sha256(cubin_path.read_bytes()).hexdigest() != record["cubin_sha256"]:
            raise ValueError("the CUBIN is not the one recorded")
        lowered = {name: record["lowered_names"][name] for name in names}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    try:
        return _load_cubin(cubin_path, lowered), ""
    except Exception as exc:  # noqa: BLE001 - whatever stops a cached CUBIN from loading, compiling it again cures
        return None, f"CuPy could not load it: {type(exc).__name__}: {exc}"


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            except OSError:  # a file system without locks (some network ones): compiling twice costs time only
                pass
        yield  # closing the file releases the lock


@functools.lru_cache(maxsize=1)
def _private_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="flashdispatch-cuda-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _private_cubin(key: str, cubin: bytes) -> Path:
    """A CUBIN that the cache folder cannot hold, in a temporary folder of this process's own. It
    is a file, not bytes in memory, because CuPy reads the file again for each further GPU."""
    try:
        path = _private_folder() / f"{key}.cubin"
        path.write_bytes(cubin)
    except OSError as exc:
        raise RuntimeError(f"flashdispatch cuda: nowhere to write a compiled CUBIN: neither the cache folder "
                           f"{cache_dir() / 'cuda'} nor a temporary folder can be written ({exc})") from exc
    return path


def _compile_options(source: Path, arch: tuple[int, int], options: Sequence[str]) -> tuple[str, ...]:
    """NVRTC's options: a real architecture (NVRTC makes a CUBIN only for one), C++17, the source's
    folder and CUDA's headers on the include path, then `options`, which may name their own
    architecture or standard instead."""
    defaults = []
    if not any(option.startswith(ARCH_OPTIONS) for option in options):
        defaults.append(f"--gpu-architecture=sm_{arch[0]}{arch[1]}")
    if not any(option.startswith(STD_OPTIONS) for option in options):
        defaults.append("-std=c++17")
    includes = [str(source.parent), *_cuda_include_dirs()]
    return (*defaults, *(f"-I{folder}" for folder in includes), *options)


def _arch_name(options: Sequence[str]) -> str:
    arch_option = next(option for option in reversed(options) if option.startswith(ARCH_OPTIONS))
    return arch_option.split("=", 1)[1]


def _cache_key(source: Path, names: Sequence[str], arch_name: str, options: Sequence[str]) -> str:
    """The source's stem and a hash of everything that changes its CUBIN."""
    inputs = {
        "source": hashlib.sha256(source.read_bytes()).hexdigest(),
        "folder": {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                   for path in sorted(source.parent.iterdir()) if path.suffix in KEYED_SUFFIXES and path.is_file()},
        "names": sorted(names),
        "options": list(options),
        "arch": arch_name,
        **_toolchain_versions()._asdict(),
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return f"{source.stem}-{digest[:32]}"


class _Versions(NamedTuple):
    cupy: str
    nvrtc: str


@functools.lru_cache(maxsize=1)
def _toolchain_versions() -> _Versions:
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    return _Versions(cupy.__version__, ".".join(map(str, nvrtc.getVersion())))


@functools.lru_cache(maxsize=1)
def _cuda_include_dirs() -> tuple[str, ...]:
    """The folder of CUDA's headers that matches NVRTC's version best (its CCCL subfolder with it,
    where there is one: CUDA 13's cuda_fp16.h includes <nv/target> from there), or none found.
    NVRTC needs it for <cuda_fp16.h> and <cuda_bf16.h>."""
    override = os.environ.get("FLASHDISPATCH_CUDA_INCLUDE")
    if override:
        return tuple(folder for folder in override.split(os.pathsep) if folder)
    found = [folder for folder in _candidate_include_dirs() if (folder / "cuda_fp16.h").is_file()]
    if not found:
        return ()
    nvrtc = _toolchain_versions().nvrtc

    def closeness(folder: Path) -> tuple[bool, bool]:
        version = _cuda_runtime_version(folder)
        return version == nvrtc, version.split(".")[0] == nvrtc.split(".")[0]

    best = max(found, key=closeness)  # the first of equals: the order of _candidate_include_dirs
    return (str(best), *([str(best / "cccl")] if (best / "cccl").is_dir() else []))


def _candidate_include_dirs() -> list[Path]:
    """CUDA's include folders: from the NVIDIA wheels beside CuPy first, then the toolkit CuPy uses."""
    folders = []
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        folders += [Path(root) / part / "include" for part in ("cuda_runtime", "cu13", "cu12")]
    try:
        import cupy

        toolkit = cupy.cuda.get_cuda_path()
    except Exception:  # noqa: BLE001 - no CuPy, or it finds no toolkit: the wheels' headers or none
        toolkit = None
    for root in (toolkit, os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            folders.append(Path(root) / "include")
    return folders


def _cuda_runtime_version(include: Path) -> str:
    """"12.8" from CUDART_VERSION in cuda_runtime_api.h; "" where it cannot be read."""
    try:
        match = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", (include / "cuda_runtime_api.h").read_text())
    except OSError:
        return ""
    return f"{int(match[1]) // 1000}.{int(match[1]) % 1000 // 10}" if match else ""


def _nvrtc_compile(source_text: str, file_name: str, name_expressions: Sequence[str],
                   options: Sequence[str]) -> tuple[bytes, dict[str, str]]:
    """The CUBIN and each name expression's lowered (mangled) name. Raises RuntimeError with
    NVRTC's log."""
    from cupy_backends.cuda.libs import nvrtc

    # CuPy 13 spells it addNameExpression; older releases addAddNameExpression.
    add_name_expression = getattr(nvrtc, "addNameExpression", None) or nvrtc.addAddNameExpression
    program = nvrtc.createProgram(source_text, file_name, (), ())
    try:
        for name in name_expressions:
            add_name_expression(program, name)
        try:
            nvrtc.compileProgram(program, list(options))
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"flashdispatch cuda: NVRTC could not compile {file_name} ({exc}); options: "
                               f"{' '.join(options)}\n{nvrtc.getProgramLog(program)}") from None
        warnings = nvrtc.getProgramLog(program).strip()
        if warnings:
            log.debug("flashdispatch cuda: NVRTC's log for %s:\n%s", file_name, warnings)
        lowered = {name: nvrtc.getLoweredName(program, name) for name in name_expressions}
        return nvrtc.getCUBIN(program), lowered
    finally:
        nvrtc.destroyProgram(program)


def _load_cubin(path: Path, lowered: Mapping[str, str]) -> dict[str, Any]:
    """Each name expression's kernel. RawModule.get_function loads the CUBIN onto the current
    device, so a CUBIN that does not load raises here, not at the first launch."""
    import cupy

    module = cupy.RawModule(path=str(path))
    return {name: module.get_function(mangled) for name, mangled in lowered.items()}
