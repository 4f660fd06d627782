"""How often the commit rule commits: A/A false commits, and detection of known slowdowns.

    python benchmarks/commit_rule.py kernel=mha trials=20 slow=12,40 out=outputs/bench/commit_rule

Every trial is the search's own paired benchmark at the problem's benchmark set (the candidate beside
the incumbent, no baselines: a decision times no more), timed in one worker on the GPU, every candidate
launch checked against the incumbent's output. Conditions, interleaved trial by trial:
- A/A: sm90 against a copy of itself (any commit is a false commit);
- slow<N>: sm90 against a copy made slower by N dependent FMAs per K/V block on the softmax path
  (an honest kernel that is truly faster than the incumbent; a commit is a detection).
The true effect of each condition is the pooled paired ratio over all its trials (many more
iterations than one decision sees). Prints one table per rule and writes commit_rule.json.
Every other argument is a Hydra override of conf/config.yaml (kernel, group, harness.*, search.commit.*).
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avo.bench import compose  # noqa: E402
from avo.commit import decide  # noqa: E402
from avo.fsutil import atomic_write_json  # noqa: E402
from avo.harness.job import write_sources  # noqa: E402
from avo.paired import annotate, geomean_ratio  # noqa: E402
from avo.seeds import resolve  # noqa: E402
from avo.types import ConfigResult, EvalResult, Status  # noqa: E402

# the steady-state softmax's call (any template arguments, any scale expression, any result variable)
SLOW_AT = re.compile(r"softmax_step<false\b[^;]*\(s, m, l, corr, [^;]*\);")


def slowed(source: str, n: int) -> str:
    """The kernel with n dependent FMAs after each block's softmax (kept alive by a dead branch)."""
    at = SLOW_AT.search(source)
    if at is None:
        raise SystemExit("commit_rule: the kernel has no `softmax_step<false...>(s, m, l, corr, ...);` call "
                         "to slow down")
    spin = (f"\n        {{ float z = l[0]; for (int r = 0; r < {n}; ++r) z = fmaf(z, 1.0000001f, 1e-9f);"
            " if (z == -1.f) l[1] = z; }")
    return source[:at.end()] + spin + source[at.end():]


def main(argv: list[str]) -> int:
    from avo.harness.gpu import GpuHarness
    from avo.harness.sandbox import run_worker
    from avo.problem import problem_from_cfg

    opts = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("trials", "slow", "out", "seed"))
    overrides = [a for a in argv if a.split("=", 1)[0] not in opts]
    cfg = compose(overrides)
    problem = problem_from_cfg(cfg.kernel)
    trials, slows = int(opts.get("trials", 20)), [int(x) for x in opts.get("slow", "12,40").split(",") if x]
    out = Path(opts.get("out", f"outputs/bench/commit_rule_{time.strftime('%Y-%m-%d_%H-%M-%S')}"))
    base = resolve(opts.get("seed", "sm90")).source
    harness = GpuHarness(cfg.harness, out / "jobs", spare=False)
    job_dir = out / "jobs" / "trials"
    sources = {"base": base, "copy": base + "\n// a copy\n", **{f"slow{n}": slowed(base, n) for n in slows}}
    paths = write_sources(job_dir, sources)
    pairs = [["A/A", "copy", "base"], *[[f"slow{n}", "base", f"slow{n}"] for n in slows]]
    harness.job(problem, "trials", sources=paths, pairs=pairs, trials=trials).write(job_dir)
    print(f"commit_rule: {trials} trials x {len(pairs)} conditions on {problem.name}, log {job_dir}/worker.log",
          flush=True)
    r = run_worker(job_dir, cfg.harness.timeout_s * trials * len(pairs), env=harness.env())
    harness.close()
    if not (job_dir / "trials.json").exists() or not r.ok:
        print(f"commit_rule: the worker failed: {r.status.value}: {r.error}", file=sys.stderr)
        return 1
    rows = json.loads((job_dir / "trials.json").read_text())
    c = cfg.search.commit
    report = {"kernel": problem.name, "group": int(cfg.group), "trials": trials, "alpha": c.alpha,
              "gpu": harness.gpu_name, "date": time.strftime("%Y-%m-%d"), "conditions": {}}
    print(f"\n{harness.gpu_name}, {time.strftime('%Y-%m-%d')}, {problem.name}, alpha {c.alpha} (one-sided), "
          f"{len(problem.bench)} configs per decision")
    print(f"{'condition':<10}{'true ratio':>12}{'trials':>8}{'gain: commits':>15}{'rate':>7}"
          f"{'noninferior: commits':>22}{'rate':>7}{'median CI width':>17}")
    for cond in dict.fromkeys(row["condition"] for row in rows):
        mine = [row for row in rows if row["condition"] == cond]
        pooled, _ = geomean_ratio([(sum((row["configs"][j]["samples"] for row in mine), []),
                                    sum((row["configs"][j]["incumbent_samples"] for row in mine), []))
                                   for j in range(len(mine[0]["configs"]))], c.alpha)
        decisions = {"gain": [], "noninferior": []}
        widths = []
        for row in mine:
            res = EvalResult(Status.OK, ranked=True, score=1.0, stage="bench",
                             configs=[ConfigResult(x["key"], tflops=x["tflops"], samples=x["samples"],
                                                   incumbent_samples=x["incumbent_samples"],
                                                   incumbent_tflops=x["incumbent_tflops"]) for x in row["configs"]])
            annotate(res, c.alpha)
            widths.append(res.paired_hi - res.paired_lo)
            for rule in decisions:
                decisions[rule].append(decide(res, rule, c.min_gain, c.config_margin))
        n = len(mine)
        g, ni = decisions["gain"].count("committed"), decisions["noninferior"].count("committed")
        width = sorted(widths)[n // 2]
        print(f"{cond:<10}{pooled.ratio:>12.4f}{n:>8}{g:>15}{g / n:>7.2f}{ni:>22}{ni / n:>7.2f}{width:>17.4f}")
        report["conditions"][cond] = {"true_ratio": pooled.ratio, "trials": n, "gain_commits": g,
                                      "noninferior_commits": ni, "median_ci_width": width,
                                      "decisions": decisions}
    atomic_write_json(out / "commit_rule.json", report)
    print(f"commit_rule: wrote {out / 'commit_rule.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
