"""What several workers share: the device lock, the harness, the notes, one vLLM server's limits."""
import json
import subprocess
import sys
import threading
import time

import pytest

from avo.agent.memory import Notes
from avo.config import ConfigError, validate
from avo.harness import make_harness
from avo.harness.devlock import gpu_lock
from avo.problem import problem_from_cfg
from tests.conftest import DATA, ROOT

HOLD = """
import json, sys, time
from avo.harness.devlock import gpu_lock
path, exclusive, n, hold = sys.argv[1] or None, sys.argv[2] == "1", int(sys.argv[3]), float(sys.argv[4])
for _ in range(n):
    with gpu_lock(path, exclusive):
        t0 = time.monotonic(); time.sleep(hold); t1 = time.monotonic()
    print(json.dumps([exclusive, t0, t1]), flush=True)
"""


def _hold_in_threads(path, exclusive, n, hold, out):
    def one():
        for _ in range(n):
            with gpu_lock(path, exclusive):
                t0 = time.monotonic()
                time.sleep(hold)
                out.append([exclusive, t0, time.monotonic()])
    return [threading.Thread(target=one) for _ in range(2)]


def holds(path, n=4, hold=0.05) -> list[list]:
    """Timed (exclusive) and check (shared) holders in two processes and two threads of this one."""
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(path or ""), ex, str(n), str(hold)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for ex in ("1", "0", "1", "0")]
    spans: list[list] = []
    threads = _hold_in_threads(path, True, n, hold, spans) + _hold_in_threads(path, False, n, hold, spans)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        spans += [json.loads(line) for line in p.communicate(timeout=60)[0].splitlines()]
    return spans


def overlaps(spans) -> tuple[int, int]:
    """(overlaps involving an exclusive holder, overlaps between shared holders)."""
    timed = shared = 0
    for i, (ea, a0, a1) in enumerate(spans):
        for eb, b0, b1 in spans[i + 1:]:
            if a0 < b1 and b0 < a1:
                timed += ea or eb
                shared += not (ea or eb)
    return timed, shared


def test_a_timed_stage_never_overlaps_another_holder_across_threads_and_processes(tmp_path):
    spans = holds(tmp_path / "locks" / "gpu-x.lock")
    assert len(spans) == 8 * 4
    timed, shared = overlaps(spans)
    assert timed == 0, f"{timed} overlaps with a timed stage"
    assert shared > 0, "correctness checks (shared) may run together"


def test_without_the_lock_the_overlap_check_sees_overlaps(tmp_path):
    assert overlaps(holds(None))[0] > 0  # the check above can fail


def test_threads_evaluating_the_same_source_at_once_do_not_collide(cfg_factory, tmp_path):
    cfg = cfg_factory("harness=compile", "harness.keep_jobs=all")  # the folders stay, to be counted
    harness = make_harness(cfg.harness, tmp_path / "work")
    problem = problem_from_cfg(cfg.kernel)
    source = (DATA / "tunable.cu").read_text()
    results = []
    threads = [threading.Thread(target=lambda: results.append(harness.evaluate(source, problem))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status.value for r in results] == ["ok"] * 3 and all(r.registers for r in results)
    assert len(list((tmp_path / "work").iterdir())) == 3  # one job directory per thread


def test_notes_written_by_many_workers_at_once_all_arrive_whole(tmp_path):
    notes = Notes(tmp_path, max_note_chars=100_000)
    text = "x" * 30_000  # longer than one buffered write: unlocked appends would interleave

    def write(w):
        for i in range(40):
            notes.add(w * 100 + i, f"worker {w} note {i} {text}")
    threads = [threading.Thread(target=write, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = notes.read().split("## step ")[1:]
    assert len(entries) == 240 and all(e.rstrip().endswith(text) for e in entries)


def test_a_note_waits_for_the_notes_file_lock(tmp_path):
    """Appends hold a lock on the file itself, so writers in other processes (or on NFS) take turns."""
    import fcntl

    notes = Notes(tmp_path)
    notes.add(0, "first")
    with open(notes.path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t = threading.Thread(target=notes.add, args=(1, "second"))
        t.start()
        t.join(0.3)
        assert t.is_alive() and "second" not in notes.read()
    t.join(5)
    assert "second" in notes.read()


def test_workers_config(cfg_factory):
    validate(cfg_factory("search.workers=4"))
    with pytest.raises(ConfigError, match="search.workers=0"):
        validate(cfg_factory("search.workers=0"))
    with pytest.raises(ConfigError, match="search.workers=1 with it"):
        validate(cfg_factory("search.workers=2", "agent=external"))


def test_the_managed_server_gets_the_concurrency_limit(cfg_factory, tmp_path):
    from avo.agent.server import ManagedVllm

    cfg = cfg_factory("agent=smollm", "agent.server.max_num_seqs=8")
    cmd = ManagedVllm(cfg.agent.server, "m", tmp_path).command(8000)
    assert cmd[cmd.index("--max-num-seqs") + 1] == "8"
    assert "--max-num-seqs" not in ManagedVllm(cfg_factory("agent=smollm").agent.server, "m", tmp_path).command(1)
