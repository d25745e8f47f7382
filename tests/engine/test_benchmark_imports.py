"""Every benchmark script imports: one renamed a helper of another (tasks_tiny's make_inputs became
make_request) and gpu_throughput.py --quick and batched_tiles.py failed with an ImportError, which
for the GPU script means a lost lease. Imported in a fresh interpreter: nothing of theirs runs."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_script_imports():
    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_"))
    assert {"gpu_throughput", "batched_tiles", "tasks_tiny"} <= set(names)
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module('benchmarks.' + n)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
