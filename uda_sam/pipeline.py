"""Deprecated alias of :mod:`uda_sam.cli.pipeline` (the ``uda-sam pipeline`` command), kept for one release: import from there.

``uda_sam.pipeline`` is the same module object as ``uda_sam.cli.pipeline``, so its names (and patches of them) are shared.
"""

import sys
from importlib import import_module

sys.modules[__name__] = import_module("uda_sam.cli.pipeline")
