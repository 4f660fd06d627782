"""Source gate run before compiling: what the preprocessor may read, plus a fast first answer.

The gate that decides is the PTX gate (avo.harness.ptxgate), which judges what NVRTC actually
produced; spelling tricks (macros, string concatenation inside asm, raw PTX) cannot pass it.
This module does two things the PTX cannot:

1. **Includes.** The preprocessor reads files, and a compile error quotes them. So the source is
   lexed as the compiler does (translation phases 1-3: line splices, comments, string and raw
   string literals, digraphs) and every directive is judged: only an allowed set of directives,
   `#include` only of a literal allowed header name (no `..`, no absolute path, no macro-formed
   name), no `__has_include`. Trusted headers only include literal names, so nothing outside
   kernels_cuda/include and the CUDA headers can be read.
2. **A fast first answer.** Cheap regexes on the comment-free source name the usual mistakes
   (streams, child launches, clock reads) in the agent's own terms before a compile is spent.
"""
from __future__ import annotations

import re

_ALLOWED_HEADERS = re.compile(
    r"avo/[A-Za-z0-9_]+\.cuh|cuda_bf16\.h|cuda_fp16\.h|cuda/[A-Za-z0-9_/]+|cuda_pipeline\w*\.h|mma\.h"
    r"|cooperative_groups(/[A-Za-z0-9_]+\.h)?(\.h)?|cuda_awbarrier\w*\.h|cstdint|stdint\.h|climits|cfloat"
    r"|type_traits|utility")
HEADER_HINT = ("avo/*.cuh, cuda_bf16.h, cuda_fp16.h, cuda/*, cuda_pipeline*.h, mma.h, cooperative_groups*, "
               "cuda_awbarrier*.h, cstdint, stdint.h, climits, cfloat, type_traits, utility")
_DIRECTIVES = {"define", "undef", "if", "ifdef", "ifndef", "elif", "elifdef", "elifndef", "else", "endif",
               "pragma", "error", "warning", "line", "include"}

_RULES: list[tuple[str, str]] = [
    (r"\bcu(da)?Stream\w*|\bcudaStream_t\b", "creates or uses CUDA streams (all work must run in the launched grid)"),
    (r"<<<|\bcu(da)?Launch\w*|\bcudaGraph\w*", "launches other kernels (dynamic parallelism)"),
    (r"accessPolicyWindow|PersistingL2|cudaLimitPersisting|\bcu(da)?CtxSetLimit|\bcudaDeviceSetLimit",
     "changes L2 persistence or device limits"),
    (r"%globaltimer|\bglobaltimer\b|%clock|\bclock(64)?\s*\(|\b__nanosleep\b",
     "reads clocks or sleeps (timing must be the harness's)"),
    (r"\bexit\s*;|\bexit\s*\(", "calls exit"),
    (r"\bmalloc\s*\(|\bfree\s*\(|\bcudaMalloc\w*", "allocates device memory"),
]
_PRINTF = (r"\bprintf\s*\(", "calls printf (allowed only in the correctness-only mode)")

_TRIGRAPH = re.compile(r"\?\?[=/'()!<>\-]")
_RAW_PREFIX = re.compile(r'(?:u8|u|U|L)?R"([^ ()\\\t\v\f\n]{0,16})\(')
_STRING = re.compile(r'(?:u8|u|U|L)?"(?:[^"\\\n]|\\.)*"|(?:u8|u|U|L)?\'(?:[^\'\\\n]|\\.)*\'')


class GateError(ValueError):
    """The source breaks a lexical rule; the message is one line naming the line and the rule."""


def lex(source: str) -> tuple[str, str]:
    """(code, code_with_strings): phases 1-3 of translation, newlines kept for line numbers.

    code: comments and string/char literals replaced by blanks (directives are judged on it);
    code_with_strings: only comments blanked (inline PTX lives in strings).
    Raises GateError on a trigraph or an unterminated comment, string or raw string.
    """
    m = _TRIGRAPH.search(source)
    if m:
        raise GateError(_at(source, m.start(), f"trigraph `{m.group(0)}` is not allowed"))
    # phase 2: splice lines, but keep a newline per splice at the end of the logical line, so
    # line numbers still match the file
    spliced, pending = [], 0
    for piece in re.split(r"(\\\r?\n)", source):
        if piece.startswith("\\") and piece.endswith("\n"):
            pending += 1
            continue
        if pending and "\n" in piece:
            i = piece.index("\n")
            piece = piece[:i] + "\n" * pending + piece[i:]
            pending = 0
        spliced.append(piece)
    text = "".join(spliced) + "\n" * pending
    code, with_strings, i, n = [], [], 0, len(text)
    blank = lambda s: re.sub(r"[^\n]", " ", s)  # noqa: E731 - keeps newlines, hence line numbers
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            code.append(blank(text[i:j]))
            with_strings.append(blank(text[i:j]))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise GateError(_at(text, i, "unterminated /* comment"))
            code.append(" " + blank(text[i:j + 2])[1:])
            with_strings.append(" " + blank(text[i:j + 2])[1:])
            i = j + 2
        elif (c in "uULR") and (m := _RAW_PREFIX.match(text, i)) and (i == 0 or not _ident(text[i - 1])):
            end = text.find(f"){m.group(1)}\"", m.end())
            if end < 0:
                raise GateError(_at(text, i, "unterminated raw string literal"))
            lit = text[i:end + len(m.group(1)) + 2]
            code.append(blank(lit))
            with_strings.append(lit)
            i += len(lit)
        elif c in "\"'" or (c in "uUL" and (i == 0 or not _ident(text[i - 1])) and _STRING.match(text, i)):
            m = _STRING.match(text, i)
            if m is None:
                if c == "'" and i > 0 and text[i - 1].isalnum():  # a digit separator: 1'000'000
                    code.append(c)
                    with_strings.append(c)
                    i += 1
                    continue
                raise GateError(_at(text, i, "unterminated string or character literal"))
            code.append(blank(m.group(0)))
            with_strings.append(m.group(0))
            i = m.end()
        else:
            j = i + 1
            while j < n and text[j] not in "/\"'uULR":
                j += 1
            code.append(text[i:j])
            with_strings.append(text[i:j])
            i = j
    return "".join(code), "".join(with_strings)


def _ident(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_DIRECTIVE = re.compile(r"^[ \t]*(?:#|%:)[ \t]*(\w*)(.*)$", re.M)
_INCLUDE_OPERAND = re.compile(r'^\s*(?:<([^<>"\n]*)>|"([^"\n]*)")\s*$')


def check_directives(code: str, with_strings: str) -> str | None:
    """None, or one line naming a directive or include the preprocessor must not see."""
    m = re.search(r"\b__has_include(_next)?\b", code)
    if m:
        return _at(code, m.start(), "`__has_include` probes the file system; not allowed")
    for m in _DIRECTIVE.finditer(code):
        name = m.group(1)
        if not name:
            continue  # the null directive
        if name not in _DIRECTIVES:
            return _at(code, m.start(), f"`#{name}` is not an allowed preprocessing directive")
        if name != "include":
            continue
        op = _INCLUDE_OPERAND.match(with_strings[m.start(2):m.end(2)])  # the same span, strings kept
        if op is None:
            return _at(code, m.start(), "#include must name a header literally, <name> or \"name\" "
                                        "(no macro-formed names)")
        header = op.group(1) if op.group(1) is not None else op.group(2)
        if ".." in header or header.startswith("/") or not _ALLOWED_HEADERS.fullmatch(header):
            return _at(code, m.start(), f"includes `{header}`, outside the allowed headers ({HEADER_HINT})")
    return None


def _at(code: str, pos: int, why: str) -> str:
    return f"line {code.count(chr(10), 0, pos) + 1}: {why}"


def check_source(source: str, allow_printf: bool = False) -> str | None:
    """None if the source passes; otherwise one line naming the first violation and its line."""
    try:
        code, with_strings = lex(source)
    except GateError as e:
        return str(e)
    why = check_directives(code, with_strings)
    if why:
        return why
    rules = _RULES if allow_printf else [*_RULES, _PRINTF]
    for pattern, why in rules:
        m = re.search(pattern, with_strings)
        if m:
            return _at(with_strings, m.start(), f"`{m.group(0).strip()}` {why}")
    return None
