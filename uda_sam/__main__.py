"""``python -m uda_sam``: the same as the ``uda-sam`` command."""

from __future__ import annotations

import sys

from uda_sam.cli.entry_point import main

if __name__ == "__main__":
    sys.exit(main())
