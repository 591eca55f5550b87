"""Helpers the tests share, not tests themselves: ``zoo`` (the model zoo every observer must
handle, and ``ModelGuard``), ``dap_client`` (drives debugpy as VS Code does) and
``hf_checkpoints`` (small Hugging Face GPT-2 checkpoints written to disk), ``sigint_stress``
(Ctrl-C at random moments in nested observers; also runnable by hand).

``tests/`` is on ``sys.path`` when pytest runs (``tests/conftest.py`` is a rootdir conftest,
also in every xdist worker), so tests import them as ``from support.zoo import ...``.
"""
