"""Put examples/tal on sys.path: its modules import each other by plain name.

A helper module rather than a conftest.py, because other tests import the top-level
tests/conftest.py as `conftest` and a second one here would shadow it.
"""
import sys
from pathlib import Path

TAL = Path(__file__).resolve().parents[2] / "examples" / "tal"
if str(TAL) not in sys.path:
    sys.path.insert(0, str(TAL))
