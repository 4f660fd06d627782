"""launcher=slurm: submit the job function through submitit and return (or wait, launcher.wait=true).

Each run gets its own job; its submitit files and logs live in <run_dir>/slurm/, and
<run_dir>/slurm/job.json records the last job submitted for the run. The job name is built from the
sweep's overrides, so `squeue`/`sacct` show which combination a job is.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from avo.harness.devices import gpus_needed
from avo.launcher.job import LaunchError, RunDirBusy, SearchJob, ServerJob, current_hydra, log, run_dir_of, write_record

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
RECORD = "job.json"


def job_name(cfg, hydra_cfg) -> str:
    """`avo.<overrides>` in a sweep (launcher keys left out), else `avo.<kernel>.g<group>.<agent>`."""
    dirname = ""
    if hydra_cfg is not None:
        task = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith(("launcher", "hydra"))]
        excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
        dirname = ",".join(sorted(o for o in task if o.split("=", 1)[0].lstrip("+~") not in excluded))
    name = f"avo.{dirname}" if dirname else f"avo.{cfg.kernel.name}.g{cfg.group}.{cfg.agent.name}"
    return re.sub(r"[^\w.,=+:@%-]", "_", name)[:200]


def slurm_state(job_id: str) -> str | None:
    """The job's state from squeue (live jobs) or sacct (finished ones); None if Slurm does not know it."""
    for cmd in (["squeue", "-h", "-j", job_id, "-o", "%T"],
                ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out:
            return out[0].split()[0].upper()
    return None


def _refuse_if_active(folder: Path, run_dir: Path) -> None:
    record = folder / RECORD
    if not record.exists():
        return
    job_id = str(json.loads(record.read_text()).get("job_id", ""))
    state = slurm_state(job_id) if job_id else None
    if state in ACTIVE:
        raise RunDirBusy(f"{run_dir} already has Slurm job {job_id} ({state}); it resumes this run by itself. "
                         f"Wait for it, or `scancel {job_id}` and submit again")


def _executor(cfg, folder: Path, name: str, comment: str, gpus: int) -> submitit.SlurmExecutor:
    L = cfg.launcher
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise LaunchError("launcher=slurm: `sbatch`/`srun` are not on PATH (not a Slurm login node?); "
                          "use launcher=local, or slurm/cluster.sh start for a one-machine cluster")
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=L.max_requeues, python=L.python or None)
    extra = dict(L.additional_parameters or {})
    extra.setdefault("comment", comment)
    params = dict(job_name=name, time=int(L.timeout_min), signal_delay_s=int(L.signal_delay_s),
                  cpus_per_task=int(L.cpus_per_task), mem=f"{int(L.mem_gb * 1024)}MB", nodes=1,
                  ntasks_per_node=1, setup=list(L.setup or []), srun_args=list(L.srun_args or []),
                  additional_parameters=extra, stderr_to_stdout=False)
    for key in ("partition", "account", "qos", "constraint"):
        if L.get(key):
            params[key] = L[key]
    if gpus:
        params["gpus_per_node"] = gpus
    if L.max_parallel and L.max_parallel > 0:
        params["dependency"] = "singleton"  # jobs of one lane (same name) run one after another
    ex.update_parameters(**params)
    return ex


def _search_gpus(L, need: int, why: str) -> tuple[int, str]:
    """The GPUs a search job asks for (launcher.gpus_per_node, or when 0 the ones its settings use) and
    the setting to name if no node has that many."""
    asked = int(L.gpus_per_node)
    if 0 < asked < need:
        raise LaunchError(f"launcher.gpus_per_node={asked} is fewer than the {need} GPUs {why} use; raise it, "
                          "or leave it 0 to ask for those")
    return (asked, f"launcher.gpus_per_node={asked}") if asked else (need, f"{why} ({need} GPUs)")


def _lane_name(name: str, cfg, hydra_cfg, sweep_dir: str) -> str:
    if not cfg.launcher.max_parallel or hydra_cfg is None:
        return name
    lane = int(hydra_cfg.job.get("num", 0) or 0) % int(cfg.launcher.max_parallel)
    return f"avo.{Path(sweep_dir).name}.lane{lane}"


def _nodes(partition: str | None) -> list[dict]:
    """CPUs, memory (MB), GPUs and time limit (minutes, None: unlimited) of each node of the partition
    (the default partition when None), from sinfo."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G|%l"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    nodes = []
    for line in out.splitlines():
        part, cpus, mem, gres, limit = (line.split("|") + [""] * 5)[:5]
        if not (part.rstrip("*") == partition if partition else part.endswith("*")):
            continue
        gpus = sum(int(m) for m in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        nodes.append({"cpus": _int(cpus), "mem_mb": _int(mem), "gpus": gpus, "time_min": _minutes(limit)})
    return nodes


def _int(text: str) -> int:
    m = re.match(r"\d+", text.strip())
    return int(m.group()) if m else 0


def _minutes(limit: str) -> int | None:
    """sinfo's time limit (minutes, minutes:seconds, [days-]hours:minutes:seconds) in minutes; None: unlimited."""
    days, _, clock = limit.strip().rpartition("-")
    fields = clock.split(":")
    if not all(f.isdigit() for f in fields) or not (days.isdigit() or days == ""):
        return None  # infinite, UNLIMITED
    nums = [int(f) for f in fields]
    h, m, s = nums if len(nums) == 3 else (0, *nums) if len(nums) == 2 else (0, nums[0], 0)
    return (int(days or 0) * 24 + h) * 60 + m + (s > 0)


def _infeasible(L, gpus: int, why: str, asks: str) -> str | None:
    """The one line for a request Slurm will never start, naming the settings to change (`asks`: the one that
    set the GPU count); None when a node of the partition fits it (the refusal is about now: that node is
    down, drained or reserved)."""
    part = L.get("partition")
    where = f"partition {part}" if part else "the default partition"
    nodes = _nodes(part)
    if part and not nodes:
        return f"launcher.partition={part}: Slurm says {why!r}; `sinfo -s` lists the partitions"
    if not nodes:
        return (f"Slurm will never start this job ({why}); check launcher.partition, account, qos, constraint "
                "and additional_parameters")
    need = {"cpus": int(L.cpus_per_task), "mem_mb": int(L.mem_gb * 1024), "gpus": gpus}
    limits = [n["time_min"] for n in nodes]
    over = [f"launcher.timeout_min={L.timeout_min} (the partition allows {max(limits)})"] \
        if None not in limits and L.timeout_min > max(limits) else []
    if any(all(n[k] >= v for k, v in need.items()) for n in nodes):
        if over:
            return f"Slurm will never start this job in {where} ({why}): lower {over[0]}"
        if "node configuration" in why:
            return None
        return (f"Slurm will never start this job in {where} ({why}); check launcher.account, qos, constraint "
                "and additional_parameters")
    top = {k: max(n[k] for n in nodes) for k in need}
    if need["cpus"] > top["cpus"]:
        over.append(f"launcher.cpus_per_task={L.cpus_per_task} (a node has at most {top['cpus']})")
    if need["mem_mb"] > top["mem_mb"]:
        over.append(f"launcher.mem_gb={L.mem_gb:g} (a node has at most {math.floor(top['mem_mb'] / 102.4) / 10:g})")
    if need["gpus"] > top["gpus"]:
        over.append(f"{asks} (a node has at most {top['gpus']})")
    if over:
        return f"no node of {where} can ever run this job ({why}): lower {' and '.join(over)}"
    shapes = ", ".join(f"{c} CPUs/{m / 1024:.0f} GB/{g} GPUs" for c, m, g in
                       sorted({(n["cpus"], n["mem_mb"], n["gpus"]) for n in nodes}, reverse=True)[:5])
    return (f"no node of {where} has launcher.cpus_per_task={L.cpus_per_task}, launcher.mem_gb={L.mem_gb:g} and "
            f"{asks} at once (nodes: {shapes}); lower one of them")


def _check_feasible(ex: submitit.SlurmExecutor, L, gpus: int, asks: str) -> None:
    """`sbatch --test-only` with the job's own script: a request no node can satisfy is accepted by sbatch
    but pends for ever (reason PartitionConfig), so refuse it here with the setting to change."""
    script = ex._make_submission_file_text("true", "test-only")  # the same #SBATCH lines submit() sends
    try:
        p = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"could not check the request with sbatch --test-only ({e}); submitting it unchecked")
        return
    if p.returncode == 0:
        return
    lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
    why = lines[-1].removeprefix("allocation failure: ").removeprefix("sbatch: error: ") if lines else "no reason"
    problem = _infeasible(L, gpus, why, asks)
    if problem:
        raise LaunchError(problem)
    log(f"sbatch --test-only: {why}, though a node fits the request (down or drained now?): submitting; "
        "the job waits for such a node")


def _submit(ex: submitit.SlurmExecutor, fn) -> submitit.Job:
    try:
        return ex.submit(fn)
    except FailedJobError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = lines[-1].removeprefix("sbatch: error: ") if lines else "no message"
        raise LaunchError(f"sbatch refused the job: {why}") from None


def submit(cfg):
    L = cfg.launcher
    hydra_cfg = current_hydra()
    if L.job == "server":
        url_file = Path(L.server_url_file).expanduser().resolve()
        folder = url_file.parent / f"{url_file.stem}.slurm"
        name, fn, gpus, run_dir = f"avo.server.{cfg.agent.name}", ServerJob(cfg, url_file), int(L.gpus_per_node), None
        asks = f"launcher.gpus_per_node={gpus}"
        comment = str(url_file)
    else:
        run_dir = run_dir_of(cfg)
        folder = run_dir / "slurm"
        _refuse_if_active(folder, run_dir)
        name = job_name(cfg, hydra_cfg)
        gpus, asks = _search_gpus(L, *gpus_needed(cfg))
        fn = SearchJob(cfg, hydra_cfg)
        comment = str(run_dir)
        name = _lane_name(name, cfg, hydra_cfg, str(run_dir.parent))
    ex = _executor(cfg, folder, name, comment, gpus)
    _check_feasible(ex, L, gpus, asks)
    job = _submit(ex, fn)
    record = {"job_id": job.job_id, "name": name, "kind": L.job, "run_dir": str(run_dir or ""),
              "url_file": comment if run_dir is None else "", "stdout": str(job.paths.stdout),
              "stderr": str(job.paths.stderr), "submitted_at": datetime.now(timezone.utc).isoformat(),
              "overrides": list(hydra_cfg.overrides.task) if hydra_cfg is not None else []}
    write_record(folder / RECORD, record)
    log(f"submitted job {job.job_id} {name}")
    log(f"  {'run dir' if run_dir else 'url file'}: {comment}")
    log(f"  log: {job.paths.stdout} (stderr: {job.paths.stderr.name})")
    if L.wait:
        return wait(job, float(L.poll_s))
    return record


def wait(job: submitit.Job, poll_s: float):
    """Block until the job ends (requeues included), printing each state change; raise if it failed."""
    last, t0 = None, time.monotonic()
    while True:
        state = job.state
        if state != last:
            log(f"job {job.job_id}: {state} ({time.monotonic() - t0:.0f} s)")
            last = state
        if job.done():
            break
        time.sleep(poll_s)
    try:
        result = job.result()
    except FailedJobError as e:
        raise LaunchError(f"job {job.job_id} failed: {_exception_line(str(e))} (log {job.paths.stderr})") from None
    except UncompletedJobError as e:
        raise LaunchError(f"job {job.job_id} ended {job.state} without a result: {_exception_line(str(e))} "
                          f"(log {job.paths.stderr}){_tail(job.paths.stderr)}") from None
    log(f"job {job.job_id} finished: {result}")
    return result


def _exception_line(report: str) -> str:
    """The `Type: message` line of the job's traceback, as submitit reports it."""
    lines = report.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last):")]
    after = lines[starts[-1] + 1:] if starts else lines
    line = next((ln for ln in after if ln.strip() and not ln.startswith((" ", "\t"))), "no message")
    kind, _, msg = line.partition(": ")
    return f"{kind.rsplit('.', 1)[-1]}: {msg}" if msg else line.strip()


def _tail(path: Path, n: int = 1) -> str:
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f"; last line: {lines[-1]}" if lines else ""
