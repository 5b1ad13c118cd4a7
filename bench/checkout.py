"""`checkout.use()`, called first by the micro-benchmarks run as `python bench/x.py`: puts this checkout's root
ahead of the venv's installed kimi-gateway (python puts bench/, not the root, first on sys.path, so an editable
install of another checkout would be measured instead)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use() -> None:
    if sys.path[:1] != [ROOT]:
        sys.path.insert(0, ROOT)
