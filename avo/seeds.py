"""Where x0 comes from: a seed in kernels_cuda/, a .cu file, or a committed version of another run.

The one resolver of seed specs (the search, `avo.bench` and `avo.export` all use it). A seed of
kernels_cuda/ carries its YAML (head dims, minimum architecture), checked against the problem at
launch so an impossible pairing stops with one line before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from avo.errors import SeedError
from avo.paths import KERNELS_DIR


@dataclass
class Seed:
    source: str
    origin: str          # human-readable: "kernels_cuda/sm80", "<run>:v7", "/path/x.cu"
    run_dir: Path | None = None   # set when transferred from another run
    version: int | None = None
    meta: dict = field(default_factory=dict)  # the seed's YAML (kernels_cuda/ seeds only)
    note: str = ""       # what to tell a person about how it was chosen (several islands: avo.history)

    @property
    def name(self) -> str:
        """A short name: the seed's folder, the file's stem, or run:v<k>."""
        if self.run_dir is not None:
            return f"{Path(self.run_dir).name}:v{self.version}"
        return Path(self.origin).stem

    def check(self, head_dim: int, arch: str | None = None) -> None:
        """Raise SeedError when the seed's YAML says it cannot run this problem or architecture."""
        dims = self.meta.get("head_dims")
        if dims and head_dim not in dims:
            fits = [s for s in available() if head_dim in (_meta(s).get("head_dims") or [head_dim])]
            raise SeedError(f"seed={self.name} supports head dims {dims}, not {head_dim}; seeds that do: "
                            f"{', '.join(fits) or 'none'}")
        need = self.meta.get("min_arch")
        if need and arch and arch != "auto" and _arch_number(arch) < _arch_number(need):
            raise SeedError(f"seed={self.name} needs {need} or newer, this target is {arch}")


def _arch_number(arch: str) -> int:
    digits = "".join(ch for ch in arch if ch.isdigit())
    return int(digits or 0)


def _meta(name: str) -> dict:
    import yaml

    path = KERNELS_DIR / name / f"{name}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def available() -> list[str]:
    return sorted(p.name for p in KERNELS_DIR.iterdir() if (p / f"{p.name}.cu").exists())


def resolve(spec: str) -> Seed:
    spec = str(spec)
    if (KERNELS_DIR / spec / f"{spec}.cu").exists():
        return Seed((KERNELS_DIR / spec / f"{spec}.cu").read_text(), f"kernels_cuda/{spec}", meta=_meta(spec))
    if spec.endswith(".cu"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SeedError(f"seed={spec}: no such file")
        return Seed(path.read_text(), str(path))
    run, _, ver = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if ver and not ver.lstrip("v").isdigit():  # a colon in the path, not a version
        run, ver = spec, ""
    run_dir = Path(run).expanduser()
    if (run_dir / "lineage").is_dir():
        return from_run(run_dir, int(ver.lstrip("v")) if ver else None)
    raise SeedError(f"seed={spec}: not a kernel in kernels_cuda/ ({', '.join(available())}), "
                    "not a .cu file, and not a run directory with a lineage")


def from_run(run_dir: Path, version: int | None) -> Seed:
    """A committed version of a run; without a version, the run's best (avo.history: its head)."""
    from avo import history, lineage

    rows = lineage.read_run(run_dir)
    committed = history.chains(rows)
    if committed.is_empty():
        raise SeedError(f"seed={run_dir}: the run has no committed version")
    note = ""
    if version is None:
        row = committed.filter(committed["best"]).row(0, named=True)
        islands = committed["islands"][0]
        if committed["head"].sum() > 1:
            note = f"seed={run_dir}: v{row['version']}; " + history.NOT_SIDE_BY_SIDE.format(n=islands)
    else:
        match = committed.filter(committed["version"] == version)
        if match.is_empty():
            raise SeedError(f"seed={run_dir}:{version}: no such version (committed: "
                            f"{committed['version'].to_list()})")
        row = match.row(0, named=True)
    return Seed(lineage.read_source(run_dir, row["source_sha"]), f"{run_dir}:v{row['version']}",
                run_dir=run_dir, version=row["version"], note=note)
