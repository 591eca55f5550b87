"""The user's line of a running frame, learned once per code location.

An op trace asks "which line of the user's code made this call?" for every torch op: a walk up
the frames past torch, tensor-plumbing libraries and our own observers (``frames.is_user_file``).
Each code object is judged once (:class:`CodeFacts`: the user's? ours? FSDP's?) and each of its
lines becomes one :class:`Site`, so an op costs one dictionary lookup per frame walked (usually
one: most ops are called from the user's line itself). A site's source text is read when it is
first asked for (a trace being shown), never per op.

The cache lives exactly as long as the code it describes: an entry is dropped when its code
object is freed, so it never holds more than the code alive, and a module reloaded after an edit
(``importlib.reload``) has new code objects, whose lines are read afresh from the new file.
"""

from __future__ import annotations

import linecache
import os
import weakref
from dataclasses import dataclass, field
from types import CodeType, FrameType

from torchlens_edu._core.frames import is_toolkit_file, is_user_file

_FSDP_DIR = f"{os.sep}torch{os.sep}distributed{os.sep}fsdp{os.sep}"


def source_text(filename: str, line: int) -> str:
    """The text of ``filename``'s line ``line`` as the file reads now, stripped (``""`` when
    unknown). A file edited since it was last read is read again, not served from
    ``linecache``'s old copy.

    >>> "import linecache" in {source_text(__file__, n) for n in range(1, 30)}
    True
    """
    linecache.checkcache(filename)  # a stat; entries without a file (IPython cells) stay
    return linecache.getline(filename, line).strip()


@dataclass(slots=True, kw_only=True)
class Site:
    """A line of the user's code that made a call: shared by every op made there.

    >>> any(Site(filename=__file__, line=n).text == "import linecache" for n in range(1, 30))
    True
    """

    filename: str
    line: int
    _text: str | None = field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str:
        """The line's source text (stripped), read the first time it is asked for.

        >>> Site(filename="<no such file>", line=3).text
        ''
        """
        if self._text is None:
            self._text = source_text(self.filename, self.line)
        return self._text


@dataclass(slots=True, kw_only=True)
class CodeFacts:
    """What one code object is, judged once from its file name, and its sites so far.

    >>> facts = code_facts(code_facts.__code__)
    >>> facts.user, facts.toolkit, facts.fsdp
    (False, True, False)
    """

    user: bool  # the user's code: an op's line is here (frames.is_user_file)
    toolkit: bool  # our observers' own code: the torch calls made there are not the model's
    fsdp: bool  # torch.distributed.fsdp: the ops it calls are FSDP's parameter gathering
    sites: dict[int, Site] = field(default_factory=dict)  # instruction offset -> its line's site
    lines: dict[int, Site] = field(default_factory=dict)  # line -> site: one per line
    freed: weakref.ref[CodeType] | None = None  # drops the entry when the code object goes


_codes: dict[int, CodeFacts] = {}  # id(code object) -> its facts, while the code object lives


def code_facts(code: CodeType) -> CodeFacts:
    """The facts of ``code``, judged the first time it is seen.

    >>> code_facts(code_facts.__code__) is code_facts(code_facts.__code__)
    True
    """
    facts = _codes.get(id(code))
    if facts is not None:
        return facts
    filename = code.co_filename
    facts = CodeFacts(user=is_user_file(filename), toolkit=is_toolkit_file(filename),
                      fsdp=_FSDP_DIR in filename)
    key = id(code)
    codes = _codes  # the callback holds the dict, not the module global (gone at exit)

    def forget(_: weakref.ref[CodeType]) -> None:  # runs while the code object is freed,
        codes.pop(key, None)                       # before its id can be reused

    facts.freed = weakref.ref(code, forget)
    codes[key] = facts
    return facts


def frame_site(frame: FrameType, facts: CodeFacts) -> Site:
    """The :class:`Site` of the line ``frame`` runs now (``facts`` are its code's facts).

    >>> import sys
    >>> frame = sys._getframe()
    >>> frame_site(frame, code_facts(frame.f_code)).line == frame.f_lineno
    True
    """
    offset = frame.f_lasti
    site = facts.sites.get(offset)
    if site is None:  # first time at this instruction: one Site per line, shared
        line = frame.f_lineno or 0
        site = facts.lines.get(line)
        if site is None:
            site = facts.lines[line] = Site(filename=frame.f_code.co_filename, line=line)
        facts.sites[offset] = site
    return site


def user_site(frame: FrameType | None) -> Site | None:
    """The :class:`Site` of the first user frame at or above ``frame`` (None: no user code).

    >>> import sys
    >>> sites = [user_site(sys._getframe()) for _ in range(3)]  # one line, three calls
    >>> sites[0] is sites[1] is sites[2], sites[0].filename.startswith("<doctest")
    (True, True)
    """
    codes = _codes
    while frame is not None:
        code = frame.f_code
        facts = codes.get(id(code)) or code_facts(code)
        if facts.user:
            return frame_site(frame, facts)
        frame = frame.f_back
    return None


def caller_site(frame: FrameType | None) -> tuple[Site | None, bool]:
    """Like :func:`user_site`, and whether FSDP's own code stands between ``frame`` and that
    user frame (the op was FSDP gathering or freeing parameters, not the user's line).

    >>> import sys
    >>> site, by_fsdp = caller_site(sys._getframe())
    >>> site is not None, by_fsdp
    (True, False)
    """
    codes = _codes
    fsdp = False
    while frame is not None:
        code = frame.f_code
        facts = codes.get(id(code)) or code_facts(code)
        if facts.user:
            return frame_site(frame, facts), fsdp
        fsdp = fsdp or facts.fsdp
        frame = frame.f_back
    return None, fsdp
