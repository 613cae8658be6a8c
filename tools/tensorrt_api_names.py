"""List the Python API names of a TensorRT bindings wheel, without TensorRT's libraries.

The compiled module (``tensorrt_bindings/tensorrt.so``) cannot be imported where TensorRT's libraries
are missing, and pybind11 builds its ``(self: tensorrt.ICudaEngine, ...)`` signatures at import time,
so neither ``dir()`` nor the docstrings in the file say which class a method belongs to. The string
table alone cannot either: the linker merges equal strings ("FP16" is one string for DataType and
BuilderFlag) and tails ("INT8" lives inside "UINT8").

So the names are read from the machine code. Every pybind11 registration is a call whose name argument
is a string constant loaded by a RIP-relative ``lea`` just before it: ``class_<T>::def("name", ...)``,
``def_property``, ``enum_<T>::value("NAME", ...)``, ``add_class_method``, ``obj.attr("name") = ...``,
``module_::def``. We follow the argument registers, the stack slots and (for the type_record that
``class_<T>(scope, "Name")`` fills in) the 16-byte vector stores, and record which ``class_<T>`` object
each call is made on; the ``class_<T>`` constructors (``generic_type::initialize``) map C++ types to
Python names and scopes (``ILogger.Severity``). The object a call is made on wins over the callee's
symbol, because GCC's identical code folding leaves one ``class_<X>::def_property`` symbol serving
several classes. Names the wrapper ``__init__.py`` adds (``volume``, ``nptype``, ``__version__``,
``Logger.WARNING``) are read from its source.

What this cannot know: signatures, argument names' roles and types, return types, overloads (a name is
listed once), anything the libraries themselves do at run time, and names registered through code
paths it does not follow (pybind11's generic enum and ``bind_vector`` methods come out bare only).

Needs ``objdump`` (GNU binutils) on PATH and an x86-64 Linux wheel. Usage::

    python tools/tensorrt_api_names.py WHEEL -o tests/data/tensorrt/api-10.txt
    python tools/tensorrt_api_names.py --download 'tensorrt-cu12-bindings==10.16.*' -o api-10.txt
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# A call leaves only the callee-saved registers (System V x86-64) as they were.
CALLEE_SAVED = frozenset({"rbx", "rbp", "rsp", "r12", "r13", "r14", "r15"})
# pybind11 member templates whose first `char const*` parameter is the Python name, and which return *this.
NAMED_MEMBERS = frozenset(
    {
        "def",
        "def_static",
        "def_property",
        "def_property_readonly",
        "def_property_static",
        "def_property_readonly_static",
        "def_readwrite",
        "def_readonly",
        "def_readwrite_static",
        "def_readonly_static",
        "value",
    }
)
CHAINABLE_MEMBERS = NAMED_MEMBERS | {"def_buffer", "export_values"}
# pybind11 helpers that attach the name in their second argument (rsi) to the object in their first (rdi).
ATTACHING_FUNCTIONS = frozenset(
    {
        "pybind11::detail::add_class_method",
        "pybind11::detail::generic_type::def_property_static_impl",
        "pybind11::setattr",
        "pybind11::module_::add_object",
    }
)

INSTRUCTION = re.compile(r"^\s+([0-9a-f]+):\t(\S+)\s*(.*)$")
FUNCTION_HEADER = re.compile(r"^([0-9a-f]+) <(.*)>:$")
CALL_TARGET = re.compile(r"^[0-9a-f]+ <(.*)>$")
RIP_COMMENT = re.compile(r"\[rip\+0x[0-9a-f]+\]\s+# ([0-9a-f]+)")
RIP_SYMBOL = re.compile(r"# [0-9a-f]+ <((?:\S+ )?pybind11::class_<.*)>$")
SYMBOL_OFFSET = re.compile(r"\+0x[0-9a-f]+$")
MEMORY = re.compile(r"^(?:[A-Z]+ PTR )?\[(r[a-z0-9]+)([+-]0x[0-9a-f]+)?\]$")
XMM = re.compile(r"^xmm\d+$")
VECTOR_STORES = frozenset({"movups", "movdqu", "movaps", "movdqa"})
REGISTER = re.compile(r"^r(?:[a-d]x|[sd]i|[sb]p|\d+)$")


# --------------------------------------------------------------------------------------------- ELF


class Elf:
    """The allocated sections of an ELF64 little-endian file, enough to read C strings by address."""

    def __init__(self, data: bytes) -> None:
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise SystemExit("only ELF64 little-endian (x86-64 Linux) modules are supported")
        shoff = struct.unpack_from("<Q", data, 0x28)[0]
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        self.data = data
        self.sections: list[tuple[int, int, int]] = []  # (address, size, file offset)
        for index in range(shnum):
            base = shoff + index * shentsize
            sh_type, sh_flags, sh_addr, sh_offset, sh_size = struct.unpack_from("<IQQQQ", data, base + 4)
            # Strings live in data sections: skip code (SHF_EXECINSTR) and .bss (SHT_NOBITS, no bytes in the file).
            if sh_addr and sh_type != 8 and not sh_flags & 0x4:
                self.sections.append((sh_addr, sh_size, sh_offset))

    def c_string(self, address: int, limit: int = 256) -> str | None:
        """The NUL-terminated ASCII string at `address`, or None if there is none (or it is longer than `limit`)."""
        for start, size, offset in self.sections:
            if start <= address < start + size:
                position = offset + address - start
                end = self.data.find(b"\0", position, position + limit + 1)
                if end < 0:
                    return None
                try:
                    return self.data[position:end].decode("ascii")
                except UnicodeDecodeError:
                    return None
        return None


# ------------------------------------------------------------------------------- demangled symbols


_OPEN = {"<": ">", "(": ")", "{": "}", "[": "]"}
_CLOSE = {v: k for k, v in _OPEN.items()}


def _split_top(text: str, separator: str) -> list[str]:
    """Split `text` on `separator` where it is outside any <>, (), {} or [] nesting."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        char = text[i]
        if depth == 0 and text.startswith(separator, i):
            parts.append(text[start:i])
            i += len(separator)
            start = i
            continue
        if char in _OPEN:
            depth += 1
        elif char in _CLOSE and depth:
            depth -= 1
        i += 1
    parts.append(text[start:])
    return parts


def _strip_template(text: str) -> tuple[str, list[str]]:
    """`class_<A, B<C>>` -> ("class_", ["A", "B<C>"])."""
    if "<" not in text or not text.endswith(">"):
        return text, []
    head = text.index("<")
    return text[:head], [arg.strip() for arg in _split_top(text[head + 1 : -1], ",")]


@dataclass(frozen=True)
class Callee:
    """What a demangled function symbol says about itself."""

    path: tuple[str, ...]  # qualified name, template arguments stripped: ("pybind11", "class_", "def")
    owner_args: tuple[str, ...]  # template arguments of the owning class_<...>/enum_<...>, if any

    @property
    def qualified(self) -> str:
        return "::".join(self.path)

    @property
    def owner_type(self) -> str | None:
        if len(self.path) >= 3 and self.path[-3] == "pybind11" and self.path[-2] in ("class_", "enum_"):
            return self.owner_args[0] if self.owner_args else None
        return None


def parse_symbol(symbol: str) -> Callee:
    """Parse a demangled function symbol (objdump -C) into its qualified name and owner template arguments."""
    symbol = re.sub(r"( \[clone [^\]]*\])+$", "", symbol)
    symbol = re.sub(r"@plt$", "", symbol)
    signature = _split_top(symbol, "(")[0]  # drop the parameter list
    name = _split_top(signature.strip(), " ")[-1]  # drop the return type
    components = _split_top(name, "::")
    path, owner_args = [], ()
    for position, component in enumerate(components):
        bare, args = _strip_template(component)
        path.append(bare)
        if position == len(components) - 2:
            owner_args = tuple(args)
    return Callee(tuple(path), owner_args)


# --------------------------------------------------------------------------------------- analysis


@dataclass
class Registry:
    """What the registration calls declared."""

    python_name: dict[str, str] = field(default_factory=dict)  # C++ type -> Python class name
    scope_of: dict[str, str] = field(default_factory=dict)  # C++ type -> C++ type of the enclosing class
    bases: dict[str, list[str]] = field(default_factory=dict)  # C++ type -> class_<> options (bases among them)
    members: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # C++ type -> names
    enum_values: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # C++ enum -> values
    evidence: dict[tuple[str, str], str] = field(default_factory=dict)  # (C++ type, name) -> call address
    module_names: set[str] = field(default_factory=set)
    unplaced_names: set[str] = field(default_factory=set)  # registered, but on an object we could not follow


Value = tuple  # symbolic register/memory contents: ("str", text) | ("slot", base, offset) | ("load", ...) | ...


def _instructions(disassembly: Iterator[str]) -> Iterator[tuple[str | None, str, str, str]]:
    """Yield (function symbol at a new function, address, mnemonic, operands) from `objdump -d -C -M intel`."""
    for line in disassembly:
        header = FUNCTION_HEADER.match(line)
        if header:
            yield header.group(2), header.group(1), "", ""
            continue
        match = INSTRUCTION.match(line)
        if match:
            yield None, match.group(1), match.group(2), match.group(3)


def _register(operand: str) -> str | None:
    """The 64-bit general register an operand names (eax -> rax, r8d -> r8), or None."""
    operand = operand.strip()
    if operand in _SUBREGISTERS:
        return _SUBREGISTERS[operand]
    return operand if REGISTER.match(operand) else None


_SUBREGISTERS = {
    **{f"e{r}": f"r{r}" for r in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp")},
    **{r: f"r{r}" for r in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp")},
    **{f"{r}l": f"r{r}x" for r in "abcd"},
    **{f"{r}l": f"r{r}" for r in ("si", "di", "bp", "sp")},
    **{f"r{n}{suffix}": f"r{n}" for n in range(8, 16) for suffix in ("d", "w", "b")},
}


def analyse(disassembly: Iterator[str], elf: Elf) -> Registry:
    """Follow argument registers to every pybind11 registration call and record the names it registers."""
    registry = Registry()
    slot_type: dict[tuple, str] = {}  # stack slot of a class_<T> object -> T (per function)
    registers: dict[str, Value] = {}
    vectors: dict[str, tuple[Value | None, Value | None]] = {}  # xmm register -> (low, high) quadwords
    memory: dict[tuple, Value] = {}
    context: Callee | None = None
    module_function = False
    pending_scopes: list[tuple[str, Value | None]] = []  # (C++ type, scope value) for nested classes
    last_class: tuple[str, list[str]] | None = None  # class_<T, options...> whose helpers were last referenced
    member_calls: list[tuple[str, str, str | None, str, str, str]] = []  # (callee, its T, T seen at the call, ...)

    def string_at(operands: str) -> str | None:
        comment = RIP_COMMENT.search(operands)
        return elf.c_string(int(comment.group(1), 16)) if comment else None

    def read(operand: str, delta: int = 0) -> Value | None:
        operand = operand.strip()
        if REGISTER.match(operand):
            return registers.get(operand)
        slot = address_of(operand, delta)
        if slot is not None:
            key = (("frame", slot[1]), slot[2])
            return memory.get(key, ("load", *key))
        memory_match = MEMORY.match(operand)
        if memory_match:
            base, offset = memory_match.group(1), int(memory_match.group(2) or "0", 16) + delta
            return ("load", registers.get(base, ("reg", base)), offset)
        return None

    def address_of(operand: str, delta: int = 0) -> Value | None:
        """The stack slot a memory operand names: [rbp-0x40], [rsp+0x8], or [reg+0x8] with reg -> a slot."""
        memory_match = MEMORY.match(operand.strip())
        if not memory_match:
            return None
        base, offset = memory_match.group(1), int(memory_match.group(2) or "0", 16) + delta
        pointer = registers.get(base)
        if pointer is not None and pointer[0] == "slot":
            return ("slot", pointer[1], pointer[2] + offset)
        if base in ("rbp", "rsp") and pointer is None:
            return ("slot", base, offset)
        return None

    def store(operand: str, delta: int, value: Value | None) -> None:
        slot = address_of(operand)
        if slot is None:
            return
        key = (("frame", slot[1]), slot[2] + delta)
        if value is None:
            memory.pop(key, None)
        else:
            memory[key] = value

    def class_of(value: Value | None) -> str | None:
        """The C++ type of the class_ object this value points at (or holds the handle of)."""
        if value is None:
            return None
        if value[0] == "slot":
            for delta in (0, -8):  # enum_base lives 8 bytes into an enum_<T>
                found = slot_type.get((value[1], value[2] + delta))
                if found:
                    return found
        if value[0] == "load" and value[1][0] == "frame":
            return slot_type.get((value[1][1], value[2]))
        if value[0] == "load" and value[1][0] == "slot" and value[2] == 0:
            return slot_type.get((value[1][1], value[1][2]))
        return None

    def is_module(value: Value | None) -> bool:
        return module_function and value in (("arg0",), ("load", ("arg0",), 0))

    def name_argument(preferred: tuple[str, ...]) -> str | None:
        for register in preferred:
            value = registers.get(register)
            if value and value[0] == "str" and IDENTIFIER.match(value[1]):
                return value[1]
        return None

    def declare_class(cpp_type: str, options: list[str], name: str, this: Value | None, scope: Value | None) -> None:
        registry.python_name.setdefault(cpp_type, name)
        if options or cpp_type not in registry.bases:
            registry.bases[cpp_type] = options
        if this and this[0] == "slot":
            slot_type[(this[1], this[2])] = cpp_type
        pending_scopes.append((cpp_type, scope))

    def add_member(owner_type: str, name: str) -> None:
        registry.members[owner_type].add(name)
        registry.evidence.setdefault((owner_type, name), address)

    def on_call(target: str) -> Value | None:
        """Record a registration call; returns what the call leaves in rax, if we can say."""
        nonlocal last_class
        callee = parse_symbol(target)
        qualified, owner = callee.qualified, callee.owner_type
        method = callee.path[-1]
        if qualified == "pybind11::detail::generic_type::initialize":
            # An inlined class_<T>(scope, "Name") constructor: the type_record (rsi) holds scope at +0 and
            # name at +8; T shows in the class_<T>::init_instance/dealloc pointers stored into the record.
            record = registers.get("rsi")
            described = last_class or (
                (context.owner_type, list(context.owner_args[1:])) if context and context.owner_type else None
            )
            last_class = None
            if record and record[0] == "slot" and described:
                name = memory.get((("frame", record[1]), record[2] + 8))
                scope = memory.get((("frame", record[1]), record[2]))
                if name and name[0] == "str" and IDENTIFIER.match(name[1]):
                    declare_class(described[0], described[1], name[1], registers.get("rdi"), scope)
            return None
        if owner and method in ("class_", "enum_"):
            # class_<T, options...>(scope, "Name", ...); enum_<T>(scope&, "Name", ...)
            # Not inlined: the name is an argument here, or a constant inside the (constprop) clone.
            this = registers.get("rdi")
            if this and this[0] == "slot":
                slot_type[(this[1], this[2])] = owner
            name = name_argument(("rdx", "rsi", "rcx"))
            if name:
                declare_class(owner, list(callee.owner_args[1:]), name, this, registers.get("rsi"))
            else:
                pending_scopes.append((owner, registers.get("rsi")))
            return None
        if owner and method in CHAINABLE_MEMBERS:
            if method in NAMED_MEMBERS:
                name = name_argument(("rsi", "rdx", "rdi"))
                if name:
                    member_calls.append((target, owner, class_of(registers.get("rdi")), name, method, address))
            return registers.get("rdi")
        if qualified == "pybind11::module_::def":
            name = name_argument(("rsi", "rdx", "rdi"))
            if name:
                registry.module_names.add(name)
            return registers.get("rdi")
        if qualified == "pybind11::detail::accessor::operator=" and "str_attr" in target:
            # obj.attr("name") = value: the accessor (rdi) holds the object, then the name (after 0 or 8 bytes
            # of padding for its empty base, depending on the pybind11 version and ABI).
            accessor = registers.get("rdi")
            if accessor and accessor[0] == "slot":
                for offset in (8, 16):
                    name = memory.get((("frame", accessor[1]), accessor[2] + offset))
                    if name and name[0] == "str" and IDENTIFIER.match(name[1]):
                        holder = memory.get((("frame", accessor[1]), accessor[2] + offset - 8))
                        attach(name[1], holder, module_allowed=False)
                        break
            return None
        if qualified in ATTACHING_FUNCTIONS:
            name = name_argument(("rsi",))
            if name:
                attach(name, registers.get("rdi"), module_allowed=qualified == "pybind11::module_::add_object")
        return None

    def attach(name: str, holder: Value | None, module_allowed: bool) -> None:
        owner_type = class_of(holder)
        if owner_type is None and context is not None and context.owner_type:
            owner_type = context.owner_type
        if owner_type:
            add_member(owner_type, name)
        elif module_allowed or is_module(holder):
            registry.module_names.add(name)
        else:
            registry.unplaced_names.add(name)

    def resolve_scopes() -> None:
        for owner, scope in pending_scopes:
            parent = class_of(scope)
            if parent and parent != owner:
                registry.scope_of.setdefault(owner, parent)
        pending_scopes.clear()

    address = ""  # of the instruction being read; the helpers above record it as evidence
    for symbol, here, mnemonic, operands in _instructions(disassembly):
        address = here
        if symbol is not None:
            resolve_scopes()
            context = parse_symbol(symbol)
            module_function = context.path[:1] == ("tensorrt",) and (
                context.path[-1].startswith("bind") or context.path[-1].startswith("pybind11_exec")
            )
            registers = {"rdi": ("arg0",)}
            vectors = {}
            memory = {}
            slot_type = {}
            last_class = None
            continue
        destination, _, source = operands.partition(",")
        source = source.split("#")[0].strip() if mnemonic != "lea" else source
        written = _register(destination)
        if written is not None and written != destination.strip():
            registers.pop(written, None)  # a 32/16/8-bit write clears what we knew of the whole register
            destination = "-"
        if mnemonic == "lea" and REGISTER.match(destination):
            helper = RIP_SYMBOL.search(source)
            if helper and not SYMBOL_OFFSET.search(helper.group(1)):
                described = parse_symbol(helper.group(1))
                if described.owner_type:
                    last_class = (described.owner_type, list(described.owner_args[1:]))
            text = string_at(source)
            registers[destination] = ("str", text) if text is not None else (address_of(source) or ("?",))
        elif mnemonic == "mov" and REGISTER.match(destination):
            value = read(source)
            if value is not None:
                registers[destination] = value
            else:
                registers.pop(destination, None)
        elif mnemonic == "mov" and REGISTER.match(source):
            store(destination, 0, registers.get(source))
        # Compilers pack neighbouring pointer fields (type_record.name and .type) into one 16-byte store.
        elif XMM.match(destination) and mnemonic in ("movq", "movhps", "punpcklqdq", "pinsrq"):
            low, high = vectors.get(destination, (None, None))
            if mnemonic == "movq":
                vectors[destination] = (read(source), None)
            elif mnemonic == "movhps":
                vectors[destination] = (low, read(source))
            elif mnemonic == "punpcklqdq":
                vectors[destination] = (low, vectors.get(source, (None, None))[0])
            elif source.endswith(",0x1"):
                vectors[destination] = (low, read(source.split(",")[0]))
            else:
                vectors.pop(destination, None)
        elif mnemonic in VECTOR_STORES and XMM.match(destination):
            vectors[destination] = vectors.get(source) if XMM.match(source) else (read(source), read(source, 8))
        elif mnemonic in VECTOR_STORES and XMM.match(source):
            low, high = vectors.get(source, (None, None))
            store(destination, 0, low)
            store(destination, 8, high)
        elif XMM.match(destination):
            vectors.pop(destination, None)
        elif mnemonic in ("call", "jmp"):
            target = CALL_TARGET.match(operands.strip())
            if target is None or SYMBOL_OFFSET.search(target.group(1)):
                continue  # indirect call, or a jump inside a function
            result = on_call(target.group(1))
            registers = {reg: value for reg, value in registers.items() if reg in CALLEE_SAVED}
            vectors = {}
            if result is not None:
                registers["rax"] = result
        elif REGISTER.match(destination) and mnemonic not in ("cmp", "test", "push"):
            registers.pop(destination, None)
    resolve_scopes()

    # GCC's identical code folding keeps one symbol for several class_<T>::def* instantiations whose code does
    # not depend on T, so the callee's T is trusted only where no call site shows it used for another class.
    folded = {target for target, owner, seen, *_ in member_calls if seen is not None and seen != owner}
    for target, owner, seen, name, method, call_address in member_calls:
        placed = seen or (owner if target not in folded else None)
        if placed is None:
            registry.unplaced_names.add(name)
            continue
        registry.members[placed].add(name)
        if method == "value":
            registry.enum_values[placed].add(name)
        registry.evidence.setdefault((placed, name), call_address)
    return registry


# ----------------------------------------------------------------------------- the Python wrapper


_CONSTANT_EXPRESSION = (ast.Constant, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.cmpop, ast.boolop, ast.unaryop)


def _module_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Module-level statements, with the bodies of `if` blocks whose test is a constant expression inlined.

    The wrapper is generated from a template and keeps tests like ``if "tensorrt" == "tensorrt":``.
    """
    for node in body:
        if isinstance(node, ast.If):
            constant = all(isinstance(part, _CONSTANT_EXPRESSION) for part in ast.walk(node.test))
            if constant:
                taken = eval(compile(ast.Expression(node.test), "<test>", "eval"), {"__builtins__": {}})  # noqa: S307
                yield from _module_statements(node.body if taken else node.orelse)
            continue
        yield node


def python_wrapper_names(source: str, enum_values: dict[str, set[str]]) -> tuple[set[str], set[str]]:
    """Names the package's __init__.py adds: module-level defs/assignments and `Class.attr = ...` patches."""
    bare: set[str] = set()
    qualified: set[str] = set()
    for node in _module_statements(ast.parse(source).body):
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            bare.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and (target.id == "__version__" or not target.id.startswith("_")):
                    bare.add(target.id)
                elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                    qualified.add(f"{target.value.id}.{target.attr}")
        elif isinstance(node, ast.For):
            # for attr, value in ILogger.Severity.__members__.items(): setattr(Logger, attr, value)
            found = re.fullmatch(r"([\w.]+)\.__members__\.items\(\)", ast.unparse(node.iter))
            calls = [n for n in ast.walk(node) if isinstance(n, ast.Call) and ast.unparse(n.func) == "setattr"]
            if found and calls and isinstance(calls[0].args[0], ast.Name):
                for member in enum_values.get(found.group(1), ()):
                    qualified.add(f"{calls[0].args[0].id}.{member}")
    bare |= {name for line in qualified for name in line.split(".")}
    return bare, qualified


# ------------------------------------------------------------------------------------------ output


def api_names(registry: Registry) -> tuple[set[str], set[str], dict[str, set[str]]]:
    """(bare names, qualified Class.member names, enum values by class path) from the registry.

    A class lists the members of its bound bases too, as Python's attribute lookup finds them.
    """

    def dotted(cpp_type: str, seen: frozenset[str] = frozenset()) -> str:
        parent = registry.scope_of.get(cpp_type)
        own = registry.python_name[cpp_type]
        if parent and parent in registry.python_name and parent not in seen:
            return f"{dotted(parent, seen | {cpp_type})}.{own}"
        return own

    def all_members(cpp_type: str, seen: frozenset[str] = frozenset()) -> set[str]:
        names = set(registry.members.get(cpp_type, ()))
        for base in registry.bases.get(cpp_type, ()):
            if base in registry.python_name and base not in seen:
                names |= all_members(base, seen | {cpp_type})
        return names

    bare = set(registry.module_names) | set(registry.unplaced_names)
    qualified: set[str] = set()
    enum_values: dict[str, set[str]] = {}
    for cpp_type, python_name in registry.python_name.items():
        path = dotted(cpp_type)
        bare.add(python_name)
        if "." in path:
            qualified.add(path)
        for member in all_members(cpp_type):
            bare.add(member)
            qualified.add(f"{path}.{member}")
        if registry.enum_values.get(cpp_type):
            enum_values[path] = set(registry.enum_values[cpp_type])
    # Members registered on a C++ type whose class_ constructor we did not see stay bare.
    for cpp_type, names in registry.members.items():
        if cpp_type not in registry.python_name:
            bare |= names
    return bare, qualified, enum_values


def is_binding_machinery(name: str) -> bool:
    """pybind11's own attributes on every class (`_pybind11_conduit_v1_`, `__pybind11_module_local_v1...`)."""
    return name.rsplit(".", 1)[-1].lstrip("_").startswith("pybind11")


def objdump_version() -> str:
    """The first line of `objdump --version`, for the output header (the analysis reads its text)."""
    if shutil.which("objdump") is None:
        raise SystemExit("objdump (GNU binutils) is needed on PATH")
    return subprocess.run(["objdump", "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]


def extract(wheel: Path) -> tuple[str, list[str]]:
    """(TensorRT version, sorted names) for a tensorrt bindings wheel."""
    objdump_version()
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as scratch:
        modules = [n for n in archive.namelist() if re.search(r"/tensorrt[^/]*\.so$", n)]
        inits = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/__init__\.py", n)]
        if len(modules) != 1 or len(inits) != 1:
            raise SystemExit(f"{wheel}: expected one tensorrt*.so and one package __init__.py, found {modules} {inits}")
        module = Path(archive.extract(modules[0], scratch))
        init_source = archive.read(inits[0]).decode()
        elf = Elf(module.read_bytes())
        process = subprocess.Popen(
            ["objdump", "-d", "-C", "-M", "intel", "--no-show-raw-insn", str(module)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        registry = analyse(process.stdout, elf)
        if process.wait() != 0:
            raise SystemExit(f"objdump failed on {module}")
    version_match = re.search(r'^__version__ = "([^"]+)"', init_source, re.MULTILINE)
    version = version_match.group(1) if version_match else "unknown"
    bare, qualified, enum_values = api_names(registry)
    wrapper_bare, wrapper_qualified = python_wrapper_names(init_source, enum_values)
    names = bare | wrapper_bare | qualified | wrapper_qualified
    return version, sorted(name for name in names if not is_binding_machinery(name))


def download(requirement: str, directory: Path) -> Path:
    """Fetch one manylinux x86-64 wheel for `requirement` (no dependencies) with pip."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version"]
    command += ["3.12", "--platform", "manylinux_2_28_x86_64", "-d", str(directory), requirement]
    subprocess.run(command, check=True)
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"pip download {requirement}: expected one wheel, got {wheels}")
    return wheels[0]


def main(argv: list[str] | None = None) -> int:
    """Command line: write the sorted API names of a wheel to a text file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("wheel", nargs="?", type=Path, help="a tensorrt-cuXX-bindings wheel")
    source.add_argument("--download", metavar="REQUIREMENT", help="e.g. 'tensorrt-cu12-bindings==10.16.*'")
    parser.add_argument("-o", "--output", type=Path, required=True, help="text file to write")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        wheel = args.wheel or download(args.download, Path(scratch))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        version, names = extract(wheel)
    header = [
        f"# tensorrt {version} from {wheel.name}, sha256 {digest}",
        f"# Python API names read from the compiled bindings by tools/tensorrt_api_names.py ({objdump_version()}):",
        "# bare names (classes, functions, methods, properties, enum members) and Class.member lines.",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(header + names) + "\n")
    print(f"{args.output}: {len(names)} names from tensorrt {version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
