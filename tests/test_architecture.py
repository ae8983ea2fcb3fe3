"""The shape of the package (issue 12): engines in ``prunekit.core`` import no plugin package,
plugin packages import the engines (never each other), and no function or file grows past
what a reader can hold.

The import direction is checked twice: at run time (importing every core module in a fresh
interpreter loads no plugin package) and statically (no import statement in ``core``, at the
top or inside a function, names one), in the spirit of import-linter's layer contracts.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, run_python

PACKAGE = ROOT / "prunekit"
CORE = PACKAGE / "core"
#: packages reached only through the plugin manager (prunekit.plugins)
PLUGIN_PACKAGES = (
    "prunekit.adapters",
    "prunekit.scorers",
    "prunekit.quantizers",
    "prunekit.recoveries",
    "prunekit.kernels",
)
#: what a plugin package may import from prunekit, besides its own modules
PLUGIN_MAY_IMPORT = (
    "prunekit.core",
    "prunekit.contracts",
    "prunekit.errors",
    "prunekit.hookspecs",
    "prunekit.plugins",
    "prunekit.versions",
)
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for every import in ``path``: top level, inside functions, relative
    ones resolved, ``from a import b`` giving both ``a`` and ``a.b`` (``b`` may be a module),
    and ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path if path.name == "__init__.py" else path.parent, root)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant):
                if isinstance(first.value, str):
                    yield node.lineno, first.value


def last_json_line(code: str):
    """Run ``code`` in a fresh interpreter; the JSON value on its last line of output."""
    res = run_python(code)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_checked_packages_exist():
    for name in PLUGIN_PACKAGES:
        assert (ROOT / name.replace(".", "/") / "__init__.py").is_file(), name
    assert len(python_files(CORE)) > 10


def test_importing_core_loads_no_plugin_package():
    """(a) In a fresh interpreter, importing every module of prunekit.core (and
    prunekit.contracts) leaves no plugin package in sys.modules."""
    modules = ["prunekit.contracts", *(module_name(p) for p in python_files(CORE))]
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"plugins = {PLUGIN_PACKAGES!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "    if any(m == p or m.startswith(p + '.') for p in plugins))))\n"
    )
    loaded = last_json_line(code)
    assert loaded == [], f"importing prunekit.core loads plugin packages: {loaded}"


def test_checking_a_plan_against_a_config_loads_no_model_code():
    """Validating a plan from config.json (what ``apply``/``compress`` do before any weight is
    read) resolves the adapter without importing transformers' model classes: those import
    ``modeling_utils`` and, through it, every installed quantization backend (torchao prints
    warnings to stderr on import, and the import alone takes seconds)."""
    code = (
        "import json, sys\n"
        "from transformers import LlamaConfig\n"
        "from prunekit import PrunePlan, get_adapter\n"
        "config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,\n"
        "                     num_key_value_heads=2, intermediate_size=128)\n"
        "PrunePlan(layers=[1]).validate(get_adapter(config).config_shapes(config))\n"
        "heavy = ('transformers.modeling_utils', 'torchao', 'gptqmodel')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m in heavy)))\n"
    )
    loaded = last_json_line(code)
    assert loaded == [], f"checking a plan imports model code: {loaded}"


def test_core_never_imports_a_plugin_package():
    """(b) No import statement in prunekit/core, at the top or inside a function, names a
    plugin package; core reaches plugins through prunekit.plugins.get_plugins()."""
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in python_files(CORE)
        for line, module in imported_modules(path)
        if within(module, PLUGIN_PACKAGES)
    ]
    assert not found, "core must not import plugin packages:\n" + "\n".join(found)


@pytest.mark.parametrize("package", PLUGIN_PACKAGES)
def test_plugin_packages_import_core_and_nothing_beside_them(package):
    """(c) A plugin package may import prunekit.core, the contract and the plugin machinery,
    and its own modules; not the package root (which re-exports everything) and not another
    plugin package (then it would belong to that one, or the shared part to core)."""
    directory = ROOT / package.replace(".", "/")
    allowed = (*PLUGIN_MAY_IMPORT, package)
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in python_files(directory)
        for line, module in imported_modules(path)
        if within(module, ("prunekit",))
        and not within(module, allowed)
        and not _root_name_allowed(module)
    ]
    assert not found, f"{package} reaches past core:\n" + "\n".join(found)


def _root_name_allowed(module: str) -> bool:
    """``from prunekit import X`` yields ``prunekit`` and ``prunekit.X``: the bare root is
    fine when every ``X`` is (checked on its own entry)."""
    return module == "prunekit"


def test_plugin_packages_do_import_core():
    """(c) The direction is plugins -> core: the built-in plugins build on the engines."""
    users = {
        package
        for package in PLUGIN_PACKAGES
        for path in python_files(ROOT / package.replace(".", "/"))
        for _, module in imported_modules(path)
        if within(module, ("prunekit.core", "prunekit.contracts"))
    }
    assert users >= {"prunekit.adapters", "prunekit.scorers", "prunekit.quantizers"}
    assert "prunekit.recoveries" in users


def _is_triton_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            if isinstance(target.value, ast.Name) and target.value.id == "triton":
                return True
    return False


def long_functions(path: Path, root: Path = ROOT) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and not _is_triton_kernel(node):
                yield f"{path.relative_to(root)}:{node.lineno} {node.name}() has {lines} lines"


def test_no_function_is_longer_than_80_lines():
    """(d) Functions are split along their stages (Triton kernels excepted: one kernel is one
    launch)."""
    found = [msg for path in python_files(PACKAGE) for msg in long_functions(path)]
    assert not found, "split these functions:\n" + "\n".join(found)


def test_no_file_is_longer_than_500_lines():
    """(d) A module a newcomer can read in one sitting."""
    found = []
    for path in python_files(PACKAGE):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_FILE_LINES:
            found.append(f"{path.relative_to(ROOT)} has {n} lines")
    assert not found, "split these files:\n" + "\n".join(found)


def test_the_checks_see_what_they_check(tmp_path):
    """The static checks themselves: every import form is seen, kernels are recognised."""
    sample = tmp_path / "prunekit" / "core" / "sample.py"
    sample.parent.mkdir(parents=True)
    sample.write_text(
        "import prunekit.adapters.llama\n"
        "from prunekit import scorers\n"
        "def f():\n"
        "    from ..quantizers import awq\n"
        "    import importlib\n"
        "    importlib.import_module('prunekit.recoveries')\n"
        "@triton.jit\n"
        "def _k():\n" + "    pass\n" * 100
    )
    seen = {m for _, m in imported_modules(sample, tmp_path)}
    assert {
        "prunekit.adapters.llama",
        "prunekit.scorers",
        "prunekit.quantizers.awq",
        "prunekit.recoveries",
    } <= seen
    assert list(long_functions(sample, tmp_path)) == []
    sample.write_text("def f():\n" + "    pass\n" * 80)
    assert [m.split()[-3:] for m in long_functions(sample, tmp_path)] == [["has", "81", "lines"]]
