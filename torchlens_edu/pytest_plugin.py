"""pytest plugin for torchlens_edu (registered through the ``pytest11`` entry point).

Inert unless asked: importing this module imports neither torch nor the rest of the toolkit.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("torchlens_edu", "torchlens_edu: tensors in tests")
    group.addoption("--tle-nan-watch", action="store_true", default=False,
                    help="run every test under torchlens_edu's NaN/Inf watch")
    group.addoption("--tle-print", metavar="PRESET", default=None,
                    help="torch print options preset during tests (edu, short, full, default)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nan_watch: run this test under torchlens_edu's NaN watch")
    config.addinivalue_line("markers",
                            "print_options(preset=None, **overrides): torch print options "
                            "for this test (torchlens_edu.printoptions)")
