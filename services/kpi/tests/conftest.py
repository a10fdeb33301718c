"""Makes the hand-computed scenario (kpi_scenario.py) importable by the kpi tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
