"""The timed stages' measurement: kernels and baselines timed interleaved (avo.harness.timing), and
every launch of a checked kernel judged. Serves the search's screen and benchmark and
`python -m avo.bench`, so the numbers the search commits on and those reported are measured alike.

Every launch of a checked kernel (warm-ups and the wall-clock launch included) gets fresh inputs
and its own copy of them, and is checked on the GPU without a host synchronisation: inputs left
bit-identical, nothing written outside O, LSE and the tile counter, and every row of O and LSE
against a reference computed on the same inputs in the same iteration: the incumbent where one is
timed beside it (it passed the FP32 check, and its output costs nothing more), else
FlashAttention-2. The tolerance follows from the precision: a candidate may be as far off the FP32
truth as the verify stage allows (err_mult times BF16's own error), the reference is as far off as
it measurably is, plus one BF16 ulp for rows nobody sampled; both measured on the shape's first
launch. A reference that fails the FP32 check itself is replaced by FlashAttention-2. One launch,
drawn uniformly from all of them, is also judged against the FP32 truth on sampled rows; the
module's memory is compared after each shape.

A kernel may read any memory of its process, so nothing that holds the answer stays where it
could find it while it runs: every other kernel's and baseline's outputs are poisoned right after
their call, the reference's after a copy to a randomly placed vault; FlashAttention-2 as an
untimed reference runs after every kernel of the iteration. A host wall-clock suspicion (work
outside the grid) is measured again, alone, before it is a verdict. Worker-side.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from avo.harness.check import Outputs, Truth, judge, random_scale, truth
from avo.harness.reference import REFERENCE, sdpa_baseline
from avo.harness.stopwatch import piece
from avo.harness.timing import Timer, hidden_work, sensors
from avo.harness.verify import LSE_ATOL
from avo.types import ConfigResult, Shape, Status

RECHECK_ROWS = 128  # query rows checked against the FP32 reference in one timed output per shape
WALL_REPEATS = 5    # re-measurements, alone, of a launch whose host wall-clock time looked wrong
VAULT_SPREAD = 1 << 24  # elements of random offset of the reference's copy (32 MB of BF16)
ULP = 2.0 ** -8     # one BF16 ulp, relative: two honest kernels round to neighbouring numbers
_FLAGS = ("left NaN in its outputs", "wrote Inf into O", "wrong rows of O", "wrong LSE",
          "modified its inputs", "wrote outside O, LSE or its tile counter")


class NoReference(RuntimeError):
    """Nothing trustworthy to check a shape's launches against: the harness's failure, not the candidate's."""
    status = Status.ERROR


@dataclass
class Bench:
    configs: dict[str, list[ConfigResult]] = field(default_factory=dict)
    errors: dict[str, tuple[Status, str]] = field(default_factory=dict)  # per kernel name
    sensed: dict = field(default_factory=dict)


def _flags(out: Outputs, kern, mine: tuple, pristine: tuple, ref: tuple, tol: tuple) -> torch.Tensor:
    """One launch's checks of one kernel as a GPU tensor of _FLAGS (no host synchronisation)."""
    o, lse = out.o, out.lse
    ref_o, ref_lse = ref
    tol_rel, atol, lse_tol = tol
    # the same numbers in fewer passes over O, once a launch: `o - ref` upcasts the BF16 side exactly, and a
    # row's magnitude is exact in BF16 (abs and max round nothing)
    diff = (o - ref_o.float()).abs_().amax(-1)
    mag = ref_o.abs().amax(-1).float()
    changed = torch.stack([(a != b).any() for a, b in zip(mine, pristine, strict=True)]).any()
    guards = out.guards_broken() | kern.guards_broken()
    return torch.stack([torch.isnan(o).any() | torch.isnan(lse).any(), torch.isinf(o).any(),
                        (diff > tol_rel * mag + atol).any(), ((lse - ref_lse).abs() > lse_tol).any(),
                        changed, guards])


def _sample_rows(shape: Shape, gen) -> torch.Tensor:
    rows = torch.randperm(shape.seqlen_q, generator=gen, device=gen.device)[:RECHECK_ROWS]
    return torch.unique(torch.cat([rows, torch.tensor([0, shape.seqlen_q - 1], device=gen.device)]))


def tolerances(t: Truth, ref: tuple, atol: float, err_mult: float) -> tuple[tuple, str]:
    """(relative per-row tolerance of O, absolute floor, LSE tolerance) for checking against `ref`, and
    why `ref` is no reference ("" when it is): it must pass the FP32 check on the truth's rows itself."""
    ok, _, why = judge(ref[0], ref[1], t, atol, LSE_ATOL)
    o, lse = ref[0][:, t.rows].float(), ref[1][:, :, t.rows]
    mag = t.o.abs().amax(-1).clamp_min(1e-30)
    e_ref = ((o - t.o).abs().amax(-1) / mag).max().item()
    finite = torch.isfinite(t.lse)
    e_lse = (lse[finite] - t.lse[finite]).abs().max().item() if finite.any() else 0.0
    return (t.row_tol + e_ref + ULP, atol, LSE_ATOL + e_lse), "" if ok else why


class _Vault:
    """Where the reference's outputs wait for the checks: a copy at a random offset, away from the
    buffers the kernels are given (the original is poisoned before the next kernel runs)."""

    def __init__(self, shape: Shape, rng: random.Random, device):
        b, sq, hq, d = shape.batch, shape.seqlen_q, shape.heads_q, shape.head_dim
        at_o, at_l = (rng.randrange(VAULT_SPREAD // 64) * 64 for _ in range(2))
        self.o = torch.empty(at_o + b * sq * hq * d, dtype=torch.bfloat16, device=device)[at_o:].view(b, sq, hq, d)
        self.lse = torch.empty(at_l + b * hq * sq, dtype=torch.float32, device=device)[at_l:].view(b, hq, sq)

    def keep(self, o, lse) -> None:
        self.o.copy_(o)
        self.lse.copy_(lse)


def benchmark(kernels: dict, shapes: tuple[Shape, ...], hc: dict, log, checked: set[str],
              iters: int | None = None, warmup: int | None = None, baselines: list[str] | None = None,
              reference: str | None = None) -> Bench:
    """Time every kernel and baseline on every shape, interleaved, checking every launch of the
    kernels in `checked` against `reference` (a kernel's name: the incumbent) or FlashAttention-2."""
    with piece("alloc"):
        timer = Timer(hc["flush_l2"])
    with piece("sensors"):
        nvml = sensors(hc)
    rng = random.Random(time.time_ns())
    gen = torch.Generator(device="cuda")
    gen.manual_seed(rng.getrandbits(62))
    out = Bench({n: [] for n in kernels})
    baselines = list(hc["baselines"] if baselines is None else baselines)
    run = dict(hc, iters=hc["iters"] if iters is None else iters, warmup=hc["warmup"] if warmup is None else warmup)
    clocks, powers = [], []
    for i, shape in enumerate(shapes, 1):
        live = {n: kern for n, kern in kernels.items() if n not in out.errors}
        stage = _Shape(live, shape, run, log, checked & set(live), timer, rng, gen, baselines, reference)
        try:
            with piece(f"@{shape.key}"):
                stats, problems = stage.run()
        finally:
            stage.release()
        clock, power = nvml.read()
        if clock is not None:
            clocks.append(clock)
            powers.append(power)
        base = {bn: shape.flops / (stats[bn].ms * 1e9) for bn in baselines if bn in stats}
        for n in live:
            st = stats[n]
            tflops = shape.flops / (st.ms * 1e9)
            msg, status, max_err, wall = problems.get(n, ("", Status.INCORRECT, None, None))
            if not msg and n in checked and tflops > hc["roofline_tflops"]:
                msg, status = f"{tflops:.0f} TFLOPS is above the {hc['roofline_tflops']} roofline", Status.ERROR
            if msg:
                out.errors[n] = (status, f"{shape.key}: {msg}")
            out.configs[n].append(ConfigResult(shape.key, tflops, st.ms, st.ms_p10, st.ms_p90, base.get("cudnn"),
                                               base.get("flash"), max_err, samples=st.samples))
            log(f"  [{i}/{len(shapes)}] {shape.key} {n}: {tflops:7.1f} TFLOPS ({st.ms:.3f} ms, p10 {st.ms_p10:.3f}, "
                f"p90 {st.ms_p90:.3f}, n={st.n}" + (f", wall {wall:.3f}" if wall is not None else "") + ")"
                + (f"  ERROR {msg}" if msg else ""))
        if base or clock is not None:
            log(f"  [{i}/{len(shapes)}] {shape.key} " + ", ".join(f"{bn} {t:.1f} TFLOPS" for bn, t in base.items())
                + (f"; SM {clock:.0f} MHz, {power:.0f} W" if clock is not None else ""))
    out.sensed = {"sm_clock_mhz": sum(clocks) / len(clocks) if clocks else None,
                  "power_w": sum(powers) / len(powers) if powers else None}
    return out


class _Shape:
    """One shape of `benchmark`: run() gives (Stats per name, {kernel: (problem, status, max_err, wall ms)})."""

    def __init__(self, live: dict, shape: Shape, hc: dict, log, checked: set[str], timer: Timer,
                 rng: random.Random, gen, baselines: list[str], reference: str | None):
        self.live, self.shape, self.hc, self.log, self.checked = live, shape, hc, log, checked
        self.timer, self.rng, self.gen = timer, rng, gen
        b, sq, sk, d = shape.batch, shape.seqlen_q, shape.seqlen_k, shape.head_dim
        hq, hkv, dev = shape.heads_q, shape.heads_kv, gen.device  # the device is the generator's
        self.ref_name = reference if reference in live and reference not in checked else REFERENCE
        with piece("alloc"):
            self.q = torch.empty(b, sq, hq, d, dtype=torch.bfloat16, device=dev)
            self.k, self.v = (torch.empty(b, sk, hkv, d, dtype=torch.bfloat16, device=dev) for _ in range(2))
            # each kernel gets its own copy of the inputs and its own outputs, from slots reassigned at random
            # every iteration: where a buffer sits in memory can move a kernel's time by a percent, and that
            # must not favour one of two kernels compared pair by pair
            self.slots = [(tuple(torch.empty_like(t) for t in (self.q, self.k, self.v)), Outputs(shape, dev))
                          for _ in live]
            self.vault = _Vault(shape, rng, dev) if self.ref_name in live or self.ref_name in baselines else None
        self.mine, self.outs, self.last = {}, {}, {}
        self.scale, self.ref, self.tol, self.recheck_at = 1.0 / d ** 0.5, None, None, 0
        self.fns = {n: (lambda kern=kern, n=n: kern(*self.mine[n], self.outs[n].o, self.outs[n].lse, shape.causal,
                                                   self.scale)) for n, kern in live.items()}
        self.prep = {n: (lambda n=n: self.outs[n].poison()) for n in live}
        self.post = {n: (lambda n=n: self._hide(n)) for n in live if n not in checked}
        self.flash = None  # FlashAttention-2 on the iteration's inputs, when it is an untimed reference
        # beside a reference kernel (the incumbent) FA2 is only the fallback for a reference that fails the
        # FP32 check: its first call (sdpa_baseline's probe, a launch of 2-25 ms on a benchmark shape) is
        # made then, not on every shape of every paired screen and benchmark
        for bname in dict.fromkeys([*baselines, *([REFERENCE] if self.ref_name == REFERENCE else [])]):
            fn = self._baseline(bname)
            if fn is None:
                continue
            if bname == REFERENCE:
                self.flash = fn
            if bname in baselines:
                self.fns[bname] = lambda f=fn, bname=bname: self.last.__setitem__(bname, f())
                self.post[bname] = lambda bname=bname: self._hide(bname)
        if self.flash is None and self.ref_name == REFERENCE:
            raise NoReference(f"the reference baseline ({REFERENCE}) cannot run {shape.key}: nothing to check against")
        self.flags: dict[str, list] = {n: [] for n in checked}
        self.strict: dict[str, tuple[str, float | None]] = {}

    def _baseline(self, name: str):
        """sdpa_baseline on this shape's inputs, or None (logged) where the backend refuses the shape."""
        with piece(f"probe:{name}"):
            try:
                return sdpa_baseline(name, self.q, self.k, self.v, self.shape.causal, lambda: self.scale)
            except RuntimeError as e:
                self.log(f"  baseline {name} unavailable for {self.shape.key}: {str(e).splitlines()[0]}")
                return None

    def _hide(self, name: str) -> None:
        """After `name`'s call: keep the reference's outputs in the vault, and poison what it wrote."""
        o, lse = (self.outs[name].o, self.outs[name].lse) if name in self.live else self.last.pop(name)
        if name == self.ref_name:
            self.vault.keep(o, lse)
        o.fill_(float("nan"))
        if lse is not None:
            lse.fill_(float("nan"))

    def _before(self, it: int) -> None:
        with piece("inputs"):
            self.scale = random_scale(self.shape.head_dim, self.gen)
            for t in (self.q, self.k, self.v):
                t.normal_(generator=self.gen)
            for n, (x, o) in zip(self.live, self.rng.sample(self.slots, len(self.slots)), strict=True):
                self.mine[n], self.outs[n] = x, o
                for a, src in zip(x, (self.q, self.k, self.v), strict=True):
                    a.copy_(src)

    def _reference(self) -> tuple:
        """The iteration's reference outputs: the vault's copy of a timed reference, or FA2 run now."""
        timed = self.ref_name in self.live or self.ref_name in self.fns
        return (self.vault.o, self.vault.lse) if timed else self.flash()

    def _truth(self) -> Truth:
        return truth(self.q, self.k, self.v, self.shape.causal, self.hc["err_mult"], self.hc["atol"],
                     _sample_rows(self.shape, self.gen), self.scale)

    def _after(self, it: int) -> None:
        with piece("reference"):
            self.ref = self._reference()
        if self.tol is None:  # the first launch calibrates the tolerances against the FP32 truth
            with piece("truth"):
                self._calibrate()
        with piece("checks"):
            for n in self.flags:
                self.flags[n].append(_flags(self.outs[n], self.live[n], self.mine[n], (self.q, self.k, self.v),
                                            self.ref, self.tol))
        if it == self.recheck_at:
            with piece("truth"):
                self._strict()

    def _calibrate(self) -> None:
        t = self._truth()
        self.tol, why = tolerances(t, self.ref, self.hc["atol"], self.hc["err_mult"])
        if why and self.ref_name != REFERENCE:
            self.flash = self.flash or self._baseline(REFERENCE)
            if self.flash is not None:
                self.log(f"  the {self.ref_name}'s output on {self.shape.key} fails the FP32 check ({why}): "
                         f"checking against {REFERENCE} instead")
                self.ref_name = REFERENCE  # _hide and _reference follow the name
                self.ref = self.flash()
                self.tol, why = tolerances(t, self.ref, self.hc["atol"], self.hc["err_mult"])
        if why:
            raise NoReference(f"the reference {self.ref_name} fails the FP32 check on {self.shape.key} ({why}): "
                              "nothing trustworthy to check against")

    def _strict(self) -> None:
        """The FP32 truth on sampled rows of the launch just made."""
        t = self._truth()
        for n in self.flags:
            ok, err, msg = judge(self.outs[n].o, self.outs[n].lse, t, self.hc["atol"], LSE_ATOL)
            self.strict[n] = ("" if ok else f"output wrong against the FP32 reference: {msg}", err)

    def _plan(self, launches: int) -> None:
        self.recheck_at = self.rng.randrange(launches)  # uniform over every launch, warm-ups included

    def release(self) -> None:
        """Drop this shape's tensors now. The launch closures refer back to self, a cycle only the cyclic
        collector frees: left to it, eight shapes' inputs, outputs and references piled up past
        harness.max_device_gb at d256 (a false `error` for an honest kernel)."""
        self.fns = self.prep = self.post = self.flash = None
        self.slots, self.mine, self.outs, self.last = [], {}, {}, {}
        self.q = self.k = self.v = self.vault = self.ref = None

    def run(self) -> tuple[dict, dict]:
        hc = self.hc
        stats = self.timer.interleaved(self.fns, hc["warmup"], hc["iters"], hc.get("bench_budget_s", 2.0), self.rng,
                                       prep=self.prep, post=self.post, before=self._before, after=self._after,
                                       plan=self._plan, wall=set(self.flags))
        problems = {}
        for n in self.flags:
            msg, max_err = self.strict.get(n, ("", None))
            status, wall = Status.INCORRECT, stats[n].wall
            if not msg and wall is not None and hidden_work(wall[1], wall[0]):
                with piece("remeasure"):
                    msg, status = self._remeasure(n, wall)
            with piece("checks"):
                table = torch.stack(self.flags[n]).cpu()
            if not msg and table.any():
                it, f = (int(x) for x in table.nonzero()[0])
                msg, status = (f"launch {it + 1} of {len(table)} {_FLAGS[f]} (against {self.ref_name} on the same "
                               "inputs)"), Status.INCORRECT
            if not msg:
                with piece("module check"):
                    changed = self.live[n].module_changed()
                if changed:
                    msg = f"wrote into its module's memory (`{changed}`): state that outlives a launch"
            problems[n] = (msg, status, max_err, wall[0] if wall else None)
        return stats, problems

    def _remeasure(self, n: str, wall: tuple[float, float]) -> tuple[str, Status]:
        """A host wall-clock time far above the events: measure the launch again, alone, WALL_REPEATS times
        (each checked like every launch); hidden work only if every repeat shows it."""
        load = _loadavg()
        again = []
        for _ in range(WALL_REPEATS):
            again += self.timer.wall_times(self.fns[n], self.prep[n])
            self.flags[n].append(_flags(self.outs[n], self.live[n], self.mine[n], (self.q, self.k, self.v),
                                        self.ref, self.tol))
        best = min(again, key=lambda x: x[0] - 1.5 * x[1])
        verdict = all(hidden_work(e, w) for w, e in again)
        self.log(f"  {self.shape.key} {n}: host wall-clock {wall[0]:.3f} ms vs {wall[1]:.3f} ms on the launch stream "
                 f"(load average {load}); alone {WALL_REPEATS} times: best {best[0]:.3f} vs {best[1]:.3f} ms: "
                 + ("work outside the grid" if verdict else "a disturbance, not the kernel"))
        if not verdict:
            return "", Status.INCORRECT
        return (f"host wall-clock {best[0]:.3f} ms vs {best[1]:.3f} ms on the launch stream, in each of "
                f"{WALL_REPEATS} launches alone: work runs outside the launched grid"), Status.ERROR


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"
