"""Packaging and layering: the installed import names, what each layer may import, no import cycles,
and coexistence with the index's own `kernels` (Hugging Face) and `vlm` distributions."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_dirs() -> dict[str, Path]:
    """Installed package name -> folder, following pyproject's package-dir."""
    config = _setuptools_config()
    roots = config["package-dir"]
    out = {}
    for name in config["packages"]:
        root = max((r for r in roots if name == r or name.startswith(r + ".")), key=len)
        rest = name[len(root) :].lstrip(".")
        out[name] = ROOT / roots[root] / Path(*rest.split(".")) if rest else ROOT / roots[root]
    return out


def test_package_list_covers_the_tree():
    listed = {path.resolve() for path in _package_dirs().values()}
    on_disk = {p.parent.resolve() for top in ("dlmcache", "kernels", "vlm") for p in (ROOT / top).rglob("__init__.py")}
    assert listed == on_disk


def _house_modules() -> dict[str, Path]:
    """Every module of the installed packages by its import name."""
    modules = {}
    for name, folder in _package_dirs().items():
        for f in folder.glob("*.py"):
            modules[name if f.name == "__init__.py" else f"{name}.{f.stem}"] = f
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """House modules that `name` imports anywhere in its file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_layers_import_only_what_they_may():
    modules = _house_modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    for name, deps in graph.items():
        if name.startswith("dlmcache.kernels"):
            assert all(d.startswith("dlmcache.kernels") for d in deps), (name, deps)
        if name.startswith("dlmcache.vlm"):
            allowed = ("dlmcache.kernels", "dlmcache.vlm", "dlmcache.locations")
            assert all(d.startswith(allowed) for d in deps), (name, deps)
        assert not any(d.startswith("tests") for d in deps), (name, deps)
        # the tiny random models are for tests, scripts and demos: the package itself never uses them
        assert name.endswith(".tiny") or not any(d.endswith(".tiny") for d in deps), (name, deps)


def test_no_import_cycles():
    modules = _house_modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle of ideas; leave those edges out.
    graph = {
        n: {d for d in deps if not (d.startswith(n + ".") and modules[n].name == "__init__.py")}
        for n, deps in graph.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("dlmcache.kernels", ("diffusers", "dlmcache.pipeline", "dlmcache.models", "dlmcache.vlm")),
        ("dlmcache.kernels.cache", ("diffusers", "dlmcache.pipeline", "dlmcache.vlm")),
        ("dlmcache.vlm", ("diffusers", "dlmcache.pipeline", "dlmcache.models", "dlmcache.cache")),
        ("dlmcache.vlm.tiny", ("diffusers", "dlmcache.pipeline", "dlmcache.models")),
        # the denoising caches and the batched engine attend through dlmcache.kernels, not the models
        ("dlmcache.cache", ("diffusers", "dlmcache.pipeline", "dlmcache.models")),
        ("dlmcache.engine", ("dlmcache.pipeline", "dlmcache.models")),
    ],
)
def test_importing_a_layer_loads_nothing_above_it(module, forbidden):
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded = json.loads(out.stdout)
    assert not [m for m in loaded if m.startswith(forbidden)]


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True, timeout=600)


def _run(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


OURS = "import dlmcache.kernels as k, dlmcache.vlm as v; assert callable(k.quantized_attention) and v.GUIKV"
THEIRS = "import kernels, vlm; assert callable(kernels.get_kernel) and 'dlmcache' not in kernels.__file__"


def test_installs_beside_the_index_kernels_and_vlm(tmp_path):
    """A user with Hugging Face's `kernels` (and the index's `vlm`) installs this package in either
    order; both import, and uninstalling one leaves the other working."""
    dist = tmp_path / "dist"
    _pip(Path(sys.executable), "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT))
    (wheel,) = dist.glob("dlmcache-*.whl")
    try:
        _pip(Path(sys.executable), "download", "--no-deps", "-d", str(dist), "kernels", "vlm")
    except subprocess.CalledProcessError:
        pytest.skip("the package index cannot be reached for Hugging Face's kernels")
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    # torch, transformers, ... come from this environment, after the new venv's own packages.
    site = next((tmp_path / "venv" / "lib").glob("python*/site-packages"))
    outer = [p for p in sys.path if p.endswith("site-packages")]
    (site / "outer.pth").write_text("\n".join(outer) + "\n")
    work = tmp_path / "elsewhere"  # not the checkout, whose folders would shadow the installed names
    work.mkdir()

    _pip(python, "install", "--no-deps", str(wheel))
    _pip(python, "install", "kernels", "vlm")  # theirs after ours, with their dependencies
    both = _run(python, f"{OURS}; {THEIRS}", work)
    assert both.returncode == 0, both.stderr

    _pip(python, "uninstall", "-y", "kernels", "vlm")
    assert _run(python, OURS, work).returncode == 0
    # the bare name is never ours (it fails, or finds Hugging Face's through the outer environment,
    # where transformers >= 5.25 requires it)
    bare = _run(python, "import kernels; assert 'dlmcache' not in kernels.__file__", work)
    assert bare.returncode == 0 or "No module named 'kernels'" in bare.stderr, bare.stderr

    _pip(python, "install", "--no-deps", "kernels", "vlm", "--find-links", str(dist))
    _pip(python, "uninstall", "-y", "dlmcache")
    theirs = _run(python, THEIRS, work)
    assert theirs.returncode == 0, theirs.stderr
    assert _run(python, "import dlmcache", work).returncode != 0

    _pip(python, "install", "--no-deps", str(wheel))  # ours after theirs
    both = _run(python, f"{OURS}; {THEIRS}", work)
    assert both.returncode == 0, both.stderr


def test_the_checkout_folder_hands_the_bare_name_to_hugging_faces_kernels():
    """From the checkout's root (the working directory of the test command, or a REPL there), the
    folder kernels/ shadows the bare name `kernels`, which transformers imports (and, from 5.25,
    requires): the folder hands the name over to Hugging Face's package, and stays dlmcache.kernels."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("kernels")
    except PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed here")
    code = (
        "import kernels, dlmcache.kernels as k, transformers.modeling_utils; "
        "assert 'site-packages' in kernels.__file__ and callable(kernels.get_kernel), kernels.__file__; "
        f"assert callable(k.quantized_attention) and k.__file__.startswith({str(ROOT)!r})"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
