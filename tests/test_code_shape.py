"""No function in src/ runs over 50 lines (signature and docstring included): a longer one is phases that want
names. Triton kernels are exempt: one is a single compiled program, whose length is its tile loop."""

import ast
from pathlib import Path
from textwrap import indent

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 50


def _is_triton_kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(ast.unparse(d) == "triton.jit" for d in fn.decorator_list)


def long_functions(root: Path) -> dict[str, int]:
    """``path:name`` (relative to the package folder) -> lines, for every function over ``MAX_LINES``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not _is_triton_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found[f"{path.relative_to(root).as_posix()}:{node.name}"] = lines
    return found


def test_no_function_is_over_50_lines():
    over = long_functions(SRC / "fairbatching")
    assert not over, f"functions over {MAX_LINES} lines (split them into named phases): {over}"


def test_the_walk_finds_long_functions_and_skips_triton_kernels(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))  # with its def line: one over
    short = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES - 1))  # exactly at the limit
    source = (
        f"import triton\n\ndef long():\n{body}\nclass C:\n    async def method(self):\n{indent(body, '    ')}\n"
        f"@triton.jit\ndef kernel():\n{body}\ndef short():\n{short}"
    )
    (tmp_path / "m.py").write_text(source)
    assert long_functions(tmp_path) == {"m.py:long": MAX_LINES + 1, "m.py:method": MAX_LINES + 1}
