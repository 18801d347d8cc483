"""``python -m clipfusion`` is the ``clipfusion`` command."""
from __future__ import annotations

import sys

from clipfusion.cli import main

sys.exit(main())
