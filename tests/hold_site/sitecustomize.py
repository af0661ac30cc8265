"""On PYTHONPATH (helpers.hold(..., site=True)), this folder makes every Python process started with HOLD in its
environment hold as tests/held.py says, whoever starts it: a launch script, sbatch and srun, torchrun's agent.
The hold is installed once resnet_dist.trainer is imported, so processes that never train are left alone."""

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path


def _load_held():
    spec = importlib.util.spec_from_file_location("_tests_held", Path(__file__).parents[1] / "held.py")
    held = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(held)
    return held


class _AfterTrainer(importlib.abc.MetaPathFinder):
    """Finds resnet_dist.trainer as the other finders do, and installs the hold once it has run."""

    def __init__(self, held):
        self.held = held

    def find_spec(self, name, path=None, target=None):
        if name != "resnet_dist.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module, held = spec.loader.exec_module, self.held

        def exec_module(module):
            run_module(module)
            sys.modules[name] = module
            held.install()

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("HOLD"):
    _held = _load_held()
    _held._count_signals()
    sys.meta_path.insert(0, _AfterTrainer(_held))
