"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML option in conf/<group>/ names its schema in its defaults list, so a
misspelled key or a value of the wrong type fails when the config is composed.
Cross-field rules (a group that divides the head count, positive budgets) are
checked by `validate`, which turns every problem into one line.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from avo.errors import ConfigError


# -- search ---------------------------------------------------------------------------------------
@dataclass
class StagnationConf:
    no_commit_steps: int = 8          # steps in a row without a commit
    consecutive_failures: int = 5     # evaluated attempts in a row that failed correctness/compile/run
    repeated_source: int = 3          # the same source proposed this many times
    max_redirects: int = 0            # stop after this many supervisor interventions on each island (0: never)


@dataclass
class CommitConf:
    """The commit rule on the paired comparison with the incumbent (avo.commit explains both)."""
    rule: str = "gain"                # gain: significantly faster; noninferior: not significantly slower
    alpha: float = 0.01               # one-sided level of each bound
    min_gain: float = 0.0             # gain: the lower bound must exceed 1 + min_gain
    config_margin: float = 0.01       # no config significantly slower by more than this fraction


@dataclass
class SearchConf:
    name: str = MISSING
    # variation steps after the seed: 500 steps of up to 3 attempts is the AVO paper's week (500+ directions in
    # 7 days), so max_hours, not max_steps, ends a week-long LLM search
    max_steps: int = 500
    max_hours: float = 168.0          # wall-clock budget for this run (all restarts together)
    attempts_per_step: int = 3        # evaluated candidates per step before moving on
    workers: int = 1                  # operators working at once on the lineage (avo.workers); 1: one at a time
    recheck_stale: bool = True        # workers: re-time a would-be commit whose parent is no longer the best
    # islands > 1: that many lineages in one run (avo.islands), each with workers / islands workers, so
    # the search keeps several lines of descent instead of one that can corner itself
    islands: int = 1
    # every M-th step times the leading head beside the others and copies it where it wins (0: never). 20 lets
    # an island take its own direction for a few commits between migrations, and lifts an island stuck far
    # behind 25 times in a default run
    migrate_every: int = 20
    commit: CommitConf = field(default_factory=CommitConf)
    stagnation: StagnationConf = field(default_factory=StagnationConf)


# -- agent (the variation operator) -----------------------------------------------------------------
@dataclass
class AgentConf:
    name: str = MISSING
    kind: str = MISSING               # "mutation" or "llm"
    model: str = ""


@dataclass
class MutationAgentConf(AgentConf):
    kind: str = "mutation"
    max_changes: int = 2              # tunables changed per candidate (1..max_changes)
    max_tries: int = 64               # draws before giving up on finding an untried variant
    ahead: int = 3                    # proposals per worker drawn and compiled ahead (avo.harness.ahead)


@dataclass
class LlmServerConf:
    mode: str = "managed"             # managed: start vLLM here; external: use base_url / url_file
    python: str = "python"            # interpreter of the environment vLLM is installed in (managed)
    model_path: str = ""              # what vLLM loads (folder or name); "" = agent.model
    gpus: list[int] = field(default_factory=list)  # CUDA_VISIBLE_DEVICES of the server; [] = leave unset
    tensor_parallel_size: int = 1
    max_model_len: int = 32768
    gpu_memory_utilization: float = 0.90
    dtype: str = "auto"
    tool_call_parser: str = "hermes"  # vLLM --tool-call-parser
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0                     # 0: a free port on 127.0.0.1
    start_timeout_s: float = 900.0    # until /health answers, else one clear error
    max_restarts: int = 3             # restarts with back-off after the server dies mid-run
    base_url: str = ""                # external: e.g. http://node17:8000/v1
    url_file: str = ""                # external: a file a server job publishes its base URL in
    url_wait_s: float = 600.0         # how long to wait for url_file and /health
    api_key_env: str = ""             # environment variable holding the API key ("" = none needed)
    max_num_seqs: int = 0             # managed: vLLM --max-num-seqs, conversations batched at once (0: its default)


@dataclass
class LlmSamplingConf:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 4096            # per reply
    tool_choice: str = "auto"         # auto | required (small models never choose a tool under auto)
    seed: int | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class LlmBudgetConf:
    max_turns: int = 40               # model replies per proposal
    max_tokens: int = 400_000         # prompt + completion tokens per proposal
    max_seconds: float = 3600.0       # wall time per proposal
    request_timeout_s: float = 600.0  # one chat request
    retries: int = 3                  # per request, on server errors and timeouts
    tool_output_chars: int = 12_000   # longer tool results are truncated
    supervisor_tokens: int = 2048     # reply budget of the supervisor


@dataclass
class LlmAgentConf(AgentConf):
    kind: str = "llm"
    server: LlmServerConf = field(default_factory=LlmServerConf)
    sampling: LlmSamplingConf = field(default_factory=LlmSamplingConf)
    budget: LlmBudgetConf = field(default_factory=LlmBudgetConf)
    llm_supervisor: bool = True       # redirect with the LLM; False: rule-based directions only
    knowledge_dirs: list[str] = field(default_factory=list)  # extra markdown folders to search
    source_in_prompt: bool = True     # put the best source in the first message (off for tiny contexts)
    tools: list[str] = field(default_factory=list)  # tools offered to the model ([] = all of them)


@dataclass
class ExternalBudgetConf:
    max_seconds: float = 3600.0       # wall time per step, from its opening (waiting for the agent included)
    max_tool_calls: int = 200         # tool calls per step (submit and next_step not counted); one more ends it
    idle_seconds: float = 600.0       # no call started for this long (none in flight): the agent is gone
    tool_output_chars: int = 12_000   # longer tool results are truncated


@dataclass
class ExternalAgentConf(AgentConf):
    """An outside agent (any MCP client) as the operator; see avo/agent/external.py."""
    kind: str = "external"
    port: int = 0                     # the MCP endpoint on 127.0.0.1 (0: a free port)
    token_file: str = ""              # "" = <run dir>/agent/mcp.token
    budget: ExternalBudgetConf = field(default_factory=ExternalBudgetConf)
    knowledge_dirs: list[str] = field(default_factory=list)  # extra markdown folders to search
    source_in_prompt: bool = True     # the best source in next_step's context
    tools: list[str] = field(default_factory=list)  # workbench tools offered ([] = all of them)


# -- kernel variant (the problem) -----------------------------------------------------------------
@dataclass
class BenchSetConf:
    tokens: int = 32768               # B * S for every benchmark shape
    seqlens: list[int] = field(default_factory=lambda: [4096, 8192, 16384, 32768])
    causal: list[bool] = field(default_factory=lambda: [False, True])


@dataclass
class CheckSetConf:
    batch: int = 2
    # (seqlen_q, seqlen_k) pairs; odd lengths on purpose
    seqlens: list[list[int]] = field(default_factory=lambda: [[1, 1], [17, 17], [1000, 1000], [4097, 4097],
                                                              [128, 300], [300, 128]])
    causal: list[bool] = field(default_factory=lambda: [False, True])


@dataclass
class KernelConf:
    name: str = MISSING               # mha | gqa
    heads_q: int = 16
    heads_kv: int = 16
    head_dim: int = 128
    bench: BenchSetConf = field(default_factory=BenchSetConf)
    check: CheckSetConf = field(default_factory=CheckSetConf)


# -- harness --------------------------------------------------------------------------------------
@dataclass
class ScreenConf:
    """A short paired run on the cheapest shape of each mask before the full benchmark."""
    iters: int = 6                    # timed iterations (0: no screen)
    margin: float = 0.02              # drop a candidate significantly slower than the incumbent by this
    alpha: float = 0.01


@dataclass
class HarnessConf:
    name: str = MISSING               # gpu | compile
    arch: str = "sm_90a"              # NVRTC target; "auto" (gpu only): the device's own
    timeout_s: float = 600.0          # hard kill of one evaluation (process group), whatever its stages' limits
    compile_timeout_s: float = 60.0   # the compile stage's own limit
    stage_mult: float = 4.0           # each later stage's limit: this times the incumbent's time for it,
    stage_floor_s: float = 10.0       # but at least this
    spares: int = 2                   # GPU workers kept started ahead, per GPU (torch, CUDA and the reference
                                      # ready); conf/harness/gpu.yaml derives it from search.workers
    cache_dir: str = "~/.cache/avo/cubin"  # cubins of the versions timed beside candidates (not of every candidate)
    # compiles run at once ahead of their evaluations (avo.harness.ahead, for an operator that proposes ahead:
    # agent.ahead); 0: one per core but one, and no more than the host memory holds at max_host_gb each
    ahead_jobs: int = 0
    keep_jobs: str = "failed"         # job folders kept after an evaluation: all | failed (crashed, timeout,
                                      # error, unavailable: for their worker.log) | none
    device: int = 0                   # CUDA device index the harness times on (when devices is unset)
    devices: list[int] | None = None  # several GPUs: a lock, spares and probe each; evaluations go to the least busy
    check_seeds: int = 2              # fresh random inputs per check shape
    # input sets of the verify stage a search draws from, their FP32 truths computed once each (avo.harness.truths;
    # 700 MB of disk each at the default MHA set); 0: fresh inputs, and their truths, in every evaluation
    truth_pool: int = 4
    err_mult: float = 2.0             # |out-ref| <= err_mult * |bf16 ref - ref| + atol
    atol: float = 1e-4
    warmup: int = 2                   # warm-up iterations, drawn from [warmup, 2 * warmup]
    iters: int = 10
    bench_budget_s: float = 2.0       # per benchmark shape: fewer iterations (>= 2) when a kernel is slow
    flush_l2: bool = True
    baselines: list[str] = field(default_factory=lambda: ["cudnn", "flash"])
    roofline_tflops: float = 989.4    # dense BF16 peak; any faster result is an error
    # bounds of one evaluation (avo.harness): local memory per thread (sm90 uses 0, sm80 80), the device
    # memory its harness allocations may take, the worker process group's host memory (a compile bomb)
    max_local_bytes: int = 1024
    max_device_gb: float = 24.0
    max_host_gb: float = 16.0
    # with an incumbent, cuDNN and FA2 are timed only for a would-be commit and this fraction of the rest
    baseline_fraction: float = 0.05
    screen: ScreenConf = field(default_factory=lambda: ScreenConf())
    profiler: str = "ncu"             # Nsight Compute, for the agent's profile tool (a name or a path)


# -- launcher -------------------------------------------------------------------------------------
@dataclass
class LauncherConf:
    name: str = MISSING               # local | slurm
    job: str = "search"               # search: run the search; server: serve agent's model (vLLM) for other jobs
    server_url_file: str = "outputs/servers/${agent.name}.url"  # job=server publishes its base URL here


@dataclass
class SlurmLauncherConf(LauncherConf):
    """One Slurm job per run (per sweep combination), submitted through submitit; see slurm/README.md."""
    name: str = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    timeout_min: int = 2880           # per job; on the time limit the job checkpoints and requeues itself
    signal_delay_s: int = 120         # SIGUSR2 this long before the limit (keep it + ~30 s under timeout_min)
    max_requeues: int = 1000          # time-limit requeues per run (preemptions do not count)
    gpus_per_node: int = 0            # 0: a search asks for harness.devices and agent.server.gpus (avo.harness.devices)
    cpus_per_task: int = 8
    mem_gb: float = 64.0
    max_parallel: int = 0             # >0: at most this many jobs of one sweep run at once (singleton lanes)
    setup: list[str] = field(default_factory=list)        # shell lines before the job: module load, venv
    python: str | None = None         # how the job starts Python, e.g. "apptainer exec --nv avo.sif python"
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # any other #SBATCH --key=value
    srun_args: list[str] = field(default_factory=list)
    wait: bool = False                # block until the job ends (tests, short runs); else submit and return
    poll_s: float = 10.0              # state polling period while waiting


@dataclass
class Config:
    search: Any = MISSING
    agent: Any = MISSING
    kernel: Any = MISSING
    harness: Any = MISSING
    launcher: Any = MISSING
    group: int = 1                    # GQA group size: query heads per KV head (not a Hydra config group)
    seed: str = "sm90"                # seed kernel: a name in kernels_cuda/, a .cu path, or <run dir>[:<version>]
    rng: int = 0                      # random seed of the operator
    resume: str | None = None         # an existing run directory to continue
    run_dir: str = "${hydra:runtime.output_dir}"
    # python -m avo.bench only (conf/bench.yaml): what to time, and where the results go
    seeds: list[str] = field(default_factory=list)  # seed specs as for `seed`; [] = [seed]
    out: str | None = None            # output folder; None = outputs/bench/<date>_<kernel>_g<group>
    profile: str | None = None        # a benchmark shape key, or "first": Nsight Compute instead of timing


def register() -> None:
    """Schemas live in schema/<group>, outside the option namespace: `agent=` lists only real agents.

    Each option extends its schema with `- /schema/<group>@_here_: <name>` in its defaults list.
    """
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, name, node in (("search", "search", SearchConf), ("agent", "mutation", MutationAgentConf),
                              ("agent", "llm", LlmAgentConf), ("agent", "external", ExternalAgentConf),
                              ("kernel", "kernel", KernelConf), ("harness", "harness", HarnessConf),
                              ("launcher", "launcher", LauncherConf), ("launcher", "slurm", SlurmLauncherConf)):
        cs.store(group=f"schema/{group}", name=name, node=node)
    _register_resolvers()


def _div(a: int, b: int) -> int:
    if b <= 0 or a % b:
        raise ConfigError(f"group={b} does not divide the {a} query heads (choose a divisor of {a})")
    return a // b


def flat_dirname(name: str, limit: int = 200) -> str:
    """One folder name for a sweep job: path-valued overrides (seed=/a/run) would nest folders."""
    flat = str(name).replace("/", "_")
    if len(flat) <= limit:
        return flat
    return f"{flat[:limit - 9]}-{hashlib.sha256(flat.encode()).hexdigest()[:8]}"


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("avo_div"):
        OmegaConf.register_new_resolver("avo_div", _div)
    if not OmegaConf.has_resolver("avo_dirname"):
        OmegaConf.register_new_resolver("avo_dirname", flat_dirname)
    if not OmegaConf.has_resolver("avo_spares"):
        OmegaConf.register_new_resolver("avo_spares", spares_for)


def spares_for(workers: int, devices) -> int:
    """Spare GPU workers per device: one per search worker the device serves, plus one, and at least
    two (quick rejections, such as compile errors, use spares up faster than they start)."""
    return max(2, -(-int(workers) // max(1, len(devices or [0]))) + 1)


def validate(cfg: DictConfig, check_seed: bool = True) -> None:
    """Resolve the whole config and check cross-field rules; raise ConfigError with one line."""
    if not isinstance(cfg.group, int) or cfg.group < 1:
        raise ConfigError(f"group={cfg.group} must be an integer >= 1")
    if "avo_div" in str(OmegaConf.to_container(cfg.kernel)):  # the group decides the KV heads
        _div(cfg.kernel.heads_q, cfg.group)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    k, s = cfg.kernel, cfg.search
    if k.name == "mha" and cfg.group != 1:
        raise ConfigError(f"kernel=mha has one KV head per query head; use kernel=gqa for group={cfg.group}")
    if k.heads_q % k.heads_kv:
        raise ConfigError(f"kernel.heads_kv={k.heads_kv} does not divide kernel.heads_q={k.heads_q}")
    from avo.problem import HEAD_DIMS

    if k.head_dim not in HEAD_DIMS:
        raise ConfigError(f"kernel.head_dim={k.head_dim}: supported head dims are {', '.join(map(str, HEAD_DIMS))}")
    if check_seed and not cfg.get("resume"):  # the seed's YAML says which head dims and architectures it runs
        from avo.seeds import resolve

        resolve(cfg.seed).check(k.head_dim, cfg.harness.arch)
    for name in ("max_steps", "attempts_per_step"):
        if s[name] < 1 if name == "attempts_per_step" else s[name] < 0:
            raise ConfigError(f"search.{name}={s[name]} must be {'>= 1' if name == 'attempts_per_step' else '>= 0'}")
    if s.max_hours <= 0:
        raise ConfigError(f"search.max_hours={s.max_hours} must be positive")
    if s.workers < 1:
        raise ConfigError(f"search.workers={s.workers} must be >= 1")
    if s.islands < 1 or s.islands > 100:
        raise ConfigError(f"search.islands={s.islands} must be between 1 and 100")
    if s.workers % s.islands:
        raise ConfigError(f"search.workers={s.workers} must be a multiple of search.islands={s.islands}: "
                          "each island gets workers / islands workers")
    if s.migrate_every < 0 or s.migrate_every == 1:
        raise ConfigError(f"search.migrate_every={s.migrate_every} must be 0 (never) or >= 2: every M-th step "
                          "migrates, the others vary")
    if s.workers > 1 and cfg.agent.kind == "external":
        raise ConfigError(f"search.workers={s.workers}: agent={cfg.agent.name} is one outside agent on one "
                          "endpoint; use search.workers=1 with it")
    from avo.agent import check
    from avo.launcher import check as check_launcher

    check(cfg.agent)
    check_launcher(cfg)
    from avo.commit import RULES

    c = s.commit
    if c.rule not in RULES:
        raise ConfigError(f"search.commit.rule={c.rule!r}: use one of {', '.join(RULES)}")
    if not 0 < c.alpha < 0.5 or c.min_gain < 0 or not 0 <= c.config_margin < 1:
        raise ConfigError("search.commit.alpha must be in (0, 0.5), min_gain >= 0, config_margin in [0, 1)")
    for name, v in s.stagnation.items():
        if v < 0:
            raise ConfigError(f"search.stagnation.{name}={v} must be >= 0")
    if k.bench.tokens < 1 or any(n < 1 or k.bench.tokens % n for n in k.bench.seqlens):
        raise ConfigError(f"kernel.bench.seqlens {list(k.bench.seqlens)} must divide "
                          f"kernel.bench.tokens={k.bench.tokens}")
    from avo.harness import KEEP_JOBS

    h = cfg.harness
    if h.keep_jobs not in KEEP_JOBS:
        raise ConfigError(f"harness.keep_jobs={h.keep_jobs!r}: use one of {', '.join(KEEP_JOBS)}")
    if (min(h.timeout_s, h.compile_timeout_s, h.stage_floor_s, h.stage_mult) <= 0 or h.iters < 1
            or min(h.spares, h.ahead_jobs, h.truth_pool) < 0):
        raise ConfigError("harness.timeout_s, compile_timeout_s, stage_floor_s and stage_mult must be positive, "
                          "harness.iters >= 1, and harness.spares, ahead_jobs and truth_pool >= 0")
    if h.max_local_bytes < 0 or min(h.max_device_gb, h.max_host_gb) <= 0 or not 0 <= h.baseline_fraction <= 1:
        raise ConfigError("harness.max_local_bytes must be >= 0, max_device_gb and max_host_gb positive, "
                          "baseline_fraction in [0, 1]")
    from avo.harness.devices import check_gpus

    check_gpus(cfg)


def _one_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__
