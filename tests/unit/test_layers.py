"""Imports run only downward, no modules import each other in a circle, and
each outside library enters through its one module (DOORS).

Every import of the product is read with ast, including those inside
functions and under `if TYPE_CHECKING:`.  A module may import its own layer
or a lower one; the module graph has no cycle.  There is no list of
exceptions: a new edge upward fails here.  Layers, from the bottom:"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent

LAYERS = [
    ["lsbd.errors"],
    ["lsbd.checksum", "lsbd.linux", "lsbd.names", "lsbd.sizes", "lsbd.fileio", "lsbd.directio",
     "lsbd.childproc", "lsbd.freedcap", "lsbd.numpyload", "lsbd.private",
     "lsbd.startahead"],
    ["lsbd.store", "lsbd.crypto"],
    ["lsbd.plans"],
    ["lsbd.format"],
    ["lsbd.meta"],
    ["lsbd.map"],
    ["lsbd.segments"],
    ["lsbd.engine"],
    ["lsbd.history"],
    ["lsbd.service"],                   # what the CLI and the front ends' launchers call
    ["lsbd_nbd", "lsbd_fuse"],          # front ends
    ["lsbd.cli"],
    ["lsbd"],                           # the package face
]

SOURCES = {"lsbd": ROOT / "lsbd", "lsbd_nbd": ROOT / "nbd" / "lsbd_nbd",
           "lsbd_fuse": ROOT / "fuse" / "lsbd_fuse"}


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for top, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    assert rank is not None, f"{module} is in no layer: add its folder to LAYERS"
    return rank


def imports(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The product modules `module` imports, wherever in the file."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            # `from pkg import mod` imports a module; `from mod import name` a name
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]   # `import lsbd.x.y` names lsbd.x.y's module
            if name and name != module:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    out = []
    for src, dsts in sorted(g.items()):
        for dst in sorted(dsts):
            # A package's face (its __init__) may gather its own modules.
            if dst.startswith(src + "."):
                continue
            if layer_of(dst) > layer_of(src):
                out.append(f"{src} -> {dst}")
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_import_goes_down_a_layer_or_stays():
    g = graph()
    assert len(g) > 50 and g["lsbd.engine.volume"], "the scan reads the product"
    assert not upward(g), "imports going up:\n" + "\n".join(upward(g))


def test_no_modules_import_each_other_in_a_circle():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("source, bad", [
    ("def f():\n    from lsbd.history.compactor import compact\n", "upward"),
    ("from ..history import compactor\n", "upward"),
])
def test_the_check_sees_an_import_inside_a_function_and_a_relative_one(source, bad, tmp_path):
    path = tmp_path / "volume.py"
    path.write_text(source)
    known = set(modules())
    g = {"lsbd.engine.volume": imports("lsbd.engine.volume", path, known)}
    assert upward(g) == ["lsbd.engine.volume -> lsbd.history.compactor"]


def test_the_check_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: Each outside library's one door (docs/architecture.md); numpy is imported
#: on first use where arrays pay.  pyOpenSSL's TLS also takes the OpenSSL
#: binding it is built on from `cryptography`.
DOORS = {
    "lmdb": {"lsbd.map.mapfile"},
    "boto3": {"lsbd.store.s3"}, "botocore": {"lsbd.store.s3"},
    "crc32c": {"lsbd.checksum"},
    "ctypes": {"lsbd.linux"},
    "cryptography": {"lsbd.crypto.aead", "lsbd_nbd.tls"},
    "zstandard": {"lsbd.crypto.compress"},
    "OpenSSL": {"lsbd_nbd.tls"},
    "rich": {"lsbd.cli.ui"},
}


def outside_imports(path: pathlib.Path) -> set[str]:
    """The top-level names of the absolute imports in a file, wherever in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.partition(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.partition(".")[0])
    return out


def test_each_outside_library_enters_through_its_one_module():
    found: dict[str, set[str]] = {lib: set() for lib in DOORS}
    for module, path in modules().items():
        for lib in outside_imports(path) & set(DOORS):
            found[lib].add(module)
    assert found["lmdb"], "the scan sees the map's import of lmdb"
    wrong = {lib: sorted(found[lib] - doors) for lib, doors in DOORS.items()
             if found[lib] - doors}
    assert not wrong, f"outside libraries imported away from their module: {wrong}"
