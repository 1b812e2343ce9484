#!/usr/bin/env python3
"""Fails on import cycles between the modules of a Rust source tree (default: src).

A module is one file (`a/b.rs`, or `a/b/mod.rs` for the directory's own module). Module a
depends on module b when a's code, outside its `#[cfg(test)] mod tests`, names b by a path:
`super::b::...`, `crate::...::b::...` or `use super::{b, ...}`. Only edges between siblings
and from a child to its own parent module count: a parent declaring and re-exporting its
children is how a Rust module tree is built, and is no cycle. Two siblings that name each other,
directly or around a longer loop, are one: neither can be read, tested or moved without the
other.

  scripts/check-module-cycles.py [SRC]      prints the cycles found and exits 1, or says none
  scripts/check-module-cycles.py --self-test   shows it finds a cycle in a tree made to have one
"""
import os
import re
import sys
import tempfile

PATH = re.compile(r"\b(?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*)+")
USE_GROUP = re.compile(r"\buse\s+((?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*)\}\s*;")


def modules(root):
    """Module path (a tuple of names, () for the crate root) -> its file."""
    found = {}
    for directory, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".rs"):
                continue
            parts = os.path.relpath(os.path.join(directory, name), root)[:-3].split(os.sep)
            if parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            found[tuple(parts)] = os.path.join(directory, name)
    return found


def code_of(path):
    """The file's code without comments and without its unit tests."""
    text = open(path, encoding="utf-8").read()
    tests = re.search(r"#\[cfg\(test\)\]\s*mod\s+tests\b", text)
    if tests:
        text = text[: tests.start()]
    return re.sub(r"//[^\n]*", "", text)


def paths_in(code):
    """Every `crate::`/`super::` path the code names, with `use` groups spread out."""
    named = set(PATH.findall(code))
    for group in USE_GROUP.finditer(code):
        for item in group.group(2).split(","):
            item = item.strip().split("::")[0].split(" ")[0]
            if item and item not in ("self", "*"):
                named.add(f"{group.group(1)}::{item}")
    return named


def edges(mods):
    graph = {}
    for module, path in mods.items():
        for named in paths_in(code_of(path)):
            segments = named.split("::")
            base = () if segments[0] == "crate" else module[:-1]
            full = base + tuple(segments[1:])
            target = next((full[:k] for k in range(len(full), 0, -1) if full[:k] in mods), None)
            if target is None or target == module:
                continue
            if target[:-1] == module[:-1] or target == module[:-1]:
                graph.setdefault(module, set()).add(target)
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def name(module):
    return "::".join(module) or "crate"


def check(root):
    found = cycles(edges(modules(root)))
    for component in found:
        print("module cycle: " + ", ".join(name(m) for m in component))
    return found


def self_test():
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "net"))
        files = {
            "lib.rs": "mod net;\n",
            "net/mod.rs": "mod frame;\nmod message;\nmod codec;\n",
            "net/frame.rs": "use super::message::Message;\n",
            "net/message.rs": "use super::{codec, frame};\n",
            "net/codec.rs": "pub fn f() -> crate::net::frame::Frame { todo!() }\n"
                            "#[cfg(test)]\nmod tests { use super::super::message::M; }\n",
        }
        for path, text in files.items():
            with open(os.path.join(root, path), "w", encoding="utf-8") as f:
                f.write(text)
        found = cycles(edges(modules(root)))
        expected = [[("net", "codec"), ("net", "frame"), ("net", "message")]]
        if found != expected:
            sys.exit(f"self-test: expected the cycle codec -> frame -> message -> codec, found {found}")
        print("module cycles: the self-test's cycle made on purpose (codec, frame, message) is found")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        self_test()
    elif len(sys.argv) <= 2 and not any(a.startswith("-") for a in sys.argv[1:]):
        root = sys.argv[1] if len(sys.argv) == 2 else "src"
        if check(root):
            sys.exit(1)
        print(f"module cycles: none among the modules of {root}")
    else:
        sys.exit(__doc__)
