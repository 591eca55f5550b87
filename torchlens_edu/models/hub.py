"""Finding GPT-2 weights in the Hugging Face hub cache, or downloading them, without hanging.

The cache is used as is whenever it holds the files (no network at all, not even a freshness
check); a download is tried only when they are missing, ``HF_HUB_OFFLINE`` allows it, and the hub
answers a short connection attempt. Every failure says how to get the weights.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torchlens_edu.models.progress import progress

_HUB_TIMEOUT_S = 5.0  # a dead network fails fast instead of hanging
_GET_WEIGHTS = ("To get them, run `huggingface-cli download {name}` (or `hf download {name}`) "
                "where the network is reachable, with HF_HUB_OFFLINE unset or HF_HUB_OFFLINE=0; "
                "or pass a local directory with config.json + model.safetensors: "
                "GPT2.from_pretrained('path/to/dir'). To work offline right now, "
                "GPT2.from_pretrained('embedded') loads the small model shipped with "
                "torchlens-edu.")


class WeightsNotFoundError(FileNotFoundError):
    """The weights are neither cached nor downloadable (offline, or no network); the message
    says how to get them.

    >>> from torchlens_edu.models import GPT2, WeightsNotFoundError
    >>> try:  # doctest: +SKIP
    ...     model = GPT2.from_pretrained("gpt2", progress=False)
    ... except WeightsNotFoundError:
    ...     model = GPT2.from_pretrained("embedded", progress=False)
    """


def _hub_cache_dir() -> str:
    # Read the environment now (huggingface_hub reads it once, at import).
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cached_snapshot(repo_id: str, files: tuple[str, ...]) -> Path | None:
    """The cached snapshot folder of ``repo_id`` holding config.json and one of ``files``, or
    None; never touches the network.

    It reads the cache's layout (``models--ORG--NAME/refs/main`` names the snapshot under
    ``snapshots/``) instead of asking huggingface_hub: importing its download code imports
    tqdm, which warns in a notebook without ipywidgets, and the offline path needs none of it.

    >>> cached_snapshot("gpt2", ("model.safetensors",))  # doctest: +SKIP
    PosixPath('/home/me/.cache/huggingface/hub/models--gpt2/snapshots/607a30d...')
    """
    repo = Path(_hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:  # never downloaded (or not readable): not cached
        return None
    snapshot = repo / "snapshots" / revision
    if (snapshot / "config.json").is_file() and any((snapshot / f).is_file() for f in files):
        return snapshot
    return None


def hub_snapshot(repo_id: str, files: tuple[str, ...]) -> Path:
    """The snapshot folder of ``repo_id``: from the cache, else downloaded (if allowed).

    >>> hub_snapshot("gpt2", ("model.safetensors", "pytorch_model.bin"))  # doctest: +SKIP
    """
    cached = cached_snapshot(repo_id, files)
    if cached is not None:
        return cached
    cache = _hub_cache_dir()
    if _offline():
        raise WeightsNotFoundError(f"GPT-2 weights {repo_id!r} are not in the Hugging Face cache "
                                   f"({cache}) and HF_HUB_OFFLINE=1 forbids downloading them. "
                                   + _GET_WEIGHTS.format(name=repo_id))
    from huggingface_hub import constants

    def not_found(why: str) -> WeightsNotFoundError:
        return WeightsNotFoundError(f"GPT-2 weights {repo_id!r} are not in the Hugging Face cache "
                                    f"({cache}) and downloading them failed ({why}). "
                                    + _GET_WEIGHTS.format(name=repo_id))

    # huggingface_hub retries a dead network for ~25 s; one short connection attempt first
    # turns "no network" into an immediate, actionable error.
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    unreachable = _unreachable(endpoint)
    if unreachable:
        raise not_found(f"{endpoint} is unreachable: {unreachable}")
    with warnings.catch_warnings():  # tqdm's, in a notebook without ipywidgets: not ours to show
        warnings.filterwarnings("ignore", message="IProgress not found")
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError
    with _hub_bars_off(), progress(f"downloading {repo_id} from {endpoint}", show_after_s=0):
        try:
            config = hf_hub_download(repo_id, "config.json", cache_dir=cache,
                                     endpoint=endpoint, etag_timeout=_HUB_TIMEOUT_S)
            for filename in files:
                try:
                    hf_hub_download(repo_id, filename, cache_dir=cache, endpoint=endpoint,
                                    etag_timeout=_HUB_TIMEOUT_S)
                    return Path(config).parent
                except RemoteEntryNotFoundError:
                    continue
        except RemoteEntryNotFoundError as err:
            raise WeightsNotFoundError(f"the hub repo {repo_id!r} has no config.json: {err}"
                                       ) from err
        except (OSError, ValueError) as err:  # unknown repo, refused, timed out, gated, ...
            raise not_found(f"{type(err).__name__}: {str(err).splitlines()[0]}") from err
    raise WeightsNotFoundError(f"the hub repo {repo_id!r} has none of {', '.join(files)}")


@contextmanager
def _hub_bars_off() -> Iterator[None]:
    """huggingface_hub's tqdm bars off for the block (ours is the rich one), and on again after
    if they were on."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    were_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not were_off:
            enable_progress_bars()


def _unreachable(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be reached within the timeout, or None when it can."""
    if urllib.request.getproxies():  # behind a proxy a direct connection proves nothing
        return None
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=_HUB_TIMEOUT_S).close()
    except OSError as err:
        return str(err) or type(err).__name__
    return None
