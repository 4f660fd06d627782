"""The small data types every part of AVO passes around."""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Protocol


class Status(str, Enum):
    OK = "ok"
    INVALID = "invalid"              # the operator produced no usable source (bad edit, bad LLM output)
    COMPILE_ERROR = "compile_error"  # NVRTC or the launch contract rejected it
    INCORRECT = "incorrect"          # ran, but failed a correctness check
    CRASHED = "crashed"              # worker died: illegal address, trap, abort
    TIMEOUT = "timeout"              # worker killed after the hard timeout
    ERROR = "error"                  # harness-side failure (e.g. result above the roofline)
    UNAVAILABLE = "unavailable"      # the environment is broken (no NVRTC, driver or GPU): never a candidate's fault
    INTERRUPTED = "interrupted"      # the search was stopped (a signal, a requeue) before a verdict (avo.interrupt)


class Decision(str, Enum):
    """What the search made of a row (the lineage's `decision`); its Status says how the evaluation went."""
    SEED = "seed"                    # x0: the seed, or the first correct candidate after a transferred seed failed
    COMMITTED = "committed"          # passed the commit rule against the island's head: the next version
    MIGRATED = "migrated"            # a migration: another island's head, significantly faster than this one's
    KEPT = "kept"                    # a migration's paired round that left this island's head in place
    NOT_FASTER = "not_faster"        # not significantly faster than the head (noninferior: significantly slower)
    REGRESSION = "regression"        # a config significantly slower by more than search.commit.config_margin
    SCREENED = "screened"            # stopped at the screen: clearly slower on the cheapest shapes
    UNPAIRED = "unpaired"            # ranked, but not timed side by side with the head
    STALE = "stale"                  # beat a head that another worker replaced before the decision, not the new one
    UNRANKED = "unranked"            # passed, but the harness times nothing (harness=compile)
    FAILED = "failed"                # the evaluation did not pass: its status says how
    INVALID = "invalid"              # the operator produced no candidate
    INTERRUPTED = "interrupted"      # cut short by SIGTERM/SIGINT before a decision


COMMITS = frozenset({Decision.SEED, Decision.COMMITTED, Decision.MIGRATED})  # decisions that add a version
MIGRATION = frozenset({Decision.MIGRATED, Decision.KEPT})  # a migration step's rows: no operator's attempts
FAILED_ONLY = frozenset({Decision.FAILED, Decision.INVALID, Decision.INTERRUPTED})  # recorded with a failed status
# What an attempt came to: its decision when its evaluation passed, else its status. One name each, so every
# attempt (step > 0, not a migration's row) counts under exactly one of these (avo.schema.OUTCOME computes it).
# An attempt decided `seed` became v0 after a transferred seed failed: its outcome is ADAPTED (a run's `seed`
# is the seed it was started from).
ADAPTED = "adapted"
OUTCOMES = tuple([ADAPTED if d is Decision.SEED else d.value for d in Decision if d not in MIGRATION | FAILED_ONLY]
                 + [s.value for s in Status if s is not Status.OK])


@dataclass(frozen=True)
class Shape:
    """One attention problem: (B, S, H, D) tensors, BF16."""
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool

    @property
    def key(self) -> str:
        s = f"{self.seqlen_q}" if self.seqlen_q == self.seqlen_k else f"{self.seqlen_q}x{self.seqlen_k}"
        return (f"{'causal' if self.causal else 'full'}_b{self.batch}_s{s}"
                f"_h{self.heads_q}-{self.heads_kv}_d{self.head_dim}")

    @property
    def flops(self) -> float:
        """4·B·H·Sq·Sk·D, halved for causal (the FlashAttention convention)."""
        f = 4.0 * self.batch * self.heads_q * self.seqlen_q * self.seqlen_k * self.head_dim
        return f / 2 if self.causal else f


@dataclass(frozen=True)
class Problem:
    """A kernel variant: what the candidate must compute and where it is timed."""
    name: str
    heads_q: int
    heads_kv: int
    head_dim: int
    bench: tuple[Shape, ...]
    check: tuple[Shape, ...]

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv


@dataclass
class ConfigResult:
    """Timing of one benchmark shape (TFLOPS from the median time)."""
    key: str
    tflops: float | None = None
    ms: float | None = None
    ms_p10: float | None = None
    ms_p90: float | None = None
    cudnn_tflops: float | None = None
    fa2_tflops: float | None = None
    max_err: float | None = None
    samples: list[float] = field(default_factory=list)  # ms of each timed iteration, in order
    # the incumbent (and the commit rule's anchor), timed in the same iterations on the same inputs
    incumbent_tflops: float | None = None
    incumbent_samples: list[float] = field(default_factory=list)
    anchor_tflops: float | None = None
    anchor_samples: list[float] = field(default_factory=list)
    ratio: float | None = None       # candidate speed / incumbent speed (avo.paired), with one-sided bounds
    ratio_lo: float | None = None
    ratio_hi: float | None = None

    @property
    def vs_cudnn(self) -> float | None:
        return self.tflops / self.cudnn_tflops if self.tflops and self.cudnn_tflops else None


@dataclass
class EvalResult:
    status: Status
    ranked: bool = False            # False: the score says nothing about speed (harness=compile)
    score: float | None = None      # geometric mean TFLOPS over the benchmark shapes
    configs: list[ConfigResult] = field(default_factory=list)
    error: str = ""                 # one actionable paragraph
    log: str = ""                   # compile/verify log, truncated
    registers: int | None = None
    spill_bytes: int | None = None
    stack_bytes: int | None = None
    smem_bytes: int | None = None
    threads: int | None = None
    compile_s: float = 0.0
    verify_s: float = 0.0
    bench_s: float = 0.0
    gpu: str = ""
    compiler: str = ""              # what built the cubin ("nvrtc 13.0"): versions differ in what they accept
    device: int | None = None       # the CUDA device index it ran on (harness.devices); None: no GPU
    sm_clock_mhz: float | None = None
    power_w: float | None = None
    stage: str = ""                 # the last timed stage: "screen" (stopped there) or "bench"
    screen_s: float = 0.0
    # the paired comparison (avo.paired): candidate / incumbent geomean speed, one-sided bounds
    paired_ratio: float | None = None
    paired_lo: float | None = None
    paired_hi: float | None = None
    incumbent_score: float | None = None  # the incumbent's geomean TFLOPS in the same run
    anchor_ratio: float | None = None     # candidate / anchor (the rule's guard against drift)
    anchor_lo: float | None = None
    anchor_hi: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalResult":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["status"] = Status(d["status"])
        d["configs"] = [ConfigResult(**c) for c in d.get("configs", [])]
        return cls(**d)


def sha256(text: str) -> str:
    """A source's identity: the lineage's source_sha, the harness's job folders and compiles ahead (here, not in
    avo.lineage, so that the worker processes need not import polars to name a source)."""
    return hashlib.sha256(text.encode()).hexdigest()


def geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    if not xs or any(x <= 0 for x in xs):
        return None
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


@dataclass
class Reference:
    """A committed version that a candidate is timed against, side by side in the same run."""
    role: str                       # "incumbent" (the best version now) or "anchor" (see avo.commit)
    version: int
    source: str
    stage_s: dict[str, float] = field(default_factory=dict)  # its measured verify/screen/bench seconds


@dataclass
class Version:
    """A committed version x_k of the lineage."""
    version: int
    candidate_id: str
    source: str
    score: float | None
    configs: list[ConfigResult]
    message: str = ""
    stage_s: dict[str, float] = field(default_factory=dict)  # its own verify/screen/bench seconds
    gain: bool = True              # committed as a significant gain (or the seed): a drift anchor
    island: int = 0                # the lineage it belongs to (search.islands; v0 belongs to all)
    # what the lineage proved about its speed, side by side: against the version it replaced (its parent) and,
    # those ratios chained along its island (avo.history), against v0; None where nothing was timed
    ratio: float | None = None
    ratio_lo: float | None = None
    ratio_hi: float | None = None
    chain_ratio: float | None = None
    chain_lo: float | None = None
    chain_hi: float | None = None

    def reference(self, role: str) -> Reference:
        return Reference(role, self.version, self.source, self.stage_s)


@dataclass
class Attempt:
    """An evaluated candidate as the operator is shown it."""
    candidate_id: str
    source: str
    status: Status
    decision: str
    score: float | None
    error: str
    message: str = ""
    version: int | None = None     # set when it was committed


@dataclass
class StepContext:
    step: int
    attempt: int
    best: Version                  # the version to improve on
    history: list[Version]         # the committed versions of its island (all of them: one island), oldest first
    failures: list[Attempt]        # this step's earlier attempts
    problem: Problem
    bench: "Bench"                 # what the operator may do with the harness, bound to this step
    run_dir: Path
    rng: random.Random
    tried: set[str]                # source hashes already evaluated in this run
    directive: str | None = None   # the supervisor's latest redirection
    deadline: float | None = None  # time.monotonic() by which the search must stop (search.max_hours)
    recent: list[Attempt] = field(default_factory=list)  # its island's latest attempts (any step), oldest first
    directions: list[str] = field(default_factory=list)  # the supervisor's earlier directives to its island


@dataclass
class Proposal:
    source: str
    message: str = ""
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_calls: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


class ProposalError(Exception):
    """The operator could not produce a candidate; recorded as an `invalid` attempt."""

    def __init__(self, message: str, proposal: Proposal | None = None):
        super().__init__(message)
        self.proposal = proposal


class Bench(Protocol):
    """An operator's narrow view of the harness for one step: its problem and its incumbent are bound.

    Results are cached by source hash and purpose, so no tool evaluates the same source twice for
    the same question; the commit decision stays the search's own evaluation."""
    name: str
    ranks: bool      # benchmark() measures speed
    checks: bool     # check() runs the kernel (False: it only compiles)
    profiles: bool   # profile() can run Nsight Compute
    timeout_s: float  # the longest one evaluation can take

    def compile(self, source: str) -> EvalResult: ...

    def check(self, source: str) -> EvalResult: ...

    def benchmark(self, source: str) -> EvalResult:
        """The full evaluation, timed side by side with the step's incumbent where the harness times."""
        ...

    def profile(self, source: str, shape: str | None = None) -> str:
        """Nsight Compute's summary; raises ProfileError with one line where there is none."""
        ...


class Harness(Protocol):
    name: str
    ranks: bool  # does `score` measure speed?
    checks: bool  # does it run kernels (correctness)?
    profiles: bool  # can it profile?
    arch: str    # what it compiles for (sm_90a, ...), resolved from the device where it times

    def evaluate(self, source: str, problem: Problem, mode: str | None = None,
                 against: list[Reference] | None = None, deadline: float | None = None) -> EvalResult: ...

    def close(self) -> None: ...


@dataclass
class Redirect:
    """A supervisor intervention: the directive for the next steps and what producing it cost."""
    directive: str
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_calls: int = 0
    latency_s: float = 0.0


class Operator(Protocol):
    name: str
    model: str
    # proposals a worker may draw before the last one is judged (avo.workers, compiled ahead by the harness):
    # 0 for an operator whose next proposal reads the last verdict (an agent)
    ahead: int = 0

    def propose(self, ctx: StepContext) -> Proposal: ...

    def redirect(self, ctx: StepContext, reason: str) -> Redirect | None:
        """Called by the search on stagnation; returns the recorded intervention, if any."""
        ...

    def close(self) -> None: ...
