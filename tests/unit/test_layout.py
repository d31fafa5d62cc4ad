"""The runtime's layout holds: layered imports (no cycle), vLLM only in ``integration``, small modules."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "casakv_vllm"

# Lower layers never import higher ones (``TYPE_CHECKING`` imports aside); modules of one layer
# may import each other.  The data flow reads in this order: request -> state -> plan -> launch.
ORDER = {"observe": 1, "compress": 1, "ops": 0, "policies": 2, "config": 3, "requests": 4, "plan": 5, "attention": 6,
         "metrics": 6, "integration": 7, "tools": 8}
MAX_LINES = 400


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        yield ".".join(("casakv_vllm",) + rel.parts), path


def _walk(node):
    """``ast.walk`` that skips ``if TYPE_CHECKING:`` blocks."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            continue
        yield from _walk(child)


def _imports(path):
    """Every casakv module a file imports, at any depth (function-level imports count too)."""
    out = set()
    for node in _walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _part(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_runtime_imports_are_layered():
    bad = []
    for module, path in _modules():
        part = _part(module)
        if part not in ORDER:
            continue
        for target in _imports(path):
            if not target.startswith("casakv_vllm.") or _part(target) not in ORDER:
                continue
            if ORDER[_part(target)] > ORDER[part]:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycle_between_runtime_modules():
    names = {m for m, _ in _modules()}
    graph = {m: {t for t in _imports(p) if t in names and t != m} for m, p in _modules()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_only_integration_and_tools_import_vllm():
    bad = [f"{m} -> {t}" for m, p in _modules() if _part(m) not in ("integration", "tools")
           for t in _imports(p) if t == "vllm" or t.startswith("vllm.")]
    assert not bad, "\n".join(bad)


def test_runtime_modules_stay_small():
    big = {m: n for m, p in _modules() if _part(m) != "tools" and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, big
