"""The layering of docs/architecture.md, checked on the source: no import cycles anywhere in ``rewardkit/``,
and no module imports a layer above its own.

Every ``import`` statement counts, also the lazy ones inside functions: a lazy import still couples the two
modules, and a cycle through one is a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rewardkit"

# Layer of each top-level module or sub-package; a module may import only its own layer or lower ones.
LAYERS = {
    "errors": 0, "protocols": 0, "fp32_precision": 0, "precision": 0,
    "registry": 1, "weights": 1, "checkpoint_io": 1, "preprocess": 1, "image_io": 1, "image_files": 1,
    "nets": 2,
    "rewards": 3, "metrics": 3, "vlm": 3,
    "compose": 4, "compose_state": 4, "compose_checks": 4, "compose_exact": 4, "training": 4, "report": 4, "eval_report": 4, "verify": 4,
    "verify_common": 4, "verify_clip": 4, "verify_imagereward": 4,
    "integrations": 5, "serve": 5,
    "compat": 6, "recipe_support": 6,
    "cli": 7, "cli_checks": 7, "cli_inputs": 7, "cli_metrics": 7, "cli_compare": 7, "cli_geneval": 7, "cli_serve": 7,
    "cli_verify": 7,
    "testing": 8,  # builders use everything; only recipe_support and the CLI's --tiny import them
}
# Lazy ``load(...)`` hooks that resolve a registry name into its factory go upward by design: the registry
# names every factory as a string, and these two are the only import statements that reach up from it.
# verify_imagereward runs upstream ImageReward through the one bridge to transformers 5 that the parity tests and the
# benchmark use (testing.imagereward_upstream), rather than a second copy of it.
ALLOWED_UPWARD = {("registry", "serve"), ("verify_imagereward", "testing")}
MAY_IMPORT_TESTING = {"testing", "recipe_support", "cli", "cli_checks", "cli_inputs", "cli_metrics", "cli_geneval", "cli_serve", "serve",
                     "verify_imagereward"}  # the upstream ImageReward bridge (above)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # "from pkg import module" imports the module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in modules else target)
    return {module for module in found if module in modules and module != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer_key(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_every_top_level_module_has_a_layer():
    keys = {_layer_key(module) for module in _graph()} - {"__init__"}
    assert keys <= set(LAYERS), f"give these a layer in tests/test_architecture.py: {sorted(keys - set(LAYERS))}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, deps in _graph().items():
        source = _layer_key(module)
        if source == "__init__":
            continue  # the public API re-exports from every layer, lazily
        for dep in deps:
            target = _layer_key(dep)
            if target in ("__init__", source) or (source, target) in ALLOWED_UPWARD or target == "testing":
                continue  # who may import the tiny builders: the next test
            if LAYERS[target] > LAYERS[source]:
                upward.append(f"{module} -> {dep}")
    assert upward == [], "imports that go up a layer: " + ", ".join(sorted(upward))


def test_only_recipe_support_and_the_cli_import_the_testing_builders():
    offenders = [module for module, deps in _graph().items()
                 if any(_layer_key(dep) == "testing" for dep in deps) and _layer_key(module) not in MAY_IMPORT_TESTING]
    assert offenders == [], f"production modules importing rewardkit.testing: {sorted(offenders)}"
