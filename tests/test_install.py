"""A plain install: the dependencies the package declares cover every module it
imports, and the wheel, installed by itself into a fresh environment, runs every
command of the README from a folder outside the repository.

The wheel is built with `pip wheel --no-build-isolation` (hatchling comes with
the `dev` extra, so no network is needed) and installed with `--no-deps` into a
virtual environment that sees this interpreter's packages: the dependency
declaration is checked by the import scan, the packaging (the specs shipped
inside the wheel, the `flopsim` entry point) by running the commands.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = {"torch": "torch", "transformers": None}  # imported lazily, only where a command needs them
NEEDS_TORCH = ("flopsim validate", "flopsim calibrate")  # the torch extra; minutes of measuring


def _declared() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in project["dependencies"]}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, imported at module level) of every absolute import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, id(node) in top_level))
    return out


def test_every_imported_package_is_a_declared_dependency():
    """Each third-party module flopsim imports belongs to a distribution in
    `dependencies`, except the optional torch and transformers, which only the torch
    references (flopsim/torchref/) import at their top level, and no other module
    imports the references at its top level (every other command loads without torch)."""
    declared = _declared()
    owners = metadata.packages_distributions()
    missing, eager = set(), set()
    for path in (ROOT / "flopsim").rglob("*.py"):
        torchref = "torchref" in path.relative_to(ROOT).parts
        for name, at_top in _imports(path):
            module = name.split(".")[0]
            if name.startswith("flopsim.torchref") and at_top and not torchref:
                eager.add(f"{path.relative_to(ROOT)}: {name}")
            if module == "flopsim" or module in sys.stdlib_module_names or module == "__future__":
                continue
            if module in OPTIONAL:
                if at_top and not torchref:
                    eager.add(f"{path.relative_to(ROOT)}: {module}")
                continue
            dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
            if not dists & declared:
                missing.add(f"{path.relative_to(ROOT)}: {module} ({', '.join(sorted(dists))})")
    assert not missing, f"imported but not declared: {sorted(missing)}"
    assert not eager, f"torch or its references imported at module level: {sorted(eager)}"


def readme_commands() -> list[str]:
    """Every `flopsim ...` line of the README's code blocks (continuations joined)."""
    from markdown_it import MarkdownIt

    lines = []
    for token in MarkdownIt().parse((ROOT / "README.md").read_text()):
        if token.type in ("fence", "code_block"):
            for line in token.content.replace("\\\n", " ").splitlines():
                if line.strip().startswith("flopsim "):
                    lines.append(line.strip())
    return lines


def _runs_csv(path: Path) -> None:
    """A CSV of runs for `--law my_runs.csv`: losses of the Chinchilla law (Hoffmann et al.
    2022: E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28) on a grid of sizes."""
    rows = ["params,tokens,loss"]
    for n in (1e8, 3e8, 1e9, 3e9):
        for d in (2e9, 6e9, 2e10, 6e10):
            rows.append(f"{n:g},{d:g},{1.69 + 406.4 / n ** 0.34 + 410.7 / d ** 0.28:.6f}")
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder, work folder): the wheel installed alone into a fresh environment."""
    pytest.importorskip("hatchling")
    tmp = tmp_path_factory.mktemp("install")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                            "-w", str(tmp / "dist"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp / "dist").glob("flopsim-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")], check=True)
    bin_dir = tmp / "venv" / ("Scripts" if os.name == "nt" else "bin")
    install = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    work = tmp / "work"
    work.mkdir()
    return bin_dir, work


@pytest.mark.slow
def test_the_wheel_runs_every_readme_command_outside_the_repository(installed):
    bin_dir, work = installed
    where = subprocess.run([str(bin_dir / "python"), "-c", "import flopsim; print(flopsim.__file__)"],
                           capture_output=True, text=True, cwd=work)
    assert str(bin_dir.parent) in where.stdout, where.stdout  # the wheel's copy, not the checkout
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MPLBACKEND": "Agg"}
    commands = [c for c in readme_commands() if not c.startswith(NEEDS_TORCH)]
    assert len(commands) >= 25
    for command in commands:
        for arg in shlex.split(command, comments=True):
            source = ROOT / arg
            if "/" in arg and source.is_file():  # a file the README names: the user's own copy
                (work / arg).parent.mkdir(parents=True, exist_ok=True)
                (work / arg).write_bytes(source.read_bytes())
        if "my_runs.csv" in command:
            _runs_csv(work / "my_runs.csv")
        r = subprocess.run(command, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{command}\n{r.stderr[-2000:]}"
    assert (work / "isoflop.png").stat().st_size > 0 and (work / "grid.csv").stat().st_size > 0
    assert (work / "reports" / "conditional-vs-dense-h100-sxm" / "README.md").is_file()
