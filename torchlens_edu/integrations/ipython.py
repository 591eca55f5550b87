"""IPython extension: ``%trace_shapes model(x)`` and ``%%trace_shapes`` for a whole cell.

    %load_ext torchlens_edu            (or: ipython --ext torchlens_edu)
    %trace_shapes model(x)
    %trace_shapes --ops --include "transformer.h.0*" model(x)
    %trace_shapes --meta --dims B=2,T=16 -o tr big_model(x)

The models are found by themselves: the ``nn.Module`` objects the code names, plus any module
that is called outside them (a temporary global pre-hook spots those; it is removed again).
Output goes through rich: colours in a terminal, HTML in Jupyter.
"""

from __future__ import annotations

import ast
import re
from types import CodeType
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

# Options come first; everything after them is the code, kept exactly as typed.
_OPTION = re.compile(r"\s*(?:--ops|--meta|-h|--help|(?:--depth|--include|--dims|--out|-o)"
                     r"(?:\s*=\s*|\s+)(?:\"[^\"]*\"|'[^']*'|\S+))(?=\s|$)")


def _split_options(line: str) -> tuple[str, str]:
    """``"--ops -o tr model(x)"`` -> ``("--ops -o tr", "model(x)")``."""
    end = 0
    while match := _OPTION.match(line, end):
        end = match.end()
    return line[:end].strip(), line[end:].strip()


def _parse_dims(text: str | None) -> dict[str, int]:
    """``"B=2,T=16"`` -> ``{"B": 2, "T": 16}``."""
    if not text:
        return {}
    dims: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = part.partition("=")
        if not sep or not size.strip().isdigit() or not name.strip():
            raise UsageError(f"--dims {text!r}: write names and sizes like --dims B=2,T=16")
        dims[name.strip()] = int(size)
    return dims


def _named_models(code: str, namespace: dict[str, Any]) -> list[Any]:
    """The ``nn.Module`` objects the code names (``model`` in ``model.generate(x)``)."""
    import torch.nn as nn

    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []  # IPython will report it when the code runs
    names = dict.fromkeys(n.id for n in ast.walk(tree) if isinstance(n, ast.Name))
    return [namespace[n] for n in names if isinstance(namespace.get(n), nn.Module)]


@magics_class
class ShapeMagics(Magics):
    """The ``%trace_shapes`` magic (line and cell)."""

    @magic_arguments()
    @argument("--ops", action="store_true",
              help="also every torch op (view, @, softmax, ...) with its source line")
    @argument("--meta", action="store_true",
              help="shapes only, on meta tensors: no weights touched; adds FLOPs and memory")
    @argument("--depth", type=int, default=None, help="modules down to depth N (model is 0)")
    @argument("--include", default=None, help="module-path glob, e.g. 'transformer.h.0*'")
    @argument("--dims", default=None, help="names for sizes, e.g. B=2,T=16")
    @argument("-o", "--out", default=None, metavar="VAR", help="store the ShapeTrace in VAR")
    @line_cell_magic
    def trace_shapes(self, line: str, cell: str | None = None) -> None:
        """Trace the shapes in every nn.Module the code calls, and show them as a tree.

        Line:  %trace_shapes [options] EXPRESSION      e.g. %trace_shapes --ops model(x)
        Cell:  %%trace_shapes [options]                 then the cell's code below

        When the code raises, the error is explained (failing op, its operands' shapes with
        named dims, the line) and re-raised; the trace up to the failure is still shown and
        stored with -o.
        """
        __tracebackhide__ = True  # IPython shows the user's frames of an error, not ours
        from torchlens_edu._core.console import get_console
        from torchlens_edu._core.modules import PatternError
        from torchlens_edu.shapes.tracer import ShapeTracer

        options, code = _split_options(line)
        if unknown := _LOOKS_LIKE_AN_OPTION.match(code):
            raise UsageError(f"%trace_shapes: unknown option {unknown.group()}; the options are "
                             f"{_OPTIONS} (%trace_shapes? explains them). To trace an "
                             "expression that starts with '-', put it in parentheses.")
        if cell is not None and code:
            raise UsageError(f"%%trace_shapes: {code!r} on the magic's line is not an option; "
                             "the code to trace goes in the cell, below the line")
        args = parse_argstring(self.trace_shapes, options)
        for option in ("include", "dims", "out"):  # quotes typed around a value are not part of it
            value = getattr(args, option)
            if isinstance(value, str) and len(value) > 1 and value[0] == value[-1] in "'\"":
                setattr(args, option, value[1:-1])
        source = cell if cell is not None else code
        if not source.strip():
            raise UsageError("nothing to trace: write %trace_shapes model(x), or put the code "
                             "in a %%trace_shapes cell")
        shell = self.shell
        if shell is None:  # a Magics made by hand, outside IPython
            raise UsageError("%trace_shapes runs inside IPython or Jupyter: load it there with "
                             "%load_ext torchlens_edu")
        namespace = shell.user_ns
        # cached under this cell's number, so that a traceback names it "Cell In[n]" as
        # IPython names its own cells, and shows its lines
        filename = shell.compile.cache(source, shell.execution_count)
        compiled = _compile(source, filename, expression=cell is None)  # a typo fails here, once
        try:
            tracer = ShapeTracer(_named_models(source, namespace), ops=args.ops, meta=args.meta,
                                 depth=args.depth, include=args.include,
                                 dims=_parse_dims(args.dims), discover=True)
        except (PatternError, ValueError) as err:  # --include nope, --depth -1, meta weights
            raise UsageError(f"%trace_shapes: {err}") from None
        completed = False
        try:
            with tracer:
                eval(compiled, namespace)  # the user's code, in their namespace, as IPython runs it
            completed = True
        finally:
            trace = tracer.trace
            if args.out:
                namespace[args.out] = trace
            if trace.events:  # the trace, or on an error the part before it; never an empty one
                get_console().print(trace)
            elif completed:
                get_console().print("%trace_shapes: the code called no nn.Module, so there is "
                                    "nothing to show")


_OPTIONS = "--ops, --meta, --depth N, --include PATTERN, --dims B=2,T=16 and -o VAR"
# what is left of the line after the known options, when it starts like an option
_LOOKS_LIKE_AN_OPTION = re.compile(r"--?[A-Za-z][\w-]*(?=[\s=]|$)")


def _compile(source: str, filename: str, *, expression: bool) -> CodeType:
    """The code object IPython would run: an expression where the line is one (``model(x)``),
    else statements (``y = model(x)``); a SyntaxError is the statements' one, not chained."""
    if expression:
        try:
            return compile(source, filename, "eval")
        except SyntaxError:
            pass
    return compile(source, filename, "exec")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext torchlens_edu``: adds ``%trace_shapes`` and ``%%trace_shapes``."""
    ipython.register_magics(ShapeMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext torchlens_edu``: removes them again."""
    manager = ipython.magics_manager
    for kind in ("line", "cell"):
        manager.magics[kind].pop("trace_shapes", None)
    manager.registry.pop(ShapeMagics.__name__, None)
