"""The architecture, checked: what may import what, who decides a request is done, where the C lives."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import nanoserve

PACKAGE = Path(nanoserve.__file__).parent
REPO = PACKAGE.parent


def module_path(module: str) -> Path:
    path = REPO.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def direct_imports(module: str) -> set[str]:
    """Modules ``module`` imports anywhere in its source (module level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(module_path(module).read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # ``from nanoserve.tools import demo`` imports the submodule nanoserve.tools.demo
            found.update(f"{node.module}.{a.name}" for a in node.names if module_path(f"{node.module}.{a.name}").exists())
    return found


def imported_by(module: str) -> set[str]:
    """Everything ``module`` reaches through nanoserve imports, transitively (third-party names included,
    not followed). The package's own ``__init__`` (the public facade) is not followed: it imports it all."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        for name in direct_imports(current):
            if name in seen:
                continue
            seen.add(name)
            if name.startswith("nanoserve.") and module_path(name).exists():
                todo.append(name)
    return seen


@pytest.mark.parametrize(
    "module", ["nanoserve.runner.model_runner", "nanoserve.runner.worker", "nanoserve.distributed.multiproc"]
)
def test_the_runner_side_never_imports_the_scheduler(module: str) -> None:
    loaded = imported_by(module)
    assert "nanoserve.engine.scheduler" not in loaded
    assert "nanoserve.engine.step" in loaded or module != "nanoserve.runner.model_runner"


def test_scheduling_needs_no_torch() -> None:
    loaded = imported_by("nanoserve.engine.scheduler")
    assert not any(m == "torch" or m.startswith("torch.") for m in loaded)
    assert "nanoserve.kvcache.block_manager" in loaded


def test_the_core_does_not_import_the_tools() -> None:
    # Entrypoints (llm.py, cli.py, server/cli.py) may use the demo checkpoint; the core must not.
    for module in ("nanoserve.engine.llm_engine", "nanoserve.engine.async_engine", "nanoserve.server.serving"):
        assert not any(m.startswith("nanoserve.tools") for m in imported_by(module)), module


def test_only_the_output_processor_applies_stop_rules() -> None:
    """A finish rule in the scheduler or the engine would be a second owner of the decision."""
    for path in (PACKAGE / "engine" / "scheduler.py", PACKAGE / "engine" / "llm_engine.py"):
        source = path.read_text()
        for rule in ("stop_token_ids", "min_tokens", "max_tokens", "_stop_strings", "ignore_eos"):
            assert rule not in source, f"{path.name} applies a stop rule ({rule})"
    processor = (PACKAGE / "engine" / "output_processor.py").read_text()
    assert all(rule in processor for rule in ("stop_token_ids", "min_tokens", "max_tokens", "_stop_strings"))


def test_kernels_are_c_files_that_a_wheel_carries(tmp_path) -> None:
    assert "#include" not in (PACKAGE / "layers" / "native.py").read_text()
    sources = sorted((PACKAGE / "layers").glob("*.c"))
    assert sources, "no C kernel sources beside native.py"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("nanoserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in sources:
        assert f"nanoserve/layers/{src.name}" in names
