"""Deprecated alias of :mod:`uda_sam.nn.sam_io` (SAM files and network weights), kept for one release: import from there.

``uda_sam.sam_io`` is the same module object as ``uda_sam.nn.sam_io``, so its names (and patches of them) are shared.
"""

import sys
from importlib import import_module

sys.modules[__name__] = import_module("uda_sam.nn.sam_io")
