"""The package's folders are its layers: a module imports only from its own layer or below, and no
two modules import each other (directly or round a longer cycle). sd-mecha's API is used from a few
named modules only (`SD_MECHA_USERS`), so following a new sd-mecha release is a change in one layer.
Imports inside functions count."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "sd_mecha_rebasin"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE
LAYERS = ["common", "model_configs", "permutations", "architectures", "search", "files", "mecha", "cli", "comfyui"]
"""Lowest first; the package's own `__init__` and `__main__` sit above all of them."""


SD_MECHA_USERS = (
    f"{PACKAGE}.mecha.*",  # the merge methods and the recipes the CLI runs
    f"{PACKAGE}.common.sd_mecha_compat",  # what differs between sd-mecha releases
    f"{PACKAGE}.model_configs",  # its `resolve`: the gateway to sd-mecha's config registry
    f"{PACKAGE}.files.sd_mecha_formats",  # the readers sd-mecha opens our files with
)
"""The modules that may import sd-mecha; `.*` covers a folder and everything under it."""


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return len(LAYERS)
    return LAYERS.index(parts[1])


def internal_imports(module: str) -> set[str]:
    """Every module of the package that `module` imports, anywhere in its body."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    found.discard(module)
    return {m for m in found if m in MODULES}


GRAPH = {m: internal_imports(m) for m in MODULES}


def imports_sd_mecha(source: str, filename: str = "<source>") -> bool:
    """Whether the code imports sd-mecha (`import sd_mecha...` or `from sd_mecha... import`) anywhere."""
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "sd_mecha" for a in node.names):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and not node.level
            and (node.module or "").split(".")[0] == "sd_mecha"
        ):
            return True
    return False


def may_import_sd_mecha(module: str) -> bool:
    for user in SD_MECHA_USERS:
        folder = user.removesuffix(".*")
        if module == folder or (user.endswith(".*") and module.startswith(folder + ".")):
            return True
    return False


def test_every_module_is_in_a_layer():
    for module in MODULES:
        assert layer(module) >= 0, module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_its_own_layer_or_below(module):
    upward = sorted(m for m in GRAPH[module] if layer(m) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports from above: {upward}"


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if n.startswith(m + ".") or m == PACKAGE:
                continue  # a package importing its own submodules is not a cycle
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rules above are not vacuous: the graph has edges, and an upward edge would be reported."""
    assert sum(len(v) for v in GRAPH.values()) > 50
    assert (
        layer(f"{PACKAGE}.cli.jobs")
        > layer(f"{PACKAGE}.files.checkpoint")
        > layer(f"{PACKAGE}.common.errors")
    )
    assert f"{PACKAGE}.common.errors" in GRAPH[f"{PACKAGE}.files.checkpoint"]


def test_sd_mecha_is_imported_only_from_its_named_modules():
    offenders = sorted(
        m
        for m, path in MODULES.items()
        if not may_import_sd_mecha(m) and imports_sd_mecha(path.read_text(), str(path))
    )
    assert not offenders, f"import sd-mecha outside {SD_MECHA_USERS}: {offenders}"
    users = {m for m, path in MODULES.items() if imports_sd_mecha(path.read_text(), str(path))}
    assert {
        f"{PACKAGE}.files.sd_mecha_formats",
        f"{PACKAGE}.mecha.recipes",
        f"{PACKAGE}.model_configs",
    } <= users


def test_the_sd_mecha_check_sees_an_import():
    """Not vacuous: imports inside functions and dotted `from` imports are seen; the package's own
    `sd_mecha_rebasin` and relative imports are not sd-mecha."""
    assert imports_sd_mecha("def f():\n    import sd_mecha\n")
    assert imports_sd_mecha("from sd_mecha.extensions import model_configs\n")
    assert imports_sd_mecha("import sd_mecha.extensions.model_formats as formats\n")
    assert not imports_sd_mecha("import sd_mecha_rebasin\nfrom sd_mecha_rebasin.files import lazy\n")
    assert not imports_sd_mecha("from .sd_mecha_compat import merge_kwargs\n")
    assert not may_import_sd_mecha(f"{PACKAGE}.cli.jobs")
    assert not may_import_sd_mecha(f"{PACKAGE}.model_configs.sd_layouts")
    assert not may_import_sd_mecha(f"{PACKAGE}.files.checkpoint")
    assert may_import_sd_mecha(f"{PACKAGE}.mecha.recipes") and may_import_sd_mecha(f"{PACKAGE}.mecha")
