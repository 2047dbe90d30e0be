"""deploy/local's scripts (``stack.py``, ``secure.py``, ``cluster.py``) from tests: imported as
modules, or run as commands."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "deploy" / "local"


def deploy_script(name: str) -> ModuleType:
    """``deploy/local/<name>.py`` as the module ``weir_local_<name>``, loaded once per process
    (they are scripts, not a package; ``secure.py`` loads ``stack.py`` under the same name)."""
    module_name = f"weir_local_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, LOCAL / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_deploy_script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python deploy/local/<name>.py ARGS`` from the repository; fails the test past ``timeout``."""
    try:
        return subprocess.run(
            [sys.executable, str(LOCAL / f"{name}.py"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{name}.py {' '.join(args)}` took over {timeout:g}s; see its logs under .weir/")
