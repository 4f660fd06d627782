"""The kernel contract on the host side: tunables in the source, launch metadata in the cubin.

See kernels_cuda/CONTRACT.md.
"""
from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile

from avo.errors import ContractError

# the ABI's names and grid rule live once, in the self-contained half that exports copy
from avo.harness.abi import ABI_VERSION, ENTRY, LAUNCH_SYMBOL, launch_grid  # noqa: F401 - re-exported

_TUNABLE = re.compile(r"^(?P<head>[ \t]*#define[ \t]+(?P<name>\w+)[ \t]+)(?P<value>\S+)"
                      r"(?P<mid>[ \t]*//[ \t]*@tunable[ \t]+)(?P<choices>[^\n]*)$", re.M)


@dataclass(frozen=True)
class Tunable:
    name: str
    value: str
    choices: tuple[str, ...]


def tunables(source: str) -> dict[str, Tunable]:
    """Tunables declared as `#define NAME value  // @tunable a b c`."""
    out = {}
    for m in _TUNABLE.finditer(source):
        choices = tuple(c for c in re.split(r"[\s,]+", m["choices"].strip()) if c)
        out[m["name"]] = Tunable(m["name"], m["value"], choices)
    return out


def set_tunables(source: str, values: dict[str, str]) -> str:
    """Return the source with the given tunables set; unknown names are an error."""
    unknown = set(values) - set(tunables(source))
    if unknown:
        raise KeyError(f"not tunables in this source: {sorted(unknown)}")

    def sub(m: re.Match) -> str:
        v = values.get(m["name"], m["value"])
        return f"{m['head']}{v}{m['mid']}{m['choices']}"

    return _TUNABLE.sub(sub, source)


@dataclass(frozen=True)
class LaunchSpec:
    threads: int
    smem: int
    block_m: int
    persistent: int
    tma_rows_q: int
    tma_rows_kv: int
    cluster: int
    abi: int

    @classmethod
    def from_ints(cls, v: list[int]) -> "LaunchSpec":
        spec = cls(*v)
        spec.validate()
        return spec

    @classmethod
    def from_cubin(cls, cubin: bytes) -> "LaunchSpec":
        """Read `avo_launch` from the cubin's ELF; needs no GPU."""
        elf = ELFFile(io.BytesIO(cubin))
        symtab = elf.get_section_by_name(".symtab")
        syms = symtab.get_symbol_by_name(LAUNCH_SYMBOL) if symtab else None
        if not syms:
            raise ContractError(f"kernel defines no `{LAUNCH_SYMBOL}`: add AVO_LAUNCH(...) "
                                "(see kernels_cuda/CONTRACT.md)")
        sym = syms[0]
        if sym["st_size"] != 32:
            raise ContractError(f"`{LAUNCH_SYMBOL}` must be int[8], got {sym['st_size']} bytes")
        sec = elf.get_section(sym["st_shndx"])
        data = sec.data()[sym["st_value"]:sym["st_value"] + 32]
        if len(data) != 32:
            raise ContractError(f"`{LAUNCH_SYMBOL}` has no initialiser in the cubin")
        return cls.from_ints(list(struct.unpack("<8i", data)))

    def validate(self) -> None:
        if self.abi != ABI_VERSION:
            raise ContractError(f"kernel written for ABI {self.abi}, harness speaks {ABI_VERSION}")
        if not (32 <= self.threads <= 1024 and self.threads % 32 == 0):
            raise ContractError(f"threads={self.threads}: need a multiple of 32 in [32, 1024]")
        if not (0 <= self.smem <= 227 * 1024):
            raise ContractError(f"smem={self.smem} bytes: Hopper allows at most 232448 per block")
        if self.block_m <= 0:
            raise ContractError(f"block_m={self.block_m} must be positive")
        if self.persistent < 0 or self.tma_rows_q < 0 or self.tma_rows_kv < 0:
            raise ContractError("persistent and tma rows must be >= 0")
        if (self.tma_rows_q > 0) != (self.tma_rows_kv > 0) or max(self.tma_rows_q, self.tma_rows_kv) > 256:
            raise ContractError("tma rows: both zero, or both in [1, 256]")
        if self.cluster != 1:
            raise ContractError("clusters are not supported yet (cluster must be 1)")

    def grid(self, batch: int, heads_q: int, seqlen_q: int, num_sms: int) -> tuple[int, int, int]:
        return launch_grid(self.persistent, self.block_m, batch, heads_q, seqlen_q, num_sms)


