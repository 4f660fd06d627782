"""Which GPUs the harness times on, what it leaves to a managed model server, and which GPU takes
each evaluation.

`harness.devices` lists CUDA device indices (unset: `[harness.device]`); this module is the one
place that reads it. An index counts GPUs the way the search process sees them: all of the
node's, in PCI bus order (nvidia-smi's and NVML's numbering), or those of CUDA_VISIBLE_DEVICES
where that is set (a Slurm job's). The harness's probe and workers enumerate in that order, so on
a node without CUDA_VISIBLE_DEVICES the index that places a job also names the GPU its NVML
sensors read. NVML ignores CUDA_VISIBLE_DEVICES, so under a Slurm job's (GPUs 2,3 of the node are
CUDA's 0,1) an index would name another job's GPU to NVML: the worker gets the GPU's UUID from
the probe through its job (Job.place) and opens NVML by UUID (avo.harness.timing.Sensors). The
worker gets the index through its job rather than a CUDA_VISIBLE_DEVICES of its own, which would
renumber CUDA (and what Nsight Compute sees) for it alone.

Each GPU has its own timing lock (named by its UUID), spares and probe (avo.harness.gpu); an
evaluation goes to the GPU with the fewest in flight, the one used longest ago on a tie.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field

from avo.errors import ConfigError, HarnessUnavailable

ORDER = "PCI_BUS_ID"  # CUDA's default orders the fastest GPU first: not NVML's or nvidia-smi's numbering


def cuda_env() -> dict[str, str]:
    """The environment under which a device index means the same GPU to CUDA, NVML and nvidia-smi
    (a CUDA_DEVICE_ORDER set by the user is kept)."""
    return {"CUDA_DEVICE_ORDER": os.environ.get("CUDA_DEVICE_ORDER", ORDER)}


def listed(xs) -> str:
    """A list as one writes it in an override: [0,1]."""
    return f"[{','.join(str(x) for x in xs)}]"


def setting(hc) -> str:
    """The override that names the harness's GPUs, for messages."""
    return f"harness.devices={listed(hc.devices)}" if hc.get("devices") is not None else f"harness.device={hc.device}"


def harness_devices(hc) -> list[int]:
    """The CUDA device indices the harness times on; ConfigError with one line for a list that cannot be."""
    if hc.get("devices") is None:
        devices = [int(hc.device)]
    else:
        devices = [int(d) for d in hc.devices]
        if not devices:
            raise ConfigError("harness.devices=[] names no GPU: list device indices, or leave it unset "
                              "to time on harness.device")
        twice = sorted({d for d in devices if devices.count(d) > 1})
        if twice:
            raise ConfigError(f"harness.devices={listed(devices)} names GPU {twice[0]} twice: "
                              "list each GPU once (each has one timing lock)")
    if min(devices) < 0:
        raise ConfigError(f"{setting(hc)}: device indices are >= 0")
    return devices


def visible_gpus() -> list[str]:
    """CUDA_VISIBLE_DEVICES as a list ([]: unset, every GPU of the node)."""
    return [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]


def managed_server(agent):
    """The agent's managed vLLM server config (it runs on GPUs of this job), or None."""
    server = agent.get("server") if agent.get("kind") == "llm" else None
    return server if server is not None and server.get("mode") == "managed" else None


def timing_gpus(cfg, visible: list[str]) -> list[str]:
    """The harness's GPUs as CUDA_VISIBLE_DEVICES entries, the way a server's GPUs are given
    ([] for a harness that times nothing)."""
    if cfg.harness.name != "gpu":
        return []
    devices = harness_devices(cfg.harness)
    return [visible[d] if d < len(visible) else str(d) for d in devices] if visible else [str(d) for d in devices]


def check_gpus(cfg, visible: list[str] | None = None) -> None:
    """harness.devices is a valid list and shares no GPU with the managed model server's agent.server.gpus."""
    harness_devices(cfg.harness)
    server = managed_server(cfg.agent)
    if server is None or not server.gpus:
        return
    timing = timing_gpus(cfg, visible_gpus() if visible is None else visible)
    shared = [g for g in timing if g in {str(s) for s in server.gpus}]
    if shared:
        raise ConfigError(f"{setting(cfg.harness)} and agent.server.gpus={listed(server.gpus)} share GPU "
                          f"{shared[0]}: the model server keeps its own GPUs; time kernels on others")


def gpus_needed(cfg) -> tuple[int, str]:
    """How many GPUs a search job asks for, and the settings that say so: the harness's devices
    (harness=gpu) and a managed server's agent.server.gpus. A server without agent.server.gpus
    gets the job's other GPUs (launcher.gpus_per_node says how many: vLLM may run on CPU)."""
    used = harness_devices(cfg.harness) if cfg.harness.name == "gpu" else []
    why = [setting(cfg.harness)] if used else []
    server = managed_server(cfg.agent)
    if server is not None and server.gpus:
        used = used + [int(g) for g in server.gpus]
        why.append(f"agent.server.gpus={listed(server.gpus)}")
    return (max(used) + 1 if used else 0), " and ".join(why)


@dataclass(eq=False)
class Device:
    """One GPU of the harness: what the probe found, its timing lock, and what runs on it."""
    index: int                      # CUDA device index (see the module's docstring)
    name: str
    lock: str                       # its timing lock file (avo.harness.devlock), named by its UUID
    uuid: str = ""                  # the driver's UUID (hex), which names it to NVML too ("" where none)
    busy: int = 0                   # evaluations in flight on it
    turn: int = 0                   # when it last took one (ties go to the one idle longest)
    alive: bool = True              # False once it failed its probe: it takes no more work
    spares: list = field(default_factory=list)  # workers started ahead on it (avo.harness.gpu)


class DevicePool:
    """The harness's GPUs; several search workers take and give back from their own threads."""

    def __init__(self, devices: list[Device]):
        self.all = list(devices)
        self._mutex = threading.Lock()
        self._turns = 0

    @property
    def live(self) -> list[Device]:
        with self._mutex:
            return [d for d in self.all if d.alive]

    def first(self) -> Device:
        """The first live GPU: where a single job outside the search's spreading runs (avo.bench)."""
        live = self.live
        if not live:
            raise HarnessUnavailable(self._none_left())
        return live[0]

    @contextlib.contextmanager
    def use(self):
        """The least busy live GPU for the block (ties: the one idle longest), counted as busy meanwhile."""
        with self._mutex:
            live = [d for d in self.all if d.alive]
            if not live:
                raise HarnessUnavailable(self._none_left())
            dev = min(live, key=lambda d: (d.busy, d.turn))
            self._turns += 1
            dev.busy, dev.turn = dev.busy + 1, self._turns
        try:
            yield dev
        finally:
            with self._mutex:
                dev.busy -= 1

    def take_out(self, dev: Device) -> list[Device]:
        """No more work for `dev`; returns the GPUs still live."""
        with self._mutex:
            dev.alive = False
            return [d for d in self.all if d.alive]

    def _none_left(self) -> str:
        return (f"no GPU of the harness answers any more (GPU {', '.join(str(d.index) for d in self.all)} "
                "failed the probe); check nvidia-smi, or use harness=compile")
