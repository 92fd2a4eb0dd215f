"""Tests reach the engine's insides only through lsbd.engine.testing, and
the block map's only through lsbd.map.testing.

Any attribute a class of lsbd/engine/ keeps private (`self._x = ...`) is
off limits to the tests: `vol._map`, `v._seal()`, `reader._files` all fail
here.  What a test needs goes into lsbd/engine/testing.py instead, so the
engine can change shape without breaking the suite.  The same holds for
the map's private state (`bm._env`, `bm._merging`), in the tests and in
the engine's seams alike: lsbd/map/testing.py holds what they need."""

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
    return FORMER | privates_in("engine")


def map_privates() -> set[str]:
    return privates_in("map")


def privates_in(package: str) -> set[str]:
    """The private methods and attributes the modules of lsbd/<package>/
    define, their seams (testing.py) aside."""
    names = set()
    for path in (ROOT / "lsbd" / package).rglob("*.py"):
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


def test_no_test_touches_the_maps_private_state():
    privates = map_privates()
    assert {"_env", "_merging", "_run_merge", "_offload"} <= privates, \
        "the scan finds the map's privates"
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        found += private_uses(path.read_text(), str(path.relative_to(ROOT)), privates)
    assert not found, "use lsbd.map.testing instead:\n" + "\n".join(found)


def test_the_engines_seams_reach_the_map_through_its_seams():
    """lsbd/engine/testing.py may use the engine's privates, not the map's
    (a name both keep private, such as `_lock`, is the engine's there)."""
    privates = map_privates() - engine_privates()
    path = ROOT / "lsbd" / "engine" / "testing.py"
    found = private_uses(path.read_text(), str(path.relative_to(ROOT)), privates)
    assert not found, "use lsbd.map.testing instead:\n" + "\n".join(found)


def test_the_check_sees_a_private_access():
    privates = engine_privates()
    bad = "def test(vol):\n    vol._sealer.seal()\n    assert vol._st.map.extent_count() == 0\n"
    assert len(private_uses(bad, "t.py", privates)) == 2


def test_the_check_sees_a_private_access_to_the_map():
    bad = "def test(bm):\n    bm._merging = 3\n    with bm._env.begin() as txn:\n        pass\n"
    assert len(private_uses(bad, "t.py", map_privates())) == 2
