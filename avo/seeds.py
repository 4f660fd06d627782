"""Where x0 comes from: a seed in kernels_cuda/, a .cu file, or a committed version of another run."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from avo import lineage

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels_cuda"


@dataclass
class Seed:
    source: str
    origin: str          # human-readable: "kernels_cuda/sm80", "<run>:v7", "/path/x.cu"
    run_dir: Path | None = None   # set when transferred from another run
    version: int | None = None


class SeedError(ValueError):
    pass


def available() -> list[str]:
    return sorted(p.name for p in KERNELS_DIR.iterdir() if (p / f"{p.name}.cu").exists())


def resolve(spec: str) -> Seed:
    spec = str(spec)
    if (KERNELS_DIR / spec / f"{spec}.cu").exists():
        return Seed((KERNELS_DIR / spec / f"{spec}.cu").read_text(), f"kernels_cuda/{spec}")
    if spec.endswith(".cu"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SeedError(f"seed={spec}: no such file")
        return Seed(path.read_text(), str(path))
    run, _, ver = spec.partition(":")
    run_dir = Path(run).expanduser()
    if (run_dir / "lineage").is_dir():
        return from_run(run_dir, int(ver.lstrip("v")) if ver else None)
    raise SeedError(f"seed={spec}: not a kernel in kernels_cuda/ ({', '.join(available())}), "
                    "not a .cu file, and not a run directory with a lineage")


def from_run(run_dir: Path, version: int | None) -> Seed:
    committed = lineage.read_run(run_dir).filter(pl.col("committed")).sort("version")
    if committed.is_empty():
        raise SeedError(f"seed={run_dir}: the run has no committed version")
    if version is None:
        ranked = committed.filter(pl.col("score").is_not_null())
        pick = ranked.sort("score", "version") if not ranked.is_empty() else committed
        row = pick.tail(1).row(0, named=True)
    else:
        rows = committed.filter(pl.col("version") == version)
        if rows.is_empty():
            raise SeedError(f"seed={run_dir}:{version}: no such version (committed: "
                            f"{committed['version'].to_list()})")
        row = rows.row(0, named=True)
    return Seed(lineage.read_source(run_dir, row["source_sha"]), f"{run_dir}:v{row['version']}",
                run_dir=run_dir, version=row["version"])
