"""Moved to :mod:`torchlens_edu.integrations.ipython`; this path keeps working."""

from torchlens_edu.integrations.ipython import load_ipython_extension, unload_ipython_extension

__all__ = ["load_ipython_extension", "unload_ipython_extension"]
