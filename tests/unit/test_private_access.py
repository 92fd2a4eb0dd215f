"""Tests reach the engine's insides only through lsbd.engine.testing.

Any attribute a class of lsbd/engine/ keeps private (`self._x = ...`) is
off limits to the tests: `vol._map`, `v._seal()`, `reader._files` all fail
here.  What a test needs goes into lsbd/engine/testing.py instead, so the
engine can change shape without breaking the suite."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


#: What Volume kept private before it was split into pieces: a test written
#: against the old shape fails here rather than with an AttributeError.
FORMER = {"_map", "_files", "_open", "_lock", "_sealing", "_sealer", "_uploader", "_lease",
          "_failed", "_applied", "_size", "_seal", "_seal_and_wait", "_open_segment",
          "_sealing_changed", "_sealing_abandoned", "_stop", "_timer", "_control", "_commit",
          "_read_defrag"}


def engine_privates() -> set[str]:
    names = set(FORMER)
    for path in (ROOT / "lsbd" / "engine").rglob("*.py"):
        if path.name == "testing.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("_") \
                    and not node.name.startswith("__"):
                names.add(node.name)            # private methods
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "self" and isinstance(node.ctx, ast.Store) \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                names.add(node.attr)            # private attributes
    return names


def private_uses(source: str, filename: str, privates: set[str]) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and node.attr in privates:
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue                        # a test class's own attribute
            out.append(f"{filename}:{node.lineno}: .{node.attr}")
    return out


def test_no_test_touches_the_engines_private_state():
    privates = engine_privates()
    assert {"_st", "_sealer", "_writer", "_reader"} <= privates, "the scan finds the engine's privates"
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        found += private_uses(path.read_text(), str(path.relative_to(ROOT)), privates)
    assert not found, "use lsbd.engine.testing instead:\n" + "\n".join(found)


def test_the_check_sees_a_private_access():
    privates = engine_privates()
    bad = "def test(vol):\n    vol._sealer.seal()\n    assert vol._st.map.extent_count() == 0\n"
    assert len(private_uses(bad, "t.py", privates)) == 2
