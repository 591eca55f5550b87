"""JSON with comments (VS Code's ``launch.json`` / ``settings.json``), edited in place.

:func:`parse` keeps where every value sits in the text, so that :func:`add_items`,
:func:`add_members` and :func:`replace` change only what they must: the user's comments,
trailing commas and formatting everywhere else stay exactly as they were. What they insert is a
:class:`Snippet`: JSONC text cut from another file with its comments (:func:`snippet`) or a
plain value (:func:`dumps`), indented in the style of the file it goes into (:func:`indent_unit`).
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MAX_DEPTH = 100  # VS Code files nest ~5 deep; deeper is a broken file, not a RecursionError


class JSONCError(ValueError):
    """The text is not JSON-with-comments; says where."""


@dataclass(kw_only=True)
class Node:
    """A value and its span ``text[start:end]``; objects and arrays keep their children.

    ``key_start`` is where the ``"key"`` of an object member begins (None elsewhere).
    """

    start: int
    end: int
    value: Any = None
    members: dict[str, Node] = field(default_factory=dict)  # objects
    items: list[Node] = field(default_factory=list)  # arrays
    kind: str = "scalar"  # "object", "array" or "scalar"
    key_start: int | None = None

    def plain(self) -> Any:
        """The Python value (dicts, lists, scalars)."""
        if self.kind == "object":
            return {k: v.plain() for k, v in self.members.items()}
        if self.kind == "array":
            return [v.plain() for v in self.items]
        return self.value

    @property
    def children(self) -> list[Node]:
        """Members (objects) or items (arrays), in the order of the text."""
        return list(self.members.values()) if self.kind == "object" else self.items


_SPACE = re.compile(r"(?:\s+|//[^\n]*|/\*.*?\*/)*", re.S)
_SCALAR = re.compile(r'"(?:[^"\\\n]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null')


def parse(text: str) -> Node:
    """Parse JSON with ``//`` / ``/* */`` comments and trailing commas.

    >>> parse('{"a": [1, 2,], // note\\n}').plain()
    {'a': [1, 2]}
    """
    node, pos = _value(text, _skip(text, 0), 0)
    if _skip(text, pos) != len(text):
        raise JSONCError(_where(text, _skip(text, pos), "unexpected text after the end"))
    return node


def _skip(text: str, pos: int) -> int:
    match = _SPACE.match(text, pos)
    return match.end() if match else pos


def _where(text: str, pos: int, what: str) -> str:
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"line {line}, column {column}: {what}"


def _value(text: str, pos: int, depth: int) -> tuple[Node, int]:
    if text.startswith(("{", "["), pos):
        if depth >= MAX_DEPTH:
            raise JSONCError(_where(text, pos, f"nested more than {MAX_DEPTH} levels deep"))
        return _container(text, pos, "object" if text[pos] == "{" else "array", depth + 1)
    match = _SCALAR.match(text, pos)
    if not match:
        raise JSONCError(_where(text, pos, "expected a value"))
    return Node(start=pos, end=match.end(), value=json.loads(match.group())), match.end()


def _container(text: str, start: int, kind: str, depth: int) -> tuple[Node, int]:
    node = Node(start=start, end=start, kind=kind)
    close = "}" if kind == "object" else "]"
    pos = _skip(text, start + 1)
    while not text.startswith(close, pos):
        if kind == "object":
            key, pos = _value(text, pos, depth)
            if not isinstance(key.value, str) or key.kind != "scalar":
                raise JSONCError(_where(text, key.start, "expected a \"key\""))
            pos = _skip(text, pos)
            if not text.startswith(":", pos):
                raise JSONCError(_where(text, pos, "expected ':'"))
            value, pos = _value(text, _skip(text, pos + 1), depth)
            value.key_start = key.start
            node.members[key.value] = value
        else:
            value, pos = _value(text, pos, depth)
            node.items.append(value)
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
        elif not text.startswith(close, pos):
            raise JSONCError(_where(text, pos, f"expected ',' or '{close}'"))
    node.end = pos + 1
    return node, node.end


# --- what gets inserted: JSONC text in the target file's indentation style ---------------------

@dataclass(frozen=True, kw_only=True)
class Snippet:
    """JSONC text to insert: continuation lines indented relative to its first line, and the
    ``// comment`` that followed it on its line (kept after the comma the insertion adds)."""

    text: str
    comment: str = ""


def indent_unit(text: str, root: Node | None = None, default: str = "  ") -> str:
    r"""The file's indentation step: how much deeper the first child sits than its container.

    >>> indent_unit('{\n    "a": 1\n}')
    '    '
    """
    for node in _walk(root or parse(text)):
        children = node.children
        if not children:
            continue
        first = children[0].start if children[0].key_start is None else children[0].key_start
        outer, inner = _indent_of(text, node.start), _indent_of(text, first)
        on_own_line = text[text.rfind("\n", 0, first) + 1:first].strip() == ""
        if on_own_line and inner.startswith(outer) and len(inner) > len(outer):
            return inner[len(outer):]
    return default


def _walk(node: Node) -> list[Node]:
    found, todo = [], [node]
    while todo:
        current = todo.pop(0)
        found.append(current)
        todo.extend(current.children)
    return found


def snippet(text: str, node: Node, *, unit: str, source_unit: str | None = None) -> Snippet:
    r"""The value ``node`` cut from ``text`` with the comments inside it and the one after it,
    re-indented from ``text``'s style (``source_unit``) to ``unit``.

    >>> src = '{\n  "a": [\n    1  // one\n  ], // the a\n}'
    >>> s = snippet(src, parse(src).members["a"], unit="    ")
    >>> print(s.text); s.comment
    [
        1  // one
    ]
    '// the a'
    """
    source_unit = source_unit or indent_unit(text)
    base = _indent_of(text, node.start)
    first, *rest = text[node.start:node.end].split("\n")
    lines = [first] + [_restyle(line, base, source_unit, unit) for line in rest]
    return Snippet(text="\n".join(lines), comment=_trailing_comment(text, node.end))


def dumps(value: Any, *, unit: str = "  ") -> Snippet:
    r"""A plain value as a snippet, indented with ``unit``.

    >>> dumps({"a": 1}, unit="\t").text
    '{\n\t"a": 1\n}'
    """
    return Snippet(text=json.dumps(value, indent=unit, ensure_ascii=False))


def member(key: str, value: Snippet) -> Snippet:
    """``"key": value`` as a snippet (the value's comment stays after it)."""
    return Snippet(text=f"{json.dumps(key)}: {value.text}", comment=value.comment)


def _restyle(line: str, base: str, source_unit: str, unit: str) -> str:
    if line.startswith(base):
        line = line[len(base):]
    body = line.lstrip(" \t")
    lead = line[: len(line) - len(body)].replace("\t", source_unit)
    levels, extra = divmod(len(lead), len(source_unit))
    return unit * levels + " " * extra + body


def _trailing_comment(text: str, end: int) -> str:
    match = re.compile(r"[ \t]*,?[ \t]*(//[^\n]*)").match(text, end)
    return match.group(1).rstrip() if match else ""


# --- edits: (start, end, replacement) applied back to front -----------------------------------

Edit = tuple[int, int, str]


def apply(text: str, edits: list[Edit]) -> str:
    """Apply non-overlapping edits to ``text``; insertions at one place keep their order.

    >>> apply("[1]", [(2, 2, ", 2"), (2, 2, ", 3")])
    '[1, 2, 3]'
    """
    ordered = sorted(enumerate(edits), key=lambda e: (e[1][0], e[0]), reverse=True)
    for _, (start, end, replacement) in ordered:
        text = text[:start] + replacement + text[end:]
    return text


def replace(node: Node, value: Snippet, text: str) -> Edit:
    r"""Edit that puts ``value`` where ``node`` is, indented like its line.

    >>> text = '{"a": 1}'; apply(text, [replace(parse(text).members["a"], dumps([2]), text)])
    '{"a": [\n  2\n]}'
    """
    indent = _indent_of(text, node.start)
    return node.start, node.end, _indented(value.text, indent)[len(indent):]


def add_items(text: str, array: Node, values: list[Snippet], *, unit: str = "  ") -> list[Edit]:
    r"""Edits that append ``values`` to a JSON array, after its last item.

    >>> text = '[1, // one\n]'; apply(text, add_items(text, parse(text), [dumps(2)]))
    '[1, // one\n2\n]'
    """
    return _append(text, array, values, unit)


def add_members(text: str, obj: Node, members: dict[str, Snippet], *, unit: str = "  "
                ) -> list[Edit]:
    r"""Edits that add ``"key": value`` members at the end of a JSON object.

    >>> text = '{\n  "a": 1\n}'; apply(text, add_members(text, parse(text), {"b": dumps(2)}))
    '{\n  "a": 1,\n  "b": 2\n}'
    """
    return _append(text, obj, [member(k, v) for k, v in members.items()], unit)


def _append(text: str, container: Node, entries: list[Snippet], unit: str) -> list[Edit]:
    if not entries:
        return []
    children = container.children
    close = container.end - 1
    outer = _indent_of(text, container.start)
    inner = _indent_of(text, children[0].start) if children else outer + unit
    lines = []
    for i, entry in enumerate(entries):
        comma = "," if i < len(entries) - 1 else ""
        comment = f"  {entry.comment}" if entry.comment else ""
        lines.append(_indented(entry.text, inner) + comma + comment)
    block = "\n".join(lines)
    edits: list[Edit] = []
    if children:
        last = children[-1]
        if not text[_skip(text, last.end):close].startswith(","):
            edits.append((last.end, last.end, ","))
    line_start = text.rfind("\n", 0, close) + 1
    if text[line_start:close].strip() == "":  # the bracket has its own line: insert above it
        edits.append((line_start, line_start, block + "\n"))
    else:
        edits.append((close, close, "\n" + block + "\n" + outer))
    return edits


def _indented(block: str, indent: str) -> str:
    return "\n".join(indent + line for line in block.split("\n"))


def _indent_of(text: str, pos: int) -> str:
    line_start = text.rfind("\n", 0, pos) + 1
    line = text[line_start:pos]
    return line[: len(line) - len(line.lstrip())]


# --- printing: wrapped for a narrow terminal, still the same JSONC ----------------------------

def wrap(text: str, width: int) -> str:
    r"""``text`` with lines longer than ``width`` broken where JSONC allows it: between tokens,
    and inside ``//`` comments with ``//`` starting every continuation line (a run of comment
    lines is reflowed as one paragraph). Copied from a terminal, the result parses to the same
    value.

    >>> print(wrap('{"a": ["x y", "z"],  // one two three\n}', 16))
    {"a": ["x y",
      "z"],
    // one two three
    }
    """
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        code, comment = _split_comment(lines[i])
        if not code.strip() and comment:  # a run of comment lines: one paragraph
            run = [comment]
            while i + 1 < len(lines) and lines[i + 1].startswith(indent + "//"):
                i += 1
                run.append(lines[i].strip())
            if max(len(indent) + len(c) for c in run) <= width:
                out += [indent + c for c in run]
            else:
                out += _wrap_comment(" ".join(c[2:].strip() for c in run), indent + "// ",
                                     indent, width)
        elif len(lines[i]) <= width:
            out.append(lines[i])
        else:
            pieces = _wrap_code(code.rstrip(), width, indent + "  ")
            if comment:  # on the code's last line if a few words fit there, else on its own
                first = pieces.pop() + "  // " if len(pieces[-1]) + 20 <= width else indent + "// "
                pieces += _wrap_comment(comment[2:].strip(), first, indent, width)
            out += pieces
        i += 1
    return "\n".join(out)


def _wrap_comment(body: str, first: str, indent: str, width: int) -> list[str]:
    return textwrap.wrap(body, width, initial_indent=first, subsequent_indent=indent + "// ",
                         break_long_words=False, break_on_hyphens=False) or [first.rstrip()]


def _outside_strings(line: str) -> Iterator[int]:
    """The positions of ``line``'s characters that are neither inside a string nor its quotes."""
    in_string = escaped = False
    for i, char in enumerate(line):
        if in_string:
            in_string = escaped or char != '"'
            escaped = not escaped and char == "\\"
        elif char == '"':
            in_string = True
        else:
            yield i


def _split_comment(line: str) -> tuple[str, str]:
    """The code and the ``// comment`` of one line (``//`` inside a string is code)."""
    for i in _outside_strings(line):
        if line.startswith("//", i):
            return line[:i], line[i:]
    return line, ""


def _wrap_code(code: str, width: int, continuation: str) -> list[str]:
    """Break ``code`` at the spaces between tokens (never inside a string)."""
    indent = len(code) - len(code.lstrip())
    breaks = [i for i in _outside_strings(code) if code[i] == " " and i > indent]
    lines, start, prefix = [], 0, ""
    while len(prefix) + len(code) - start > width:
        fits = [b for b in breaks if b > start and len(prefix) + b - start <= width]
        cut = fits[-1] if fits else next((b for b in breaks if b > start), None)
        if cut is None:
            break
        lines.append(prefix + code[start:cut].rstrip())
        start, prefix = cut + 1, continuation
    lines.append(prefix + code[start:])
    return lines
