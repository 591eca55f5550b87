"""Stop points: places in the model code where a debugger (or pdb) pauses when asked to.

Inert unless enabled, by environment (``TORCHLENS_EDU_STOP=attention`` or
``TORCHLENS_EDU_STOP=attention:layer=3,head=1``) or by :func:`stop_at`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class StopRequest:
    """Where to stop: a stop-point name and optional layer / head filters."""

    point: str
    layer: int | None = None
    head: int | None = None


_requests: list[StopRequest] = []


def _parse_env(value: str) -> list[StopRequest]:
    requests = []
    for part in filter(None, (p.strip() for p in value.split(";"))):
        point, _, options = part.partition(":")
        kwargs: dict[str, int] = {}
        for option in filter(None, (o.strip() for o in options.split(","))):
            key, _, number = option.partition("=")
            if key not in ("layer", "head") or not number.strip().lstrip("-").isdigit():
                raise ValueError(f"TORCHLENS_EDU_STOP: cannot read {option!r}; write e.g. "
                                 "'attention:layer=3,head=1'")
            kwargs[key] = int(number)
        requests.append(StopRequest(point.strip(), **kwargs))
    return requests


def stop_at(point: str, *, layer: int | None = None, head: int | None = None) -> None:
    """Ask the bundled models to pause at a stop point (``"attention"``).

    >>> stop_at("attention", layer=3); clear_stops()
    """
    _requests.append(StopRequest(point, layer, head))


def clear_stops() -> None:
    """Forget every stop requested through :func:`stop_at`."""
    _requests.clear()


def stop_requested(point: str, *, layer: int | None = None) -> bool:
    """True when a stop at ``point`` (for this layer) is requested. Cheap when none is."""
    env = os.environ.get("TORCHLENS_EDU_STOP")
    if not _requests and not env:
        return False
    requests = _requests + (_parse_env(env) if env else [])
    return any(r.point == point and (r.layer is None or r.layer == layer) for r in requests)
