"""pytest-benchmark entry points in bench/: `pytest bench/ --benchmark-only`.

The default test run (testpaths = ["tests"], addopts has --benchmark-disable) never comes here. The bench modules
are scripts named after what they measure (kernels.py, e2e_grpo.py, ...), not test_*.py, so this conftest
collects their `test_bench_*` functions; and it lets --benchmark-only win over the --benchmark-disable that
pyproject's addopts always adds (pytest-benchmark refuses the pair otherwise).
"""

from __future__ import annotations

import pytest


def pytest_configure(config):
    # runs before pytest-benchmark's own pytest_configure (trylast), which rejects --benchmark-only + --benchmark-disable
    if config.getoption("benchmark_only", False) and config.getoption("benchmark_disable", False):
        config.option.benchmark_disable = False


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name not in ("conftest.py", "__init__.py") \
            and not file_path.name.startswith("test_") and file_path.parent.name == "bench":
        return pytest.Module.from_parent(parent, path=file_path)
    return None
