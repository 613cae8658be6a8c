"""Reading one recipe file into plain data: YAML 1.2 core values, duplicate keys as errors, and limits that
bound time and memory on any input (alias bombs, deep nesting, binary or huge files). Every problem is a
one-line RecipeError that names the file (and the line where there is one)."""

from __future__ import annotations

import codecs
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from optimize.errors import RecipeError

try:
    from yaml.cyaml import CParser
except ImportError:  # PyYAML built without libyaml
    CParser = None

# The limits (docs/recipes.md). A real recipe is a few KiB, a few hundred values, 6 levels deep.
MAX_BYTES = 256 * 1024  # a recipe and every file it extends, together
MAX_VALUES = 10_000  # values (scalars, lists, mappings) once aliases and merge keys are expanded, all files together
MAX_CHARS = 1024 * 1024  # characters in those values, aliases expanded, all files together
MAX_DEPTH = 64  # lists and mappings inside each other, aliases expanded
MAX_KEY_CHARS = 1024  # one mapping key (YAML's own limit for implicit keys)
MAX_FILES = 32  # files read for one recipe: itself and everything its `extends:` chain names
MAX_EXTENDS_DEPTH = 10  # a recipe extends a file that extends a file ... this deep at most

_Y = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL = _Y + "str", _Y + "int", _Y + "float", _Y + "bool", _Y + "null"
MAP, SEQ, MERGE = _Y + "map", _Y + "seq", _Y + "merge"

# What YAML allows in a stream (the same set PyYAML's reader checks, which reports no line).
_NOT_YAML = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_INT_RE = re.compile(r"([-+]?)(?:0o([0-7]+)|0x([0-9a-fA-F]+)|([0-9]+))")


@dataclass
class Budget:
    """What is left of the limits for one recipe and the files it extends (they share one budget)."""

    bytes: int = MAX_BYTES
    values: int = MAX_VALUES
    chars: int = MAX_CHARS
    files: int = MAX_FILES


class _Core12Resolver(BaseResolver):
    """YAML 1.2 core schema: only true/false are booleans (not yes/no/on/off), 1e-4 is a float, 010 is ten,
    no sexagesimals (1:30) or timestamps. `<<` stays a merge key (YAML 1.1's, widely used in configs)."""


_CORE12 = (
    (BOOL, r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    (INT, r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        FLOAT,
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
    (NULL, r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    (MERGE, r"^(?:<<)$", "<"),
)
for _tag, _pattern, _first in _CORE12:
    _Core12Resolver.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


class _Dumper(yaml.SafeDumper):
    """safe_dump that also quotes every string this reader would take for something else (`0o17`, `1e-4`):
    what it writes reads back the same here, and with YAML 1.1 readers."""


for _tag, _pattern, _first in _CORE12:
    _Dumper.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def dump(data: Any) -> str:
    """YAML text of plain data (a resolved recipe, a lock file) that read_file reads back as the same data."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


class _Composer(Composer, _Core12Resolver):
    """PyYAML's composer, composing no more nodes than the budget has values left, at most MAX_DEPTH deep: the
    limits hold before any Python value is built, and the parser is never asked for more events than that."""

    def _setup(self, display: str, most: int) -> None:
        Composer.__init__(self)
        _Core12Resolver.__init__(self)
        self.display = display
        self.most = most  # what the budget has left: more nodes than that cannot be built anyway
        self.nodes = 0
        self.depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if not isinstance(event, AliasEvent):
            self.nodes += 1
            if self.nodes > self.most:
                raise _at(self.display, event.start_mark, _too_many_values())
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _at(self.display, event.start_mark, _too_deep())
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _PyLoader(Reader, Scanner, Parser, _Composer):
    """PyYAML's pure-Python scanner and parser, where PyYAML was built without libyaml: the same limits and
    results, but files near the limits take seconds to read instead of a fraction of one."""

    def __init__(self, text: str, display: str, most: int) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        self._setup(display, most)


_Loader: Any = _PyLoader
if CParser is not None:

    class _CLoader(_Composer, CParser):  # type: ignore[misc,valid-type]
        """libyaml's scanner and parser (C) under the same composer: many times faster than pure Python on
        long scalars, many values and deep flow nesting, which keeps every load well inside its time."""

        def __init__(self, text: str, display: str, most: int) -> None:
            CParser.__init__(self, text)
            self._setup(display, most)

    _Loader = _CLoader


def read_file(path: Path, display: str, budget: Budget) -> Any:
    """The data in one YAML file (None when it holds no document), within `budget`, which it spends."""
    text = _decode(_read_bytes(path, display, budget), display)
    bad = _NOT_YAML.search(text)
    if bad:
        raise RecipeError(
            f"{display}:{_line_col(text, bad.start())}: invalid YAML: character U+{ord(bad.group()):04X} is not "
            "allowed in YAML text (a binary file?)"
        )
    loader = _Loader(text, display, budget.values)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as e:
        raise RecipeError(_yaml_error(display, e, text)) from None
    finally:
        loader.dispose()
    return None if node is None else _Builder(display, budget).build(node, 1)


def _read_bytes(path: Path, display: str, budget: Budget) -> bytes:
    """The file's bytes: a regular file (never a FIFO or device, which could block or never end), read no
    further than the byte budget allows."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise RecipeError(f"{display}: file not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{display}: is a folder, not a recipe file") from None
    except OSError as e:
        raise RecipeError(f"{display}: cannot read ({e.strerror or type(e).__name__})") from None
    except ValueError:  # a NUL in the name
        raise RecipeError(f"{display}: not a usable file name") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise RecipeError(f"{display}: is a folder, not a recipe file")
        if not stat.S_ISREG(mode):
            raise RecipeError(f"{display}: not a regular file; a recipe is a YAML file")
        chunks: list[bytes] = []
        size = 0
        while size <= budget.bytes:
            chunk = os.read(fd, min(1 << 16, budget.bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise RecipeError(f"{display}: cannot read ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)
    if size > budget.bytes:
        together = "" if budget.bytes == MAX_BYTES else " with the files it extends"
        raise RecipeError(
            f"{display}: too large{together}: a recipe and the files it extends may hold "
            f"{MAX_BYTES // 1024} KiB together"
        )
    budget.bytes -= size
    return b"".join(chunks)


def _decode(data: bytes, display: str) -> str:
    """UTF-8 text (a UTF-8 byte order mark is dropped; UTF-16 with its mark is read too, as YAML allows)."""
    encoding = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        start = e.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        name = "UTF-16" if encoding == "utf-16" else "UTF-8"
        raise RecipeError(
            f"{display}:{line}:{column}: not {name} text (byte 0x{data[start]:02x}); a recipe is a YAML text file"
        ) from None


def _yaml_error(display: str, e: yaml.YAMLError, text: str) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    context = getattr(e, "context", None) or ""
    first = getattr(e, "context_mark", None)
    if context == "expected a single document in the stream":
        problem = "a recipe is one YAML document; this file has another one (a second `---`?)"
    elif context.startswith("found duplicate anchor") and first is not None:
        problem = f"{context.split(';')[0]} (first at line {first.line + 1})"
    elif "cannot start any token" in problem and mark is not None and _char_at(text, mark) == "\t":
        problem = "a tab cannot indent YAML (or start a value); use spaces"
    elif context:
        problem = f"{problem} ({context})"
    return f"{display}{where}: invalid YAML: {clip(problem, 160)}"


def _char_at(text: str, mark: Any) -> str:
    lines = text.splitlines()
    if mark.line < len(lines) and mark.column < len(lines[mark.line]):
        return lines[mark.line][mark.column]
    return ""


class _Builder:
    """Python values from composed nodes: every alias expanded into its own copy (so the data is a tree),
    counted against the budget as it is built; only plain YAML tags."""

    def __init__(self, display: str, budget: Budget) -> None:
        self.display = display
        self.budget = budget
        self.open: set[int] = set()  # collections being built: an alias to one of them is a cycle

    def build(self, node: Node, depth: int) -> Any:
        self.budget.values -= 1
        if self.budget.values < 0:
            raise _at(self.display, node.start_mark, _too_many_values())
        if depth > MAX_DEPTH:
            raise _at(self.display, node.start_mark, _too_deep())
        if isinstance(node, ScalarNode):
            return self._scalar(node)
        if id(node) in self.open:
            raise _at(self.display, node.start_mark, "an alias (*name) used inside its own anchor (&name) never ends")
        self.open.add(id(node))
        try:
            if isinstance(node, MappingNode):
                self._check_tag(node, MAP)
                return self._mapping(node, depth)
            self._check_tag(node, SEQ)
            return [self.build(item, depth + 1) for item in node.value]
        finally:
            self.open.discard(id(node))

    def _mapping(self, node: MappingNode, depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        lines: dict[Any, int] = {}
        merged: dict[Any, Any] = {}
        merge_line: int | None = None
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if isinstance(key_node, ScalarNode) and key_node.tag == MERGE:
                if merge_line is not None:
                    raise self._duplicate(line, "<<", merge_line)
                merge_line = line
                for source in self._merge_sources(value_node):
                    for k, v in self.build(source, depth + 1).items():
                        merged.setdefault(k, v)  # the first mapping named wins
                continue
            if not isinstance(key_node, ScalarNode):
                raise _at(self.display, key_node.start_mark, "a key must be a name or a number, not a list or mapping")
            if len(key_node.value) > MAX_KEY_CHARS:
                raise _at(self.display, key_node.start_mark, f"a key longer than {MAX_KEY_CHARS} characters")
            key = self.build(key_node, depth + 1)
            if key in lines:
                raise self._duplicate(line, key, lines[key])
            lines[key] = line
            out[key] = self.build(value_node, depth + 1)
        if not merged:
            return out
        # keys written in the mapping win over merged ones (YAML's merge key)
        return {**{k: v for k, v in merged.items() if k not in out}, **out}

    def _merge_sources(self, node: Node) -> list[Node]:
        if isinstance(node, MappingNode):
            return [node]
        if isinstance(node, SequenceNode) and all(isinstance(n, MappingNode) for n in node.value):
            return list(node.value)
        raise _at(self.display, node.start_mark, "a merge key (<<) takes a mapping or a list of mappings")

    def _duplicate(self, line: int, key: Any, first: int) -> RecipeError:
        return RecipeError(f"{self.display}:{line}: duplicate key {clip(repr(key))} (first at line {first})")

    def _check_tag(self, node: Node, expected: str) -> None:
        if node.tag != expected:
            raise self._bad_tag(node)

    def _bad_tag(self, node: Node) -> RecipeError:
        tag = node.tag.replace(_Y, "!!", 1) if node.tag.startswith(_Y) else node.tag
        kind = {ScalarNode: "a single value", SequenceNode: "a list", MappingNode: "a mapping"}[type(node)]
        return _at(
            self.display,
            node.start_mark,
            f"tag {clip(tag)} is not allowed on {kind} in a recipe (plain YAML only: strings, numbers, "
            "true/false, null, lists and mappings)",
        )

    def _scalar(self, node: ScalarNode) -> Any:
        value, tag = node.value, node.tag
        self.budget.chars -= len(value)
        if self.budget.chars < 0:
            raise _at(
                self.display,
                node.start_mark,
                f"more than {MAX_CHARS} characters of values once aliases (*name) are expanded; recipes are "
                "limited to that",
            )
        if tag in (STR, MERGE):  # `<<` anywhere but a key is the text "<<"
            return value
        if tag == NULL and value in ("", "~", "null", "Null", "NULL"):
            return None
        if tag == BOOL and value in ("true", "True", "TRUE", "false", "False", "FALSE"):
            return value.lower() == "true"
        if tag == INT:
            m = _INT_RE.fullmatch(value)
            if m:
                sign, octal, hexa, decimal = m.groups()
                try:
                    n = int(octal, 8) if octal else int(hexa, 16) if hexa else int(decimal)
                except ValueError:  # more digits than Python converts
                    raise _at(self.display, node.start_mark, f"integer too long ({len(value)} digits)") from None
                return -n if sign == "-" else n
        if tag == FLOAT:
            special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
            if value.lower() in special:
                return special[value.lower()]
            try:
                return float(value)
            except ValueError:
                pass
        if tag in (NULL, BOOL, INT, FLOAT):
            short = tag.replace(_Y, "!!")
            raise _at(self.display, node.start_mark, f"{clip(repr(value))} is not a valid {short} value")
        raise self._bad_tag(node)


def _at(display: str, mark: Any, msg: str) -> RecipeError:
    return RecipeError(f"{display}:{mark.line + 1}:{mark.column + 1}: {msg}")


def _too_many_values() -> str:
    return (
        f"more than {MAX_VALUES} values once aliases (*name) and merge keys (<<) are expanded, the files it "
        "extends included; recipes are limited to that"
    )


def _too_deep() -> str:
    return (
        f"nested more than {MAX_DEPTH} levels deep (lists and mappings, aliases expanded); recipes are limited to that"
    )


def _line_col(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    return f"{line}:{pos - (text.rfind(chr(10), 0, pos) + 1) + 1}"


def printable(message: str, limit: int = 1000) -> str:
    """A message as lines that are safe to print: control characters (a NUL, a terminal escape written as
    "\\e" in YAML) shown escaped, each line cut to `limit` characters."""
    lines = ("".join(c if c.isprintable() else repr(c)[1:-1] for c in line) for line in message.split("\n"))
    return "\n".join(clip(line, limit) for line in lines)


def clip(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters (messages stay one readable line whatever the input holds)."""
    return text if len(text) <= limit else f"{text[: limit - 1]}…"
