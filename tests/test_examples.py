"""The examples and the documentation's code run as written.

- examples/quickstart.py runs on the CPU.
- examples/plugin/ is discoverable as an installed package would be: its entry point (read from its
  pyproject.toml) goes into a generated `*.dist-info/entry_points.txt` on the sys.path of a fresh
  interpreter, next to the plugin's source. Nothing is installed globally. A second test builds and
  installs it for real with pip into a temporary `--target` directory (offline).
- The example plugin passes `flashdispatch verify` (fast tier, CPU).
- The first ```python block of docs/writing-a-backend.md runs.
- The feature table in docs/backends.md matches the backends' declared support.
- A plugin that fails to import is disabled and reported, and the dispatcher still works.

Every check runs in a subprocess, so no plugin leaks into this process's registry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PLUGIN_DIR = ROOT / "examples" / "plugin"
TIMEOUT = 300


def run_python(args, pythonpath=(), cwd=ROOT, extra_env=None):
    """Run a fresh interpreter with flashdispatch's sources (plus `pythonpath`) importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHDISPATCH_")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *map(str, pythonpath)])
    env.update(extra_env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def check(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def plugin_entry_points() -> dict[str, str]:
    """[project.entry-points.flashdispatch] of the example plugin's pyproject.toml."""
    text = (PLUGIN_DIR / "pyproject.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: read the one table by hand
        block = re.search(r"^\[project\.entry-points\.flashdispatch\]\n(.*?)(?:^\[|\Z)", text, re.M | re.S).group(1)
        return dict(re.findall(r'^\s*([\w.-]+)\s*=\s*"([^"]+)"', block, re.M))
    return tomllib.loads(text)["project"]["entry-points"]["flashdispatch"]


def fake_distribution(root: Path, name: str, entry_points: dict[str, str]) -> Path:
    """A minimal installed-distribution record under `root`: what importlib.metadata finds on sys.path."""
    dist_info = root / f"{name.replace('-', '_')}-0.0.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.0\n")
    lines = ["[flashdispatch]"] + [f"{key} = {value}" for key, value in entry_points.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root


# What a user of the installed plugin would do, in a fresh interpreter; prints one JSON line.
PLUGIN_CHECK = textwrap.dedent(
    """
    import json, math, torch, flashdispatch
    from flashdispatch.backends.reference import attention_math

    report = {"backends": list(flashdispatch.backends()),
              "plugins": {p.name: p.error for p in flashdispatch.plugins()}, "errors": []}
    torch.manual_seed(0)
    cases = [  # (dtype, layout, B, Hq, Hkv, Nq, Nk, D, Dv, causal)
        (torch.float32, "bhsd", 2, 4, 4, 33, 33, 16, 16, False),
        (torch.float32, "bhsd", 2, 8, 2, 5, 40, 32, 24, True),    # GQA, bottom-right causal, Nq < Nk
        (torch.float64, "bshd", 1, 6, 3, 17, 9, 8, 8, True),      # Nq > Nk: first rows see no key
        (torch.float32, "bshd", 3, 4, 1, 1, 70, 64, 64, False),   # MQA decode step
    ]
    for dtype, layout, B, Hq, Hkv, Nq, Nk, D, Dv, causal in cases:
        q, k, v = (torch.randn(B, H, N, d, dtype=dtype)
                   for H, N, d in ((Hq, Nq, D), (Hkv, Nk, D), (Hkv, Nk, Dv)))
        args = (q, k, v) if layout == "bhsd" else tuple(t.transpose(1, 2) for t in (q, k, v))
        out, lse = flashdispatch.attention(*args, causal=causal, layout=layout, backend="naive-chunked",
                                           return_lse=True)
        if layout == "bshd":
            out = out.transpose(1, 2)
        ref_out, ref_lse = attention_math(q, k, v, scale=D ** -0.5, window_right=0 if causal else -1)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        out_err = (out.double() - ref_out).abs().max().item()
        same_inf = torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        finite = torch.isfinite(ref_lse)
        lse_err = (lse.double()[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
        if not (out_err <= tol and lse_err <= 1e-5 and same_inf and lse.dtype == torch.float32):
            report["errors"].append(f"{dtype} {layout} {Nq}/{Nk}: out {out_err:.2e} lse {lse_err:.2e} inf {same_inf}")

    # Forced forward, backward by the policy through the LSE: the gradient matches the reference.
    q = torch.randn(1, 4, 6, 16, requires_grad=True)
    k = torch.randn(1, 2, 10, 16, requires_grad=True)
    v = torch.randn(1, 2, 10, 16, requires_grad=True)
    explanation = flashdispatch.explain(q, k, v, causal=True, backend="naive-chunked")
    report["pair"] = [explanation.forward, explanation.backward]
    out = flashdispatch.attention(q, k, v, causal=True, backend="naive-chunked")
    out.square().sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = attention_math(*leaves, scale=0.25, window_right=0)
    ref.square().sum().backward()
    report["grad_err"] = max((t.grad.double() - r.grad).abs().max().item() for t, r in zip((q, k, v), leaves))
    print(json.dumps(report))
    """
)


def assert_plugin_works(stdout: str) -> None:
    report = json.loads(stdout.strip().splitlines()[-1])
    assert "naive-chunked" in report["backends"], report
    assert report["plugins"].get("naive-chunked", "missing") is None, report["plugins"]
    assert report["errors"] == [], report["errors"]
    assert report["pair"][0] == "naive-chunked" and report["pair"][1] != "naive-chunked", report["pair"]
    assert report["grad_err"] < 1e-4, report["grad_err"]


def test_quickstart_runs_on_cpu():
    out = check(run_python([str(ROOT / "examples" / "quickstart.py"), "--device", "cpu"]))
    assert "forward :" in out and "backward:" in out, out
    assert "compute capability" in out, out
    error = float(re.search(r"max \|out - sdpa\(float32\)\| = (\S+)", out).group(1))
    assert error < 1e-4, out


def test_example_plugin_declares_its_entry_point():
    assert plugin_entry_points() == {"naive-chunked": "flashdispatch_naive_chunked"}


def test_example_plugin_discovered_through_entry_point(tmp_path):
    dist = fake_distribution(tmp_path / "site", "flashdispatch-naive-chunked", plugin_entry_points())
    assert_plugin_works(check(run_python(["-c", PLUGIN_CHECK], pythonpath=[PLUGIN_DIR, dist])))


def test_example_plugin_passes_the_conformance_suite(tmp_path):
    """What writing-a-backend.md tells plugin authors to run (fast tier, CPU, default dtypes)."""
    if run_python(["-c", "import flashdispatch.conformance"]).returncode != 0:
        pytest.skip("flashdispatch.conformance is not importable")
    dist = fake_distribution(tmp_path / "site", "flashdispatch-naive-chunked", plugin_entry_points())
    out = check(run_python(["-m", "flashdispatch", "verify", "--backend", "naive-chunked", "--device", "cpu"],
                           pythonpath=[PLUGIN_DIR, dist]))
    assert re.search(r"^naive-chunked\s+[1-9]\d*\s+0\s", out, re.M), out


def test_example_plugin_can_be_disabled(tmp_path):
    dist = fake_distribution(tmp_path / "site", "flashdispatch-naive-chunked", plugin_entry_points())
    code = "import json, flashdispatch; print(json.dumps([list(flashdispatch.backends()), " \
           "{p.name: p.error for p in flashdispatch.plugins()}]))"
    out = check(run_python(["-c", code], pythonpath=[PLUGIN_DIR, dist],
                           extra_env={"FLASHDISPATCH_DISABLE_PLUGINS": "naive-chunked"}))
    names, errors = json.loads(out.strip().splitlines()[-1])
    assert "naive-chunked" not in names and "tiled" in names
    assert "FLASHDISPATCH_DISABLE_PLUGINS" in errors["naive-chunked"]


def test_example_plugin_pip_installs(tmp_path):
    """Build and install the example as a user would, into a private --target directory, offline."""
    pytest.importorskip("setuptools")
    if run_python(["-m", "pip", "--version"]).returncode != 0:
        pytest.skip("pip is not available to this interpreter")
    source = tmp_path / "plugin"
    shutil.copytree(PLUGIN_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    check(run_python(["-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
                      "--disable-pip-version-check", "--target", str(target), str(source)], cwd=tmp_path))
    assert list(target.glob("flashdispatch_naive_chunked-*.dist-info/entry_points.txt"))
    assert_plugin_works(check(run_python(["-c", PLUGIN_CHECK], pythonpath=[target], cwd=tmp_path)))


def test_broken_plugin_is_disabled_not_fatal(tmp_path):
    dist = fake_distribution(tmp_path / "site", "broken-plugin", {"broken": "no_such_module_for_flashdispatch"})
    code = textwrap.dedent(
        """
        import json, torch, flashdispatch
        q = torch.randn(1, 2, 8, 16)
        out = flashdispatch.attention(q, q, q)
        print(json.dumps({p.name: p.error for p in flashdispatch.plugins()}))
        """
    )
    result = run_python(["-c", code], pythonpath=[dist])
    errors = json.loads(check(result).strip().splitlines()[-1])
    assert errors["builtin"] is None
    assert "import failed: ModuleNotFoundError" in errors["broken"], errors
    assert "plugin 'broken' disabled" in result.stderr  # the one logged warning
    info = check(run_python(["-m", "flashdispatch", "info", "--device", "cpu"], pythonpath=[dist]))
    assert re.search(r"broken \(entry point no_such_module_for_flashdispatch\): disabled: import failed", info), info


def first_python_block(path: Path) -> str:
    match = re.search(r"^```python\n(.*?)^```", path.read_text(), re.M | re.S)
    assert match, f"no ```python block in {path}"
    return match.group(1)


def test_writing_a_backend_first_example_runs(tmp_path):
    code = first_python_block(ROOT / "docs" / "writing-a-backend.md")
    script = tmp_path / "first_example.py"
    script.write_text(code)
    out = check(run_python([str(script)], cwd=tmp_path))
    assert re.search(r"^naive\s+no\s+no\s+no causal masking", out, re.M), out


def test_backend_table_in_docs_is_current():
    result = run_python([str(ROOT / "scripts" / "backend_table.py"), "--builtin", "--check",
                         str(ROOT / "docs" / "backends.md")])
    assert result.returncode == 0, result.stderr
