"""Deprecated alias of :mod:`uda_sam.cli.pseudo_label` (the ``uda-sam pseudo-label`` command), kept for one release: import from there.

``uda_sam.pseudo_label_cli`` is the same module object as ``uda_sam.cli.pseudo_label``, so its names (and patches of them) are shared.
"""

import sys
from importlib import import_module

sys.modules[__name__] = import_module("uda_sam.cli.pseudo_label")
