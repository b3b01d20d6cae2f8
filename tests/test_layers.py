"""The house's layering, checked: no distlib module imports another distlib module inside a
function, except on the torch-free paths and for the package's face.

import-linter (the lint session, contracts in pyproject.toml) proves there are no circles and no
import that runs back up, counting the imports inside functions; this test keeps those imports
where they have a reason to be: the paths that must not import torch (``detect()``, the strategy
values, ``distlib --help``, the launch plan and config files) load what they need on first use.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "distlib"

# Modules (paths relative to distlib/) whose lazy imports keep the torch-free paths torch-free.
# The subcommands whose planners load torch import them when the command runs, so that their
# --help stays torch-free (tests/unit/test_cli_help_options.py).
TORCH_FREE = ("env.py", "strategies/", "cli/__init__.py", "launcher/plan.py", "launcher/config.py",
              "cli/plan.py", "cli/merge_weights.py", "cli/estimate_memory.py")


def _local_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of each `import distlib...` / `from distlib... import` inside a function."""
    found: list[tuple[int, str]] = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                    node.module == "distlib" or node.module.startswith("distlib.")):
                found.append((node.lineno, node.module))
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                found.append((node.lineno, "." * node.level + (node.module or "")))
            elif isinstance(node, ast.Import):
                found += [(node.lineno, a.name) for a in node.names
                          if a.name == "distlib" or a.name.startswith("distlib.")]
    return sorted(set(found))


def test_no_distlib_import_inside_a_function_outside_the_torch_free_paths() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "__init__.py" or rel.startswith(TORCH_FREE):
            continue
        offenders += [f"distlib/{rel}:{line}: {module}"
                      for line, module in _local_imports(ast.parse(path.read_text()))]
    assert not offenders, (
        "these imports of distlib modules live inside functions; move them to the top of the "
        "module (if that makes a circle, the seam is in the wrong place: move the code):\n"
        + "\n".join(offenders))


def test_the_checker_sees_an_import_inside_a_function() -> None:
    tree = ast.parse("def f():\n    from distlib.env import Env\n    import distlib.runtime\n")
    assert _local_imports(tree) == [(2, "distlib.env"), (3, "distlib.runtime")]
