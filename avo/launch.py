"""Entry point: python -m avo.launch [overrides]  (Hydra app; -m for sweeps)."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from avo.config import register, validate
from avo.errors import USER_ERRORS, one_line

register()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig):
    from avo.launcher import launch

    try:
        validate(cfg)
        return launch(cfg)
    except (*USER_ERRORS, OSError) as e:
        line = one_line(e, USER_ERRORS)
        if line is None:
            raise
        print(f"avo: error: {line}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
