"""PTX read as the assembler reads it: statements, `{ }` blocks, labels and predicate guards.

The PTX gate (avo.harness.ptxgate) judges every statement this yields, wherever it sits: a
statement is what ends at `;` (several may share a line, one may span lines), a block is a `{ }`
that opens where a statement could start (function bodies, inline asm's scopes, call sequences),
and braces inside a statement are its own (vector operands, initialisers). Comments and string
literals never end a statement. Nothing here knows what is allowed; it only says what is there.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_LABEL = re.compile(r"^([A-Za-z_$%][\w$]*)\s*:(?!:)\s*")
_GUARD = re.compile(r"^@!?([%\w$]+)\s+")
_PLAIN = re.compile(r'[^;{}()\n/"]+')
_LINE_DIRECTIVES = (".version", ".target", ".address_size", ".file", ".loc")
_HEADER = re.compile(r"(^|\s)\.(entry|func|section)\b")
_SPACES = (".global", ".const", ".shared", ".local", ".param", ".reg", ".tex", ".sreg")
_IDENT = re.compile(r"[A-Za-z_$%][\w$]*")
_NAME = re.compile(r"^([%\w$]+)\s*(<\s*(\d+)\s*>)?")
_DECL_TOKEN = re.compile(r"\.[\w:]+|[%\w$]+\s*<\s*\d+\s*>|[%\w$]+(?:\s*\[[^\]]*\])*|,")


class PtxSyntaxError(ValueError):
    """PTX the parser cannot split into statements (an unbalanced brace, an open comment)."""


@dataclass
class Statement:
    """One PTX statement: a directive (`.global ...`, a function header), an instruction, or a label."""
    kind: str            # "directive" | "instruction" | "label"
    text: str            # without comments, the ';' and repeated whitespace
    line: int            # 1-based line where it starts
    depth: int           # { } blocks around it: 0 at module scope
    guard: str = ""      # an instruction's predicate (`p` of `@p` or `@!p`)
    op: str = ""         # the opcode with its modifiers (`ld.global.u32`), or a directive's first word
    operands: str = ""   # what follows the opcode

    @property
    def base(self) -> str:
        """The opcode without modifiers: `ld` of `ld.global.u32`."""
        return self.op.split(".", 1)[0]


@dataclass
class Declaration:
    """A variable a directive declares: its state space and names (`%r<5>` declares %r0..%r4)."""
    space: str
    names: list[str]
    ranges: dict[str, int] = field(default_factory=dict)  # prefix -> count, from `%r<5>`
    attributes: list[str] = field(default_factory=list)   # e.g. ".managed" of .attribute(.managed)
    linkage: str = ""     # .extern, .visible, .weak, .common
    initialised: bool = False


def statements(ptx: str) -> list[Statement]:
    """Split PTX into statements; raises PtxSyntaxError where its braces, comments or strings do not close."""
    out: list[Statement] = []
    buf: list[str] = []
    start, line, depth, inner, paren, i, n = 1, 1, 0, 0, 0, 0, len(ptx)
    has_text = False  # the statement being read has begun (its first line is `start`)

    def emit() -> None:
        nonlocal buf, has_text
        text = " ".join("".join(buf).split())
        buf, has_text = [], False
        while (m := _LABEL.match(text)) is not None:
            out.append(Statement("label", m.group(1), start, depth))
            text = text[m.end():]
        if text:
            out.append(_statement(text, start, depth))

    def take(text: str) -> None:
        nonlocal start, has_text
        if not has_text and text.strip():
            start, has_text = line, True
        buf.append(text)

    while i < n:
        m = _PLAIN.match(ptx, i)
        if m:  # a run of characters that end nothing
            take(m.group())
            i = m.end()
            continue
        c = ptx[i]
        if ptx.startswith("//", i):
            j = ptx.find("\n", i)
            i = n if j < 0 else j
            continue
        if ptx.startswith("/*", i):
            j = ptx.find("*/", i + 2)
            if j < 0:
                raise PtxSyntaxError(f"line {line}: unterminated /* comment")
            line += ptx.count("\n", i, j)
            buf.append(" ")
            i = j + 2
            continue
        if c == '"':
            j = i + 1
            while j < n and ptx[j] != '"' and ptx[j] != "\n":
                j += 2 if ptx[j] == "\\" else 1
            if j >= n or ptx[j] != '"':
                raise PtxSyntaxError(f"line {line}: unterminated string")
            take(ptx[i:j + 1])
            i = j + 1
            continue
        if c == "\n":
            line += 1
            if has_text and "".join(buf).lstrip().startswith(_LINE_DIRECTIVES):
                emit()  # these end at the end of their line, without ';'
            else:
                buf.append(" ")
        elif c in "()":
            paren += 1 if c == "(" else -1
            take(c)
        elif c == ";" and inner == 0 and paren == 0:
            emit()
        elif c == "{":
            pending = " ".join("".join(buf).split())
            while (m := _LABEL.match(pending)) is not None:
                pending = pending[m.end():]
            if inner == 0 and paren == 0 and (not pending or _HEADER.search(pending) and "=" not in pending):
                emit()  # the function header, or labels before a block
                depth += 1
            else:
                inner += 1  # a vector operand or an initialiser
                take(c)
        elif c == "}":
            if inner:
                inner -= 1
                take(c)
            else:
                if has_text:
                    emit()  # a last statement without ';' (a section's data)
                depth -= 1
                if depth < 0:
                    raise PtxSyntaxError(f"line {line}: `}}` closes no block")
        else:
            take(c)  # ';' inside braces or parentheses, or a lone '/'
        i += 1
    if has_text:
        emit()
    if depth or inner:
        raise PtxSyntaxError(f"line {line}: {depth + inner} brace(s) never closed")
    return out


def _statement(text: str, line: int, depth: int) -> Statement:
    if text.startswith("."):
        op, _, rest = text.partition(" ")
        return Statement("directive", text, line, depth, op=op, operands=rest)
    guard = ""
    m = _GUARD.match(text)
    if m:
        guard, text_ = m.group(1), text[m.end():]
    else:
        text_ = text
    op, _, rest = text_.partition(" ")
    return Statement("instruction", text, line, depth, guard=guard, op=op, operands=rest)


def declaration(st: Statement) -> Declaration | None:
    """The variables a directive declares (None: it declares none, e.g. `.version` or a function)."""
    if st.kind != "directive" or _HEADER.search(st.text):
        return None
    head = st.text.split("=", 1)[0]
    attributes = [a.strip() for a in re.findall(r"\.attribute\s*\(([^)]*)\)", head)]
    head = re.sub(r"\.attribute\s*\([^)]*\)", " ", head)
    tokens = _DECL_TOKEN.findall(head)
    space = next((t for t in tokens if t in _SPACES), None)
    if space is None:
        return None
    linkage = next((t for t in tokens if t in (".extern", ".visible", ".weak", ".common")), "")
    names, ranges = [], {}
    for t in tokens:
        if t.startswith(".") or t == "," or t[0].isdigit():  # qualifiers, separators, .align's argument
            continue
        m = _NAME.match(t)
        if m.group(3) is not None:
            ranges[m.group(1)] = int(m.group(3))
        else:
            names.append(m.group(1))
    return Declaration(space, names, ranges, attributes, linkage, "=" in st.text)


def function_name(st: Statement) -> tuple[str, str] | None:
    """(`entry` or `func`, name) of a function header or prototype; None for any other statement."""
    m = re.search(r"(?:^|\s)\.(entry|func)\s+(?:\([^)]*\)\s*)?([A-Za-z_$][\w$]*)", st.text)
    return (m.group(1), m.group(2)) if m and st.kind == "directive" else None


def identifiers(text: str) -> list[str]:
    """Every identifier in an instruction's operands (registers with their `%`, symbols, labels)."""
    return _IDENT.findall(re.sub(r"\b0[fdFD][0-9A-Fa-f]+\b|\b0[xX][0-9A-Fa-f]+\b", " ", text))
