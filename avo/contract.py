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
from avo.harness.abi import LAUNCH_SYMBOL, LaunchGeometry  # the ABI's names and rules live there, once

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


def launch_from_cubin(cubin: bytes) -> LaunchGeometry:
    """`avo_launch` read from the cubin's ELF (needs no GPU), validated as the host code will use it."""
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
    try:
        return LaunchGeometry(struct.unpack("<8i", data))
    except ValueError as e:
        raise ContractError(str(e)) from None
