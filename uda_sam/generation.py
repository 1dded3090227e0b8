"""Deprecated alias of :mod:`uda_sam.pseudo_labels.generation` (one generation of pseudo labels), kept for one release: import from there.

``uda_sam.generation`` is the same module object as ``uda_sam.pseudo_labels.generation``, so its names (and patches of them) are shared.
"""

import sys
from importlib import import_module

sys.modules[__name__] = import_module("uda_sam.pseudo_labels.generation")
