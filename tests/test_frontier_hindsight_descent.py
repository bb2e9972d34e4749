"""benchmarks/frontier_hindsight_descent.py's moves, on a hand-made schedule."""

from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import frontier_hindsight_descent as script  # noqa: E402


def test_moves_keep_the_ends_and_the_order():
    # Step 3 may go to 1, 2, 4 (5 is taken); step 5 to 4 (3 is taken), 6 (7 is the last step): 3 + 2 moves.
    assert script.neighbours([0, 3, 5, 7]) == [[0, 1, 5, 7], [0, 2, 5, 7], [0, 4, 5, 7], [0, 3, 4, 7], [0, 3, 6, 7]]
    assert script.neighbours([0, 1]) == []
