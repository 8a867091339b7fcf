#!/usr/bin/env python3
"""Print the backend x feature table, from each registered backend's declared `Support`, as Markdown.

    python scripts/backend_table.py                       # every registered backend, plugins included
    python scripts/backend_table.py --builtin             # the built-in backends only
    python scripts/backend_table.py --builtin --write docs/backends.md   # refresh the docs
    python scripts/backend_table.py --builtin --check docs/backends.md   # exit 1 if the docs are stale

`--write` and `--check` act on the text between the `<!-- backend-table:begin -->` and
`<!-- backend-table:end -->` lines of the file. The table shows what `Support` declares; problem-
specific limits a backend adds in `extra_reasons`, and whether its toolchain is present on this
machine (`unavailable_reasons`), are not in it: `flashdispatch.explain()` shows both.
Run from the repository root with `PYTHONPATH=src`, or with flashdispatch installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

BEGIN = "<!-- backend-table:begin -->"
END = "<!-- backend-table:end -->"

DTYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
COLUMNS = [
    "backend", "dtypes", "devices", "compute capability", "head dims", "causal",
    "causal, Nq≠Nk (bottom-right)", "window", "softcap", "GQA/MQA", "varlen", "layouts", "LSE",
    "backward", "deterministic backward",
]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _dtypes(support) -> str:
    names = [str(d).replace("torch.", "") for d in support.dtypes]
    return ", ".join(DTYPE_NAMES.get(n, n) for n in names)


def _compute_capability(support) -> str:
    if "cuda" not in support.devices:
        return "n/a"
    low, high = support.min_compute_capability, support.max_compute_capability
    if low is None and high is None:
        return "any"
    parts = []
    if low is not None:
        parts.append(f"≥ {low[0]}.{low[1]}")
    if high is not None:
        parts.append(f"≤ {high[0]}.{high[1]}")
    return ", ".join(parts)


def _head_dims(support) -> str:
    top, multiple = support.max_head_dim, support.head_dim_multiple
    low = -(-support.min_head_dim // multiple) * multiple  # the smallest head dim it accepts
    text = f"{low}–{top}" if top is not None else f"≥ {low}"
    if multiple > 1:
        text += f", multiple of {multiple}"
    text += "; Dv = D" if support.head_dim_v_must_equal else ""
    return text


def row(backend) -> list[str]:
    s = backend.support
    return [
        f"`{backend.name}`",
        _dtypes(s),
        ", ".join(s.devices),
        _compute_capability(s),
        _head_dims(s),
        _yes(s.causal),
        _yes(s.causal and s.causal_unequal_lengths) if s.causal else "n/a",
        _yes(s.window),
        _yes(s.softcap),
        _yes(s.gqa),
        _yes(s.varlen),
        ", ".join(s.layouts),
        _yes(s.lse),
        _yes(s.backward),
        _yes(s.deterministic_backward) if s.backward else "n/a",
    ]


def table(backends) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(b)) + " |" for b in backends]
    return "\n".join(lines)


def splice(text: str, generated: str, path: Path) -> str:
    """`text` with the part between the markers replaced by `generated`."""
    try:
        head, rest = text.split(BEGIN + "\n", 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise SystemExit(f"{path} has no '{BEGIN}' ... '{END}' block") from None
    return f"{head}{BEGIN}\n{generated}\n{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builtin", action="store_true", help="the built-in backends only (ignore installed plugins)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="FILE", help="replace the marked table in FILE")
    group.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if the marked table in FILE is stale")
    args = parser.parse_args(argv)
    if args.builtin:
        # Read once, when the registry first loads: set it before anything imports flashdispatch's registry.
        os.environ["FLASHDISPATCH_DISABLE_PLUGINS"] = "*"
    import flashdispatch

    generated = table(flashdispatch.backends().values())
    if args.write is None and args.check is None:
        print(generated)
        return 0
    path = args.write or args.check
    text = path.read_text()
    updated = splice(text, generated, path)
    if args.check is not None:
        if updated != text:
            print(f"{path}: the backend table is stale; run: PYTHONPATH=src python3 scripts/backend_table.py "
                  f"--builtin --write {path}", file=sys.stderr)
            return 1
        return 0
    path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
