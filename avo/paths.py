"""Where the repository's own files are: configs, seed kernels and the headers every kernel includes."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
KERNELS_DIR = ROOT / "kernels_cuda"
INCLUDE_DIR = KERNELS_DIR / "include"
