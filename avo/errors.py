"""Errors a person can act on: reported as one line, never as a traceback.

Defined here, a leaf module, so the entry points can catch them without importing the stack;
the modules that raise them import them from here.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line a person can act on."""


class LaunchError(ConfigError):
    """A job that cannot be submitted or started; the message is one line a person can act on."""


class RunDirBusy(LaunchError):
    """Another live process is already running this run directory."""


class SearchError(RuntimeError):
    """The search cannot go on; the message says why. The lineage so far is intact."""


class SeedError(ValueError):
    """The seed cannot be resolved or does not fit the problem; the message says which seeds do."""


class HarnessUnavailable(RuntimeError):
    """The configured harness cannot run here (e.g. no GPU, a broken driver); the message says what to do."""


class ContractError(ValueError):
    """The kernel source breaks the contract in kernels_cuda/CONTRACT.md."""


class ServerError(RuntimeError):
    """The LLM endpoint cannot be reached or started; the message says what to check."""


class LineageError(RuntimeError):
    """A run's lineage cannot be read back; the message names the file and how to recover."""


class ExportError(ValueError):
    """The export cannot be made; the message says why and what to do."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, SearchError, SeedError, HarnessUnavailable,
                                                ContractError, ServerError, LineageError, ExportError)
