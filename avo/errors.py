"""Errors a person can act on: reported as one line, never as a traceback.

Defined here, a leaf module, so the entry points can catch them without importing the stack;
the modules that raise them import them from here.
"""
from __future__ import annotations

import errno

# a file system that takes no more: full, over quota, read-only
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


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


class StorageError(OSError):
    """A file cannot be written because its file system is full, over quota or read-only. Every file
    the lineage holds was written whole (atomically), so the run resumes where its lineage ends."""


def one_line(e: BaseException, kinds: tuple[type[BaseException], ...]) -> str | None:
    """What an entry point prints for `e`: its message if it is one of `kinds` (errors a person can act
    on) or a write without room; None for anything else, which should raise as it is."""
    full = no_room(e)
    if full is not None:
        return str(full)
    return str(e) if isinstance(e, kinds) else None


def no_room(e: BaseException, path=None) -> StorageError | None:
    """A StorageError with one line for a write that failed for lack of room; None for any other error."""
    if isinstance(e, StorageError):
        return e
    if not isinstance(e, OSError) or e.errno not in NO_ROOM:
        return None
    remedy = "make it writable" if e.errno == errno.EROFS else "free space or raise the quota"
    err = StorageError(f"cannot write {path or e.filename or 'a file'}: {e.strerror or e}; {remedy} "
                       "(what is recorded is intact: the same command resumes the run)")
    err.errno = e.errno  # not strerror: with both set, str() drops the message for "[Errno n] ..."
    return err


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, SearchError, SeedError, HarnessUnavailable,
                                                ContractError, ServerError, LineageError, ExportError, StorageError)
