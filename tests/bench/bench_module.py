"""Imports a script of bench/ as a module: bench/ is no package (its scripts run as files and import each other
by name), so its folder is on sys.path only while the script imports."""
import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
