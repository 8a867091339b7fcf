"""Summarise `ncu --page source --print-source sass --csv` output (stdin): the column names, the
stall-reason totals, and the SASS instructions with the most warp-stall samples, each with its
leading stall reasons. For reading where a kernel's warps wait, per instruction."""

import csv
import sys


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main(top: int = 60) -> None:
    lines = [line for line in sys.stdin if line.startswith('"')]
    start = next((i for i, line in enumerate(lines) if line.startswith('"Address"')), None)
    if start is None:
        print("no per-instruction table in the input (ncu printed no \"Address\" header)")
        return
    lines = lines[start:]
    rows = list(csv.DictReader(lines))
    if not rows:
        print("no rows")
        return
    names = list(rows[0])
    total_col = next((n for n in names if "Warp Stall Sampling (All" in n), None)
    source_col = next((n for n in names if n in ("Source", "# Source")), names[1])
    address_col = next((n for n in names if "Address" in n), names[0])
    stall_cols = [n for n in names if n.startswith("stall_") and "Not Issued" not in n]
    totals = {n: sum(number(r[n]) for r in rows) for n in stall_cols}
    print("stall totals:", ", ".join(f"{n}={v:.0f}" for n, v in sorted(totals.items(), key=lambda x: -x[1]) if v))
    if total_col is None:
        return
    ranked = sorted(rows, key=lambda r: -number(r[total_col]))[:top]
    all_samples = sum(number(r[total_col]) for r in rows)
    print(f"all samples {all_samples:.0f}")
    for r in ranked:
        reasons = sorted(((number(r[n]), n) for n in stall_cols), reverse=True)[:3]
        why = ", ".join(f"{n}={v:.0f}" for v, n in reasons if v)
        print(f"{r[address_col]:>8} {number(r[total_col]):7.0f} {r[source_col][:70]:70} {why}")


if __name__ == "__main__":
    main()
