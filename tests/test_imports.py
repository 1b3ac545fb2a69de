"""The engine imports apart from the harness: ``import efgraph.core`` loads no training code."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_engine_loads_no_training_code_and_the_package_still_exports_the_trainer():
    code = ("import sys, efgraph.core, efgraph; "
            "print(sorted(m for m in sys.modules if m.startswith(('efgraph.training', 'efgraph.model_io', 'wandb')))); "
            "from efgraph import EnergyTrainer, load_model, export_model; print(EnergyTrainer.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.splitlines() == ["[]", "EnergyTrainer"]
