"""Deprecated alias of :mod:`uda_sam.evaluation.analysis` (the paper's analyses), kept for one release: import from there.

``uda_sam.analysis`` is the same module object as ``uda_sam.evaluation.analysis``, so its names (and patches of them) are shared.
"""

import sys
from importlib import import_module

sys.modules[__name__] = import_module("uda_sam.evaluation.analysis")
