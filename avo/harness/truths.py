"""The pool of check inputs a search reuses, and their FP32 truths kept on disk.

The verify stage's truths cost the GPU about 0.6 s an evaluation at the default MHA set (60 cases, 700 MB of FP32
answers). They depend on the check inputs only, not on the candidate. With harness.truth_pool = P, the GPU harness
draws P input seeds when it starts (from the system's entropy, so no source can know them when it is written) and
gives each evaluation one of them, drawn uniformly; the first evaluation that meets a seed computes its truths as
ever, and the later ones load them. A candidate gains nothing from meeting inputs another candidate met: every
evaluation is a fresh process, no state outlives a launch (the module check, avo.harness.ptxgate), and the answers
stay on the host until the candidate's launches are done, as when they are computed ahead.

One file per seed and set of cases (`<fingerprint>.pt`, written atomically, read memory-mapped): the fingerprint
covers the cases (shapes, distributions, layouts, seeds), the tolerances, torch's version and the GPU's name, on
which the inputs' bits depend. A file that cannot be read is computed again.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

DIR = "truths"  # in the harness's work directory; removed when the harness closes (the parent reads only this:
                # torch is imported in the worker's functions below)


def pool_file(pool_dir: str | os.PathLike, cases: list, err_mult: float, atol: float, device: str) -> Path:
    import torch

    h = hashlib.sha256()
    gpu = torch.cuda.get_device_name() if device == "cuda" else device
    for part in (repr(cases), repr((err_mult, atol)), torch.__version__, gpu):
        h.update(part.encode())
        h.update(b"\0")
    return Path(pool_dir) / f"{h.hexdigest()[:32]}.pt"


def load(path: Path) -> dict:
    """The truths on record for these cases, on the host ({} where there is no readable file)."""
    import torch

    from avo.harness.check import Truth

    try:
        d = torch.load(path, mmap=True, weights_only=True)
        return {int(i): Truth(t["o"], t["lse"], t.get("rows"), float(t["tol"]), float(t["row_tol"]), t.get("lse_bound"))
                for i, t in d.items()}
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, EOFError):
        return {}


def save(path: Path, truths: dict) -> None:
    """All the truths known (host tensors), atomically: a reader sees the old file or the new one."""
    import torch

    d = {str(i): {"o": t.o, "lse": t.lse, "tol": torch.tensor(t.tol, dtype=torch.float64),
                  "row_tol": torch.tensor(t.row_tol, dtype=torch.float64),
                  **({"rows": t.rows} if t.rows is not None else {}),
                  **({"lse_bound": t.lse_bound} if t.lse_bound is not None else {})} for i, t in truths.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(d, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
