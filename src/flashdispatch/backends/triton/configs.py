"""Launch configurations of the Triton kernels, and the tuner that picks one per shape bucket.

Each kernel has a short list of candidate configurations per GPU generation and head-dim class,
pruned from a sweep on the H100 (`scripts/sweep_triton.py`, numbers in `docs/notes/triton.md`);
the first of each list is the best measured there. On the first call in a shape bucket the tuner
times every candidate on the caller's own tensors and keeps the fastest for the bucket, so a new
sequence length in the same bucket reuses the choice. It logs the compile and tuning time, and
`notes()` shows them in `explain()`.

Tuned choices are also kept on disk (`triton-tuning.json` in the cache folder), keyed by GPU
model, Triton version and a hash of the kernels' source, so a later process compiles only the
chosen configuration and times nothing.

Environment:
    FLASHDISPATCH_CACHE_DIR           the cache folder (default ~/.cache/flashdispatch)
    FLASHDISPATCH_TRITON_AUTOTUNE=0   take the first candidate without timing (no tuning runs)
    FLASHDISPATCH_TRITON_CONFIG       force configurations, e.g. "forward=128,64,8,3,tma;dq=64,64,4,3"
                                      (BLOCK_M, BLOCK_N, num_warps, num_stages, and for the forward
                                      the optional flags tma and gluon), for experiments
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ...cache import cache_dir, write_atomically
from ...dispatcher.capabilities import Capabilities, triton_interpreting
from ...dispatcher.problem import Problem
from ...timing import median_time

log = logging.getLogger("flashdispatch")

KERNELS = ("forward", "decode", "dkdv", "dq")
TUNING_REPEATS = 5


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Forward and decode, sm90 and later: K and V through TMA tensor descriptors (plain loads
    # where strides or head dims do not allow a descriptor).
    tma: bool = False
    # Forward only, sm90: the Gluon kernel of `hopper.py` (TMA, asynchronous wgmma, softmax under
    # the P V product) where it takes the problem; this config's plain kernel elsewhere.
    gluon: bool = False

    def __str__(self) -> str:
        flags = "".join(f" {name}" for name in FLAGS if getattr(self, name))
        return f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.num_warps} stages={self.num_stages}{flags}"


FLAGS = ("tma", "gluon")  # Config's optional forward flags, as FLASHDISPATCH_TRITON_CONFIG spells them


def _c(*values: int) -> Config:
    return Config(*values)


# Candidates, best first, keyed by (kernel, generation, head-dim class). Generation "sm90" is
# Hopper (wgmma: 128-row tiles over 8 warps pay), "sm80" is Ampere and Ada (mma.sync, less
# shared memory: smaller tiles and fewer stages). Head-dim classes: "64" up to 64, "128" up to
# 128, "256" above. Decode tiles have BLOCK_M set by the launcher (the packed query rows).
CANDIDATES: dict[tuple[str, str, str], list[Config]] = {
    ("forward", "sm90", "64"): [_c(128, 64, 4, 4), _c(128, 64, 4, 3), _c(64, 64, 4, 3), _c(64, 128, 4, 3)],
    ("forward", "sm90", "128"): [_c(128, 128, 8, 3), _c(64, 64, 4, 3), _c(128, 64, 8, 3)],
    ("forward", "sm90", "256"): [_c(64, 64, 4, 2), _c(128, 32, 8, 2), _c(64, 32, 4, 3)],
    ("forward", "sm80", "64"): [_c(128, 64, 4, 3), _c(64, 64, 4, 3), _c(128, 32, 4, 3)],
    ("forward", "sm80", "128"): [_c(128, 64, 4, 2), _c(128, 32, 4, 3), _c(64, 64, 4, 3)],
    ("forward", "sm80", "256"): [_c(64, 64, 4, 2), _c(64, 32, 4, 2)],
    ("decode", "sm90", "64"): [_c(16, 128, 8, 3)],
    ("decode", "sm90", "128"): [Config(16, 128, 4, 2, tma=True), _c(16, 128, 8, 3)],
    ("decode", "sm90", "256"): [_c(16, 64, 4, 3)],
    ("decode", "sm80", "64"): [_c(16, 128, 4, 3)],
    ("decode", "sm80", "128"): [_c(16, 64, 4, 3)],
    ("decode", "sm80", "256"): [_c(16, 64, 4, 2)],
    ("dkdv", "sm90", "64"): [_c(32, 128, 4, 3), _c(64, 64, 4, 3), _c(32, 64, 4, 4)],
    ("dkdv", "sm90", "128"): [_c(64, 128, 8, 3), _c(32, 64, 4, 3), _c(32, 128, 8, 3)],
    ("dkdv", "sm90", "256"): [_c(32, 64, 4, 2), _c(16, 64, 4, 2)],
    ("dkdv", "sm80", "64"): [_c(64, 64, 4, 3), _c(32, 128, 4, 2)],
    ("dkdv", "sm80", "128"): [_c(64, 64, 4, 2), _c(32, 64, 4, 3)],
    ("dkdv", "sm80", "256"): [_c(32, 64, 4, 2), _c(16, 64, 4, 2)],
    ("dq", "sm90", "64"): [_c(64, 64, 4, 3), _c(128, 32, 4, 3), _c(64, 128, 4, 3)],
    ("dq", "sm90", "128"): [_c(128, 64, 8, 3), _c(64, 32, 4, 3), _c(64, 64, 4, 3)],
    ("dq", "sm90", "256"): [_c(64, 32, 4, 2), _c(32, 32, 4, 2)],
    ("dq", "sm80", "64"): [_c(64, 64, 4, 3), _c(128, 32, 4, 2)],
    ("dq", "sm80", "128"): [_c(64, 64, 4, 2), _c(64, 32, 4, 3)],
    ("dq", "sm80", "256"): [_c(64, 32, 4, 2), _c(32, 32, 4, 2)],
}
FLOAT32 = Config(32, 32, 4, 2)  # float32 tiles take twice the memory: one small tile
INTERPRETER = Config(64, 64, 4, 1)
GLUON = Config(128, 128, 8, 2, gluon=True)  # hopper.py's fixed tile  # the tests' sequences (up to 129) still span several blocks


def _generation(caps: Capabilities) -> str:
    cc = caps.compute_capability
    return "sm90" if cc is not None and cc >= (9, 0) else "sm80"


def _dim_class(problem: Problem) -> str:
    dim = max(problem.head_dim, problem.head_dim_v)
    return "64" if dim <= 64 else "128" if dim <= 128 else "256"


def _length_bucket(n: int) -> int:
    """Sequence lengths tune together within a factor of 4: 1k, 4k, 16k, ... (upper bounds)."""
    bucket = 1024
    while bucket < n:
        bucket *= 4
    return bucket


def candidates(kernel: str, problem: Problem, caps: Capabilities) -> list[Config]:
    if triton_interpreting():
        return [INTERPRETER]
    if problem.dtype == torch.float32:
        return [FLOAT32]
    options = CANDIDATES[(kernel, _generation(caps), _dim_class(problem))]
    if kernel == "forward" and _generation(caps) == "sm90" and not hopper_reasons(problem):
        options = [GLUON] + options
    return options


def hopper_reasons(problem: Problem) -> list[str]:
    """Why the Gluon forward of `hopper.py` does not take `problem` (empty: it does)."""
    try:
        from . import hopper
    except Exception as exc:  # noqa: BLE001 - Gluon is experimental: its API moves between releases
        return [f"Triton's Gluon API does not import ({type(exc).__name__}: {exc})"]
    return hopper.problem_reasons(problem)


def bucket(kernel: str, problem: Problem, caps: Capabilities) -> tuple:
    """Problems in one bucket share a tuned configuration."""
    masked = problem.causal or problem.window_left >= 0 or problem.window_right >= 0
    return (kernel, caps.device, problem.dtype, problem.head_dim, problem.head_dim_v, masked,
            bool(problem.softcap), problem.varlen, problem.group_size > 1,
            _length_bucket(problem.seqlen_q), _length_bucket(problem.seqlen_k))


# The last FLASHDISPATCH_TRITON_CONFIG text parsed, and what it parsed to: every kernel launch asks,
# and the variable seldom changes, so it is parsed again only when its text differs (a bad text is
# not kept: it raises on every call, as before).
_forced_parsed: tuple[str, types.MappingProxyType] = ("", types.MappingProxyType({}))


def _forced() -> types.MappingProxyType:
    """Configurations forced by FLASHDISPATCH_TRITON_CONFIG, by kernel (read-only)."""
    global _forced_parsed
    text = os.environ.get("FLASHDISPATCH_TRITON_CONFIG", "")
    if text == _forced_parsed[0]:
        return _forced_parsed[1]
    forced = types.MappingProxyType(_parse_forced(text))
    _forced_parsed = (text, forced)
    return forced


def _parse_forced(text: str) -> dict[str, Config]:
    text = text.strip()
    forced = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kernel, _, values = item.partition("=")
        kernel = kernel.strip()
        fields = [x.strip() for x in values.split(",")]
        flags = set(fields[4:])
        try:
            numbers = [int(x) for x in fields[:4]]
            if kernel not in KERNELS or len(numbers) != 4 or not flags <= set(FLAGS):
                raise ValueError
        except ValueError:
            raise ValueError(f"FLASHDISPATCH_TRITON_CONFIG: expected 'kernel=BLOCK_M,BLOCK_N,warps,stages"
                             f"[,tma][,gluon]' with kernel one of {', '.join(KERNELS)}; got {item!r}") from None
        forced[kernel] = Config(*numbers, **{name: name in flags for name in FLAGS})
    return forced


@dataclass(frozen=True)
class Choice:
    config: Config
    how: str  # "only candidate", "first candidate (autotuning off)", "tuned ...", "tuned on an earlier run ..."


@functools.lru_cache(maxsize=1)
def _kernels_fingerprint() -> str:
    """Triton's version and a hash of the kernels' source: a tuned choice is only valid for both."""
    import triton

    source = (Path(__file__).parent / "kernels.py").read_bytes() + Path(__file__).read_bytes()
    return f"triton {triton.__version__}, kernels {hashlib.sha256(source).hexdigest()[:16]}"


def _disk_key(bucket_key: tuple, caps: Capabilities) -> str:
    kernel, _device, *shape = bucket_key
    return " | ".join([caps.name, str(caps.compute_capability), _kernels_fingerprint(), kernel] + [str(x) for x in shape])


class TuningCache:
    """Tuned choices on disk (one JSON file); unreadable or unwritable files only cost a re-tuning."""

    FILE = "triton-tuning.json"

    def path(self) -> Path:
        return cache_dir() / self.FILE

    def _load(self) -> dict:
        try:
            data = json.loads(self.path().read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> Config | None:
        entry = self._load().get(key)
        try:
            return Config(*entry) if entry is not None else None
        except TypeError:
            return None

    def put(self, key: str, config: Config) -> None:
        path = self.path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = self._load()
            data[key] = list(dataclasses.astuple(config))
            write_atomically(path, json.dumps(data, indent=0, sort_keys=True))
        except OSError as exc:
            log.info("flashdispatch triton: could not save a tuned configuration to %s (%s)", path, exc)


class Tuner:
    """Remembers one configuration per bucket; times the candidates on the first call of a bucket."""

    def __init__(self, disk: TuningCache | None = None):
        self._chosen: dict[tuple, Choice] = {}
        self.disk = disk or TuningCache()

    def clear(self) -> None:
        self._chosen.clear()

    def known(self, kernel: str, problem: Problem, caps: Capabilities) -> Choice | None:
        return self._chosen.get(bucket(kernel, problem, caps))

    def choose(self, kernel: str, problem: Problem, caps: Capabilities, launch) -> Config:
        """The configuration for `kernel` on `problem`; `launch(config)` runs the kernel once, and
        `launch(config, compile_only=True)` only compiles it."""
        forced = _forced().get(kernel)
        if forced is not None:
            return forced
        key = bucket(kernel, problem, caps)
        choice = self._chosen.get(key)
        if choice is None:
            choice = self._tune(kernel, problem, caps, launch)
            self._chosen[key] = choice
        return choice.config

    def _tune(self, kernel: str, problem: Problem, caps: Capabilities, launch) -> Choice:
        options = candidates(kernel, problem, caps)
        if triton_interpreting():
            return Choice(options[0], "the interpreter's configuration")
        autotune = os.environ.get("FLASHDISPATCH_TRITON_AUTOTUNE", "1") != "0"
        if len(options) > 1 and autotune:
            key = _disk_key(bucket(kernel, problem, caps), caps)
            saved = self.disk.get(key)
            if saved in options:
                return Choice(saved, f"tuned on an earlier run on this GPU (saved in {self.disk.path()})")
        if len(options) == 1 or not autotune:
            seconds = self._first_run(launch, options[0])
            why = "only candidate" if len(options) == 1 else "first candidate (autotuning off)"
            log.info("flashdispatch triton: %s kernel for %s: %s, %s; first call %.1f s with compilation",
                     kernel, problem.describe(), options[0], why, seconds)
            return Choice(options[0], f"{why}; first call {seconds:.1f} s with compilation")
        timings = {}
        started = time.perf_counter()
        self._compile_all(launch, options)
        first_runs = time.perf_counter() - started  # compiling, then each candidate's first run
        for config in options:
            try:
                first_runs += self._first_run(launch, config)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory on a smaller GPU
                log.info("flashdispatch triton: %s %s failed to run (%s: %s); skipped", kernel, config,
                         type(exc).__name__, exc)
                continue
            timings[config] = self._median_seconds(launch, config)
        if not timings:
            raise RuntimeError(f"no Triton configuration of the {kernel} kernel runs on {caps.name}")
        best = min(timings, key=timings.get)
        total = time.perf_counter() - started
        how = (f"tuned over {len(options)} candidates on the first call of its shape bucket "
               f"({total:.1f} s, of which {first_runs:.1f} s compiling and first runs); {timings[best] * 1e6:.0f} us")
        log.info("flashdispatch triton: %s kernel for %s: %s, %s", kernel, problem.describe(), best, how)
        self.disk.put(key, best)
        return Choice(best, how)

    @staticmethod
    def _compile_all(launch, options: list[Config]) -> None:
        """Compile every candidate at once: Triton's asynchronous compile mode runs the compilers in
        worker threads (ptxas in subprocesses), several times faster than one after another on a
        many-core host. Best effort: any candidate not compiled here compiles on its first run."""
        try:
            from triton.runtime._async_compile import AsyncCompileMode  # private, Triton 3.5 and later
        except ImportError:
            return
        try:
            with ThreadPoolExecutor(len(options)) as pool, AsyncCompileMode(pool, ignore_errors=True):
                for config in options:
                    launch(config, compile_only=True)
        except Exception as exc:  # noqa: BLE001 - fall back to compiling on each first run
            log.info("flashdispatch triton: compiling the candidates together failed (%s: %s); one by one instead",
                     type(exc).__name__, exc)

    @staticmethod
    def _first_run(launch, config: Config) -> float:
        """Seconds of the first launch, compilation included (a cache hit loads in milliseconds)."""
        started = time.perf_counter()
        launch(config)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    @staticmethod
    def _median_seconds(launch, config: Config) -> float:
        """Median GPU seconds of a launch, its host time hidden (`median_time(hide_host=True)`):
        otherwise a candidate with a costlier launch path (the Gluon kernel builds tensor
        descriptors) loses on short problems for its host time."""
        return median_time(lambda: launch(config), "cuda", warmup=0, repeats=TUNING_REPEATS, flush_l2=False,
                           hide_host=True)


TUNER = Tuner()
