"""The CUDA backend's compiler and disk cache, on the CPU: NVRTC and CuPy are replaced by fakes
(`FakeToolchain` for load_module; a fake `cupy_backends.cuda.libs.nvrtc` module for the NVRTC calls)."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
import types
from pathlib import Path

import pytest

from flashdispatch import cache
from flashdispatch.backends.cuda import compiler

NAMES = ("attention_forward<64>", "attention_forward<128>")


class FakeToolchain:
    """Stands in for NVRTC and CuPy. A "CUBIN" names its source and options; a loaded "kernel" is
    (the file loaded, its lowered name). `counter`, a file, gets a line per compile from any process."""

    def __init__(self, compile_seconds: float = 0.0, counter: Path | None = None):
        self.compile_seconds = compile_seconds
        self.counter = counter
        self.compiles: list[tuple[str, tuple[str, ...]]] = []  # (file name, options)
        self.loads: list[Path] = []

    def install(self, patch) -> FakeToolchain:
        patch(compiler, "_nvrtc_compile", self.nvrtc_compile)
        patch(compiler, "_load_cubin", self.load_cubin)
        patch(compiler, "_toolchain_versions", lambda: compiler._Versions("13.4.1", "12.8"))
        patch(compiler, "_cuda_include_dirs", lambda: ())
        return self

    def nvrtc_compile(self, source_text, file_name, name_expressions, options):
        if self.counter is not None:
            with open(self.counter, "a") as f:
                f.write(f"{os.getpid()}\n")
        time.sleep(self.compile_seconds)
        self.compiles.append((file_name, tuple(options)))
        cubin = f"CUBIN of {Path(file_name).name}: {source_text!r} {list(options)}".encode()
        return cubin, {name: f"_Z{len(name)}{name}" for name in name_expressions}

    def load_cubin(self, path, lowered):
        cubin = Path(path).read_bytes()
        if not cubin.startswith(b"CUBIN of "):
            raise RuntimeError("CUDA_ERROR_INVALID_IMAGE")
        self.loads.append(Path(path))
        return {name: (str(path), mangled) for name, mangled in lowered.items()}


@pytest.fixture(autouse=True)
def fresh_memo():
    compiler._modules.clear()
    yield
    compiler._modules.clear()


@pytest.fixture
def kernels(tmp_path) -> Path:
    folder = tmp_path / "kernels"
    folder.mkdir()
    (folder / "common.cuh").write_text("#pragma once\nconstexpr int WARP = 32;\n")
    (folder / "forward.cu").write_text('#include "common.cuh"\ntemplate <int D> __global__ void attention_forward() {}\n')
    (folder / "notes.md").write_text("not a source file")
    return folder


@pytest.fixture
def fake(monkeypatch) -> FakeToolchain:
    return FakeToolchain().install(monkeypatch.setattr)


def cache_entries(tmp_path: Path) -> list[str]:
    """The cache's file names, lock files aside."""
    folder = tmp_path / "flashdispatch-cache" / "cuda"  # conftest points FLASHDISPATCH_CACHE_DIR there
    return sorted(path.name for path in folder.iterdir() if path.suffix != ".lock") if folder.exists() else []


def test_compiles_once_then_memoises_then_loads_from_disk(kernels, fake, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flashdispatch")
    assert compiler.loaded(kernels / "forward.cu", NAMES, (9, 0)) is None  # looks up, compiles nothing
    assert not fake.compiles
    first = compiler.load_module(kernels / "forward.cu", NAMES, (9, 0))
    assert compiler.loaded(kernels / "forward.cu", list(reversed(NAMES)), (9, 0)) is first
    assert len(fake.compiles) == 1 and not first.from_cache
    assert first.arch == "sm_90"
    assert first.function("attention_forward<128>") == (str(first.cubin), "_Z22attention_forward<128>")
    stem = first.cubin.stem
    assert stem.startswith("forward-") and cache_entries(tmp_path) == [f"{stem}.cubin", f"{stem}.json"]
    assert first.describe().startswith("compiled for sm_90 in 0.0 s; cached in ")
    assert str(first.cubin) in first.describe()
    logged = [r.getMessage() for r in caplog.records if "compiled forward.cu" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith("flashdispatch cuda: compiled forward.cu (2 kernels) for sm_90 in ")
    assert logged[0].endswith(f"; cached in {first.cubin}")
    record = json.loads(first.cubin.with_suffix(".json").read_text())
    assert record["lowered_names"] == {name: f"_Z{len(name)}{name}" for name in NAMES}
    assert (record["arch"], record["cupy"], record["nvrtc"]) == ("sm_90", "13.4.1", "12.8")
    assert record["cubin_sha256"] == hashlib.sha256(first.cubin.read_bytes()).hexdigest()
    assert isinstance(record["compile_seconds"], float)

    again = compiler.load_module(kernels / "forward.cu", list(reversed(NAMES)), (9, 0))
    assert again is first and len(fake.compiles) == 1 and len(fake.loads) == 1

    compiler._modules.clear()
    loaded = compiler.load_module(kernels / "forward.cu", NAMES, (9, 0))
    assert len(fake.compiles) == 1 and len(fake.loads) == 2
    assert loaded.from_cache and loaded.cubin == first.cubin
    assert loaded.describe().startswith(f"loaded from the disk cache ({first.cubin}) in ")
    assert loaded.function("attention_forward<64>") == (str(first.cubin), "_Z21attention_forward<64>")
    with pytest.raises(KeyError, match="'attention_forward<32>' was not compiled from forward.cu"):
        loaded.function("attention_forward<32>")


def test_options_name_the_architecture_the_standard_and_the_include_folders(kernels, fake, monkeypatch):
    monkeypatch.setattr(compiler, "_cuda_include_dirs", lambda: ("/opt/cuda/include",))
    compiler.load_module(kernels / "forward.cu", NAMES, (8, 0), options=("-DNDEBUG",))
    file_name, options = fake.compiles[-1]
    assert file_name == str(kernels / "forward.cu")
    assert options == ("--gpu-architecture=sm_80", "-std=c++17", f"-I{kernels}", "-I/opt/cuda/include", "-DNDEBUG")
    # An architecture or standard of the caller's replaces the default.
    module = compiler.load_module(kernels / "forward.cu", NAMES, (9, 0), options=("--gpu-architecture=sm_90a", "-std=c++20"))
    assert fake.compiles[-1][1] == (f"-I{kernels}", "-I/opt/cuda/include", "--gpu-architecture=sm_90a", "-std=c++20")
    assert module.arch == "sm_90a" and module.describe().startswith("compiled for sm_90a in ")


def edit_source(kernels, call):
    (kernels / "forward.cu").write_text((kernels / "forward.cu").read_text() + "// edited\n")


def edit_header(kernels, call):
    (kernels / "common.cuh").write_text("#pragma once\nconstexpr int WARP = 64;\n")


def add_header(kernels, call):
    (kernels / "tiles.h").write_text("#pragma once\n")


def other_arch(kernels, call):
    call["arch"] = (8, 0)


def other_options(kernels, call):
    call["options"] = ("-DCAUSAL=1",)


def other_names(kernels, call):
    call["name_expressions"] = NAMES + ("attention_forward<256>",)


def reorder_names(kernels, call):
    call["name_expressions"] = tuple(reversed(NAMES))


def edit_other_file(kernels, call):
    (kernels / "notes.md").write_text("edited, but no source includes it")


@pytest.mark.parametrize("change, recompiles", [
    (edit_source, True), (edit_header, True), (add_header, True), (other_arch, True), (other_options, True),
    (other_names, True), (reorder_names, False), (edit_other_file, False),
], ids=lambda x: x.__name__ if callable(x) else str(x))
def test_the_cache_key_covers_what_changes_the_cubin(kernels, fake, tmp_path, change, recompiles):
    call = {"source": kernels / "forward.cu", "name_expressions": NAMES, "arch": (9, 0), "options": ()}
    compiler.load_module(**call)
    change(kernels, call)
    compiler._modules.clear()
    module = compiler.load_module(**call)
    assert len(fake.compiles) == (2 if recompiles else 1)
    assert module.from_cache is not recompiles
    assert len(cache_entries(tmp_path)) == (4 if recompiles else 2)


def corrupt_json(cubin: Path):
    cubin.with_suffix(".json").write_text("{not json")


def delete_cubin(cubin: Path):
    cubin.unlink()


def truncate_cubin(cubin: Path):
    cubin.write_bytes(cubin.read_bytes()[:10])


def drop_a_lowered_name(cubin: Path):
    record = json.loads(cubin.with_suffix(".json").read_text())
    del record["lowered_names"][NAMES[0]]
    cubin.with_suffix(".json").write_text(json.dumps(record))


def cubin_that_does_not_load(cubin: Path):
    cubin.write_bytes(b"garbage")
    record = json.loads(cubin.with_suffix(".json").read_text())
    record["cubin_sha256"] = hashlib.sha256(b"garbage").hexdigest()
    cubin.with_suffix(".json").write_text(json.dumps(record))


@pytest.mark.parametrize("damage", [corrupt_json, delete_cubin, truncate_cubin, drop_a_lowered_name,
                                    cubin_that_does_not_load], ids=lambda f: f.__name__)
def test_a_damaged_cache_entry_is_compiled_again(kernels, fake, caplog, damage):
    caplog.set_level(logging.INFO, logger="flashdispatch")
    first = compiler.load_module(kernels / "forward.cu", NAMES, (9, 0))
    damage(first.cubin)
    compiler._modules.clear()
    again = compiler.load_module(kernels / "forward.cu", NAMES, (9, 0))
    assert len(fake.compiles) == 2 and not again.from_cache
    assert again.function(NAMES[0]) == (str(first.cubin), f"_Z21{NAMES[0]}")
    assert any("is damaged" in r.getMessage() and "compiling it again" in r.getMessage() for r in caplog.records)
    compiler._modules.clear()
    assert compiler.load_module(kernels / "forward.cu", NAMES, (9, 0)).from_cache, "the entry is whole again"


def test_an_unwritable_cache_folder_still_gives_a_module(kernels, fake, monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flashdispatch")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("FLASHDISPATCH_CACHE_DIR", str(blocker))
    module = compiler.load_module(kernels / "forward.cu", NAMES, (9, 0))
    assert not module.from_cache and len(fake.compiles) == 1
    assert module.function(NAMES[1]) == (str(module.cubin), f"_Z22{NAMES[1]}")
    assert blocker not in module.cubin.parents and module.cubin.is_file()
    assert module.not_cached_because.startswith(f"the cache folder {blocker / 'cuda'} cannot be written (")
    assert f"not cached: the cache folder {blocker / 'cuda'} cannot be written" in module.describe()
    assert any("cannot be written" in r.getMessage() and "kept for this process only" in r.getMessage()
               for r in caplog.records)


def test_a_failed_cache_write_still_gives_a_module(kernels, fake, monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flashdispatch")

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compiler, "write_atomically", disk_full)
    module = compiler.load_module(kernels / "forward.cu", NAMES, (9, 0))
    assert not module.from_cache and module.function(NAMES[0]) == (str(module.cubin), f"_Z21{NAMES[0]}")
    assert "No space left on device" in module.not_cached_because
    assert cache_entries(tmp_path) == [], "nothing half-written is left in the cache"
    assert any("not cached: could not write to the cache folder" in r.getMessage() for r in caplog.records)


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temporary_one(monkeypatch, tmp_path):
    target = tmp_path / "entry.json"
    cache.write_atomically(target, "old")
    cache.write_atomically(target, b"new")
    assert target.read_bytes() == b"new"

    def rename_fails(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", rename_fails)
    with pytest.raises(OSError, match="No space left"):
        cache.write_atomically(target, "newer")
    assert target.read_text() == "new" and [path.name for path in tmp_path.iterdir()] == ["entry.json"]


def _compile_in_another_process(source: str, cache: str, counter: str, result: str, barrier) -> None:
    os.environ["FLASHDISPATCH_CACHE_DIR"] = cache
    compiler._modules.clear()
    FakeToolchain(compile_seconds=0.5, counter=Path(counter)).install(setattr)
    barrier.wait()
    module = compiler.load_module(Path(source), NAMES, (9, 0))
    Path(result).write_text(json.dumps({"from_cache": module.from_cache, "cubin": str(module.cubin),
                                        "kernel": module.function(NAMES[0])}))


@pytest.mark.skipif(compiler.fcntl is None, reason="no fcntl.flock here (Windows): each process compiles")
def test_processes_compiling_the_same_module_at_once_compile_it_once(kernels, tmp_path):
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    barrier = context.Barrier(2)
    counter = tmp_path / "compiles.txt"
    cache = tmp_path / "shared-cache"
    results = [tmp_path / f"result-{i}.json" for i in range(2)]
    processes = [context.Process(target=_compile_in_another_process,
                                 args=(str(kernels / "forward.cu"), str(cache), str(counter), str(result), barrier))
                 for result in results]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0]
    assert len(counter.read_text().splitlines()) == 1, "one process compiled, the other waited and loaded"
    outcomes = [json.loads(result.read_text()) for result in results]
    assert sorted(outcome["from_cache"] for outcome in outcomes) == [False, True]
    cubin = Path(outcomes[0]["cubin"])
    assert outcomes[0]["cubin"] == outcomes[1]["cubin"] and cubin.parent == cache / "cuda"
    assert all(outcome["kernel"] == [str(cubin), f"_Z21{NAMES[0]}"] for outcome in outcomes)
    record = json.loads(cubin.with_suffix(".json").read_text())
    assert record["cubin_sha256"] == hashlib.sha256(cubin.read_bytes()).hexdigest()
    assert not [path.name for path in cubin.parent.iterdir() if path.suffix == ".tmp"]


class FakeNVRTC(types.ModuleType):
    """cupy_backends.cuda.libs.nvrtc as CuPy 13 has it; `log` is the program log, `fails` makes the
    compile fail."""

    class NVRTCError(RuntimeError):
        pass

    def __init__(self, log: str = "", fails: bool = False):
        super().__init__("cupy_backends.cuda.libs.nvrtc")
        self.program_log, self.fails = log, fails
        self.calls: list[tuple] = []

    def createProgram(self, src, name, headers, include_names):
        self.calls.append(("createProgram", name))
        return 1234

    def addNameExpression(self, program, name):
        self.calls.append(("addNameExpression", name))

    def compileProgram(self, program, options):
        self.calls.append(("compileProgram", tuple(options)))
        if self.fails:
            raise self.NVRTCError("NVRTC_ERROR_COMPILATION (6)")

    def getProgramLog(self, program):
        return self.program_log

    def getLoweredName(self, program, name):
        return f"_Z_{name}"

    def getCUBIN(self, program):
        return b"\x7fELF cubin"

    def destroyProgram(self, program):
        self.calls.append(("destroyProgram", program))


@pytest.fixture
def install_nvrtc(monkeypatch):
    def install(nvrtc: FakeNVRTC) -> FakeNVRTC:
        parents = ["cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs"]
        for name in parents:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules["cupy_backends.cuda.libs"].nvrtc = nvrtc
        monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", nvrtc)
        return nvrtc
    return install


def test_nvrtc_compile_returns_the_cubin_and_the_lowered_names(install_nvrtc):
    nvrtc = install_nvrtc(FakeNVRTC(log="warning: unused variable"))
    cubin, lowered = compiler._nvrtc_compile("source", "/k/forward.cu", NAMES, ("-std=c++17",))
    assert cubin == b"\x7fELF cubin"
    assert lowered == {name: f"_Z_{name}" for name in NAMES}
    assert nvrtc.calls == [("createProgram", "/k/forward.cu"), ("addNameExpression", NAMES[0]),
                           ("addNameExpression", NAMES[1]), ("compileProgram", ("-std=c++17",)),
                           ("destroyProgram", 1234)]


def test_nvrtc_compile_takes_older_cupys_name_for_add_name_expression(install_nvrtc):
    nvrtc = FakeNVRTC()
    nvrtc.addAddNameExpression = nvrtc.addNameExpression  # older CuPy's spelling, and only it
    nvrtc.addNameExpression = None
    install_nvrtc(nvrtc)
    assert compiler._nvrtc_compile("source", "forward.cu", NAMES[:1], ())[1] == {NAMES[0]: f"_Z_{NAMES[0]}"}
    assert ("addNameExpression", NAMES[0]) in nvrtc.calls


def test_a_compile_error_raises_with_nvrtc_s_log(install_nvrtc, kernels, monkeypatch, tmp_path):
    log = 'forward.cu(2): error: identifier "undefined_tile" is undefined\n1 error detected'
    nvrtc = install_nvrtc(FakeNVRTC(log=log, fails=True))
    monkeypatch.setattr(compiler, "_toolchain_versions", lambda: compiler._Versions("13.4.1", "12.8"))
    monkeypatch.setattr(compiler, "_cuda_include_dirs", lambda: ())
    with pytest.raises(RuntimeError) as raised:
        compiler.load_module(kernels / "forward.cu", NAMES, (9, 0))
    message = str(raised.value)
    assert f"NVRTC could not compile {kernels / 'forward.cu'} (NVRTC_ERROR_COMPILATION (6))" in message
    assert message.endswith(log) and "--gpu-architecture=sm_90" in message
    assert nvrtc.calls[-1] == ("destroyProgram", 1234)
    assert cache_entries(tmp_path) == [] and compiler._modules == {}


def test_the_cuda_headers_that_match_nvrtc_are_chosen(monkeypatch, tmp_path):
    def include(name: str, cudart: int, cccl: bool = False) -> Path:
        folder = tmp_path / name / "include"
        folder.mkdir(parents=True)
        (folder / "cuda_fp16.h").write_text("")
        (folder / "cuda_runtime_api.h").write_text(f"#define CUDART_VERSION  {cudart}\n")
        if cccl:
            (folder / "cccl").mkdir()
        return folder

    toolkit, wheel, other = include("toolkit", 12020), include("wheel", 12080, cccl=True), include("other", 11080)
    monkeypatch.setattr(compiler, "_toolchain_versions", lambda: compiler._Versions("13.4.1", "12.8"))
    monkeypatch.setattr(compiler, "_candidate_include_dirs", lambda: [tmp_path / "missing", other, toolkit, wheel])
    monkeypatch.delenv("FLASHDISPATCH_CUDA_INCLUDE", raising=False)
    compiler._cuda_include_dirs.cache_clear()
    try:
        assert compiler._cuda_include_dirs() == (str(wheel), str(wheel / "cccl"))
        monkeypatch.setattr(compiler, "_toolchain_versions", lambda: compiler._Versions("13.4.1", "12.4"))
        compiler._cuda_include_dirs.cache_clear()
        assert compiler._cuda_include_dirs() == (str(toolkit),), "no exact match: the first of the same major version"
        monkeypatch.setenv("FLASHDISPATCH_CUDA_INCLUDE", f"/a/include{os.pathsep}/b/include")
        compiler._cuda_include_dirs.cache_clear()
        assert compiler._cuda_include_dirs() == ("/a/include", "/b/include")
    finally:
        compiler._cuda_include_dirs.cache_clear()
