"""Moved to :mod:`torchlens_edu.integrations.pytest_plugin`.

``-p torchlens_edu.pytest_plugin`` keeps working: this name is an alias of the same module
object, so pytest never sees two copies of the plugin's hooks.
"""

import sys

from torchlens_edu.integrations import pytest_plugin as _plugin

sys.modules[__name__] = _plugin
