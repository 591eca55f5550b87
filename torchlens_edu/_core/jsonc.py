"""JSON with comments (VS Code's ``launch.json`` / ``settings.json``), edited in place.

:func:`parse` keeps where every value sits in the text, so that :func:`add_items`,
:func:`add_members` and :func:`replace` change only what they must: the user's comments,
trailing commas and formatting everywhere else stay exactly as they were.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any


class JSONCError(ValueError):
    """The text is not JSON-with-comments; says where."""


@dataclass
class Node:
    """A value and its span ``text[start:end]``; objects and arrays keep their children."""

    start: int
    end: int
    value: Any = None
    members: dict[str, Node] = field(default_factory=dict)  # objects
    items: list[Node] = field(default_factory=list)  # arrays
    kind: str = "scalar"  # "object", "array" or "scalar"

    def plain(self) -> Any:
        """The Python value (dicts, lists, scalars)."""
        if self.kind == "object":
            return {k: v.plain() for k, v in self.members.items()}
        if self.kind == "array":
            return [v.plain() for v in self.items]
        return self.value


_SPACE = re.compile(r"(?:\s+|//[^\n]*|/\*.*?\*/)*", re.S)
_SCALAR = re.compile(r'"(?:[^"\\\n]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null')


def parse(text: str) -> Node:
    """Parse JSON with ``//`` / ``/* */`` comments and trailing commas.

    >>> parse('{"a": [1, 2,], // note\\n}').plain()
    {'a': [1, 2]}
    """
    node, pos = _value(text, _skip(text, 0))
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


def _value(text: str, pos: int) -> tuple[Node, int]:
    if text.startswith("{", pos):
        return _container(text, pos, "object")
    if text.startswith("[", pos):
        return _container(text, pos, "array")
    match = _SCALAR.match(text, pos)
    if not match:
        raise JSONCError(_where(text, pos, "expected a value"))
    return Node(pos, match.end(), json.loads(match.group())), match.end()


def _container(text: str, start: int, kind: str) -> tuple[Node, int]:
    node = Node(start, start, kind=kind)
    close = "}" if kind == "object" else "]"
    pos = _skip(text, start + 1)
    while not text.startswith(close, pos):
        if kind == "object":
            key, pos = _value(text, pos)
            if not isinstance(key.value, str) or key.kind != "scalar":
                raise JSONCError(_where(text, key.start, "expected a \"key\""))
            pos = _skip(text, pos)
            if not text.startswith(":", pos):
                raise JSONCError(_where(text, pos, "expected ':'"))
            value, pos = _value(text, _skip(text, pos + 1))
            node.members[key.value] = value
        else:
            value, pos = _value(text, pos)
            node.items.append(value)
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
        elif not text.startswith(close, pos):
            raise JSONCError(_where(text, pos, f"expected ',' or '{close}'"))
    node.end = pos + 1
    return node, node.end


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


def replace(node: Node, value: Any, text: str) -> Edit:
    r"""Edit that puts ``value`` where ``node`` is, indented like its line.

    >>> text = '{"a": 1}'; apply(text, [replace(parse(text).members["a"], [2], text)])
    '{"a": [\n  2\n]}'
    """
    return node.start, node.end, dump(value, _indent_of(text, node.start))


def add_items(text: str, array: Node, values: list[Any]) -> list[Edit]:
    r"""Edits that append ``values`` to a JSON array, after its last item.

    >>> text = '[1, // one\n]'; apply(text, add_items(text, parse(text), [2]))
    '[1, // one\n2\n]'
    """
    return _append(text, array, [dump(v, "") for v in values], array.items)


def add_members(text: str, obj: Node, members: dict[str, Any]) -> list[Edit]:
    r"""Edits that add ``"key": value`` members at the end of a JSON object.

    >>> text = '{\n  "a": 1\n}'; apply(text, add_members(text, parse(text), {"b": 2}))
    '{\n  "a": 1,\n  "b": 2\n}'
    """
    entries = [f"{json.dumps(k)}: {dump(v, '')}" for k, v in members.items()]
    return _append(text, obj, entries, list(obj.members.values()))


def _append(text: str, container: Node, entries: list[str], children: list[Node]) -> list[Edit]:
    if not entries:
        return []
    close = container.end - 1
    outer = _indent_of(text, container.start)
    inner = _indent_of(text, children[0].start) if children else outer + "  "
    block = ",\n".join(_reindent(e, inner) for e in entries)
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


def dump(value: Any, indent: str) -> str:
    r"""``value`` as 2-space-indented JSON whose continuation lines start with ``indent``.

    >>> dump({"a": 1}, "  ")
    '{\n    "a": 1\n  }'
    """
    return _reindent(json.dumps(value, indent=2, ensure_ascii=False), indent)[len(indent):]


def _reindent(block: str, indent: str) -> str:
    return "\n".join(indent + line for line in block.splitlines())


def _indent_of(text: str, pos: int) -> str:
    line_start = text.rfind("\n", 0, pos) + 1
    line = text[line_start:pos]
    return line[: len(line) - len(line.lstrip())]
