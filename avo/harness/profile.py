"""Nsight Compute profiles of one candidate, summarised as text an agent can act on.

The GPU harness runs the worker (mode "profile": compile, then launch the kernel twice on one
benchmark shape) under `ncu`, in the sandbox with its hard timeout; ncu records the second launch
at the clocks the benchmarks run at (--clock-control none). The report stays beside the job
(profile.ncu-rep, with its details.csv and raw.csv) for people; the summary is for the agent.
Parent side only: nothing here touches CUDA.
"""
from __future__ import annotations

import csv
import glob
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

from avo.fsutil import atomic_write_text
from avo.harness.abi import ENTRY
from avo.harness.sandbox import _tail

# SourceCounters: warp-stall samples per SASS instruction (the source page), which say where the warps wait
SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis",
            "SchedulerStats", "WarpStateStats", "SourceCounters")
PAGES = ("details", "raw", "source")
REPORT = "profile"          # ncu appends .ncu-rep
IMPORT_TIMEOUT_S = 120
_STALL = re.compile(r"^smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio$")
_SEARCH = ("/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda*/bin/ncu", "/usr/local/cuda*/nsight-compute*/ncu")
RULE_CHARS = 400            # ncu's advice paragraphs are long; the first sentences carry the point
TOP_STALLS = 6
TOP_INSTRUCTIONS = 12
TOP_OPCODES = 8


class ProfileError(RuntimeError):
    """No profile came out; the message says why and what to do instead."""


def find_ncu(profiler: str) -> str | None:
    """The Nsight Compute executable: `profiler` as a path or on PATH, else a CUDA install's own."""
    found = shutil.which(profiler)
    if found or os.sep in profiler:
        return found
    for pattern in _SEARCH:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]  # the newest version sorts last
    return None


def ncu_command(ncu: str, job_dir: Path) -> list[str]:
    """The prefix that runs the worker under ncu and records the kernel's second launch.

    Clears the job's earlier report, so a run that records nothing cannot pass for one that did."""
    for name in (f"{REPORT}.ncu-rep", *(f"{page}.csv" for page in PAGES)):
        (Path(job_dir) / name).unlink(missing_ok=True)
    sections = [a for s in SECTIONS for a in ("--section", s)]
    return [ncu, "--export", str(Path(job_dir) / REPORT), "--force-overwrite", "--clock-control", "none",
            "--target-processes", "all", "--kernel-name", ENTRY, "--launch-skip", "1", "--launch-count", "1",
            *sections]


def export_csv(ncu: str, job_dir: Path) -> tuple[str, str, str]:
    """(details, raw, source) pages of the job's report as CSV text; also written beside the report. The source
    page lists the SASS, an instruction a row, with its warp-stall samples."""
    report = Path(job_dir) / f"{REPORT}.ncu-rep"
    if not report.exists():
        said = [ln.strip() for ln in _tail(Path(job_dir) / "worker.log").splitlines()
                if ln.startswith(("==ERROR==", "==WARNING=="))]
        raise ProfileError(f"ncu recorded no launch of {ENTRY}" + (": " + " ".join(said[-3:]) if said else ""))
    pages = []
    for page in PAGES:
        sass = ["--print-source", "sass"] if page == "source" else []
        try:
            p = subprocess.run([ncu, "--import", str(report), "--csv", "--page", page, *sass], capture_output=True,
                               text=True, timeout=IMPORT_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ProfileError(f"`ncu --import` hung for {IMPORT_TIMEOUT_S} s on {report}") from None
        if p.returncode != 0:
            raise ProfileError(f"`ncu --import --page {page}` failed: {(p.stderr or p.stdout).strip()[-400:]}")
        atomic_write_text(Path(job_dir) / f"{page}.csv", p.stdout)
        pages.append(p.stdout)
    return pages[0], pages[1], pages[2]


def _rows(text: str, first: str = '"ID"') -> list[list[str]]:
    """CSV rows from the header (the line that starts with `first`) on: ncu may print ==PROF== lines, warnings or the
    kernel's name before it."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(first)), None)
    if start is None:
        return []
    return list(csv.reader(io.StringIO("\n".join(lines[start:]))))


def _number(value: str) -> float | None:
    try:
        return float(value.replace(",", ""))
    except ValueError:
        return None


def details(text: str) -> tuple[dict[str, list[tuple[str, str, str]]], list[str], dict[str, str]]:
    """({section: [(metric, value, unit)]}, rule messages, launch identity) of the first profiled kernel."""
    rows = _rows(text)
    if len(rows) < 2:
        return {}, [], {}
    head = {name: i for i, name in enumerate(rows[0])}
    missing = {"ID", "Section Name", "Metric Name", "Metric Value"} - head.keys()
    if missing:
        raise ProfileError(f"unexpected ncu details CSV: no column {', '.join(sorted(missing))}")

    def col(row: list[str], name: str) -> str:
        i = head.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    first = rows[1][head["ID"]]
    sections: dict[str, list[tuple[str, str, str]]] = {}
    rules: list[str] = []
    ident = {k: col(rows[1], k) for k in ("Kernel Name", "Block Size", "Grid Size", "Device", "CC")}
    for row in rows[1:]:
        if col(row, "ID") != first:
            break
        metric, rule = col(row, "Metric Name"), col(row, "Rule Description")
        if metric:
            sections.setdefault(col(row, "Section Name"), []).append(
                (metric, col(row, "Metric Value"), col(row, "Metric Unit")))
        if rule:
            gain = col(row, "Estimated Speedup")
            text = " ".join(rule.split())
            text = text if len(text) <= RULE_CHARS else text[:RULE_CHARS].rsplit(" ", 1)[0] + " ..."
            line = f"[{col(row, 'Rule Type') or 'INF'}] {col(row, 'Rule Name') or col(row, 'Section Name')}: {text}"
            if gain and (_number(gain) or 0) > 0:
                line += f" (ncu's estimated gain: {gain}%)"
            if line not in rules:
                rules.append(line)
    return sections, rules, ident


def stalls(text: str) -> list[tuple[str, float]]:
    """Warp stall reasons of the first profiled kernel, largest first: (reason, warps per issued instruction)."""
    rows = _rows(text)
    if len(rows) < 2:
        return []
    data = next((r for r in rows[1:] if r and r[0].strip()), None)  # the row after the units row
    if data is None:
        return []
    found = []
    for name, value in zip(rows[0], data, strict=False):
        m = _STALL.match(name)
        v = _number(value) if m else None
        if m and v is not None and v > 0 and not m.group(1).endswith("_not_issued"):  # a subset, not a reason
            found.append((m.group(1), v))
    return sorted(found, key=lambda x: -x[1])


def hot_instructions(text: str) -> list[str]:
    """Where the warps wait, from the source page: the samples by opcode and the most sampled SASS instructions
    (at their offset in the kernel, as cuobjdump and nvdisasm print it), each with its main stall reasons."""
    rows = _rows(text, '"Address"')
    if not rows:
        return []
    head = {name: i for i, name in enumerate(rows[0])}
    # "(All Samples)" since ncu 2023, "(All Cycles)" before
    samples = next((i for name, i in head.items() if name.startswith("Warp Stall Sampling (All")), None)
    source, address = head.get("Source"), head.get("Address")
    if samples is None or source is None or address is None:
        return []
    reasons = [(name[len("stall_"):], i) for name, i in head.items() if name.startswith("stall_") and "(" not in name]
    found, base = [], None  # (samples, address, instruction, {reason: samples}); the kernel's first address
    for row in rows[1:]:
        if len(row) != len(rows[0]) or not row[address].startswith("0x"):
            continue
        at = int(row[address], 16)
        base = at if base is None else min(base, at)
        n = _number(row[samples])
        if n:
            why = {r: v for r, i in reasons if (v := _number(row[i]) or 0)}
            found.append((n, at, " ".join(row[source].split()), why))
    if not found:
        return []
    total = sum(f[0] for f in found)

    def share(v: float) -> str:
        return f"{100 * v / total:.1f}%"

    def main(why: dict, k: int) -> str:
        return ", ".join(f"{r} {share(v)}" for r, v in sorted(why.items(), key=lambda x: -x[1])[:k])

    ops: dict[str, list] = {}
    for n, _, ins, why in found:
        op = next((t for t in ins.split() if not t.startswith("@")), "?").split(".")[0]
        agg = ops.setdefault(op, [0.0, {}])
        agg[0] += n
        for r, v in why.items():
            agg[1][r] = agg[1].get(r, 0) + v
    out = [f"Warp-stall samples by SASS instruction ({total:.0f} samples; share of all, main reasons):", "  by opcode: "
           + "; ".join(f"{op} {share(n)} ({main(why, 2)})" for op, (n, why) in
                       sorted(ops.items(), key=lambda x: -x[1][0])[:TOP_OPCODES])]
    out += [f"  {share(n):>6} +{off - base:#07x} {ins[:72]}  ({main(why, 3)})"
            for n, off, ins, why in sorted(found, key=lambda f: -f[0])[:TOP_INSTRUCTIONS]]
    return out


def summarise(details_csv: str, raw_csv: str, shape_key: str, source_csv: str = "") -> str:
    sections, rules, ident = details(details_csv)
    if not sections:
        raise ProfileError("ncu's report holds no metrics for the kernel (the counters may be unreadable "
                           "on this machine)")
    launch = ", ".join(f"{k.split()[0].lower()} {ident[k]}" for k in ("Grid Size", "Block Size") if ident.get(k))
    out = [f"Nsight Compute profile of {ident.get('Kernel Name') or ENTRY} on {shape_key} "
           f"({launch + ', ' if launch else ''}one launch, clocks as benchmarked):"]
    for section, metrics in sections.items():
        out.append(f"{section}:")
        out += [f"  {m}: {v}{' ' + u if u else ''}" for m, v, u in metrics]
    top = stalls(raw_csv)
    if top:
        total = sum(v for _, v in top)
        out.append("Warp stalls (cycles per issued instruction, largest first):")
        out += [f"  {r}: {v:.2f} ({100 * v / total:.0f}%)" for r, v in top[:TOP_STALLS]]
    out += hot_instructions(source_csv)
    if rules:
        out.append("ncu's findings:")
        out += [f"  {r}" for r in rules]
    return "\n".join(out)
