#!/usr/bin/env python3
"""Generates docs/events.md, the catalogue of every event type Gatehouse appends.

It reads the Rust sources (services/*/src and events/src), so the catalogue cannot drift from
the code:

- every enum that implements `DomainEvent` (a serde enum with `#[serde(tag = "type")]`): each
  variant is an event type, its doc comment's first paragraph the description, its fields the
  payload (name, Rust type, optional or not, doc comment);
- the stream type of the `Aggregate` whose `type Event` is that enum (`const STREAM_TYPE`);
- each type's schema version and upcaster steps, from the `.step("Type", from, upcast)` calls
  reachable from the enum's `fn upcasters()`;
- event type names read without an enum (`const X: &str = "Type"` documented as an "Event
  type"), cross-checked against the enums;
- the envelope (`RecordedEvent` in events/src/envelope.rs) for the introduction.

Usage (Python 3.11, standard library only):

    python3 tools/event_catalogue.py           # writes docs/events.md
    python3 tools/event_catalogue.py --check   # exits 1 if docs/events.md is stale, or if an
                                               # event has no doc comment or a broken upcaster
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "events.md"
SOURCE_DIRS = sorted(ROOT.glob("services/*/src")) + [ROOT / "events" / "src"]
REGENERATE = "python3 tools/event_catalogue.py"

# Field names whose sealed values are personal data (sealed with the user's key, unreadable
# once the user is erased) and secrets (sealed, never disclosed by any API).
PERSONAL_FIELDS = {"profile", "phone", "subject"}
SECRET_FIELDS = {"credential", "message", "secret", "private", "client_secret"}

# Streams that are written without an aggregate's events, by hand: stream type -> what it is.
RAW_STREAMS = {
    "riskdetector": "The risk detector's checkpoint (`riskdetector/00000000-…`): an event-less "
    "stream whose snapshot holds the detector's folded state; its version is the position of "
    "the last event folded into it. No events are appended to it "
    "(`services/risk/src/detector.rs`, `checkpoint_stream`).",
    "bench": "Synthetic events (`SignInStarted`, `PasswordVerified`, … with a made-up payload) "
    "that `gatehouse bench` appends to a scratch database to measure the store; never written "
    "by `gatehouse serve` (`services/gatehouse/src/bench.rs`).",
}
# Files allowed to build a `NewEvent` by hand (everything else appends through an enum).
RAW_APPENDS = {"services/gatehouse/src/bench.rs": "bench"}


# --------------------------------------------------------------------------------------------
# Tokens


@dataclass
class Tok:
    kind: str  # doc, attr, iattr, ident, str, num, char, lifetime, punct
    text: str
    line: int


RAW_STR = re.compile(r'(?:b|c)?r(#*)"')
PLAIN_STR = re.compile(r'(?:b|c)?"')


def read_string(src: str, i: int) -> tuple[str, int]:
    """Reads the string literal starting at `i`; returns (value, index after it)."""
    raw = RAW_STR.match(src, i)
    if raw:
        hashes = raw.group(1)
        start = raw.end()
        end = src.index('"' + hashes, start)
        return src[start:end], end + 1 + len(hashes)
    start = PLAIN_STR.match(src, i).end()
    out, j = [], start
    while src[j] != '"':
        if src[j] == "\\":
            nxt = src[j + 1]
            out.append({"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", "0": "\0"}.get(nxt, nxt))
            j += 2
        else:
            out.append(src[j])
            j += 1
    return "".join(out), j + 1


TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
    |(?P<doc>///(?!/)[^\n]*)
    |(?P<comment>//[^\n]*)
    |(?P<block>/\*)
    |(?P<attr>\#!?\[)
    |(?P<str>(?:b|c)?r(?P<hashes>\#*)"[\s\S]*?"(?P=hashes)|(?:b|c)?"(?:\\[\s\S]|[^"\\])*")
    |(?P<char>'(?:\\(?:u\{[0-9A-Fa-f]+\}|x[0-9A-Fa-f]{2}|.)|[^\\'\n])')
    |(?P<lifetime>'[A-Za-z_][A-Za-z0-9_]*)
    |(?P<ident>(?:r\#)?[A-Za-z_][A-Za-z0-9_]*)
    |(?P<num>[0-9][0-9A-Za-z_]*)
    |(?P<punct>::|->|=>|\.\.|\S)
    """,
    re.X,
)


def tokenize(src: str) -> list[Tok]:
    toks: list[Tok] = []
    i, n, line = 0, len(src), 1
    while i < n:
        m = TOKEN.match(src, i)
        kind, text = m.lastgroup, m.group(0)
        j = m.end()
        if kind == "block":  # nested block comments
            depth = 1
            while depth and j < n:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
        elif kind == "attr":
            depth, body = 1, j
            while depth:
                if RAW_STR.match(src, j) or PLAIN_STR.match(src, j):
                    _, j = read_string(src, j)
                    continue
                if src[j] == "[":
                    depth += 1
                elif src[j] == "]":
                    depth -= 1
                j += 1
            inner = " ".join(src[body : j - 1].split())
            toks.append(Tok("iattr" if text == "#![" else "attr", inner, line))
        elif kind == "doc":
            text = text[3:]
            toks.append(Tok("doc", (text[1:] if text.startswith(" ") else text).rstrip(), line))
        elif kind == "str":
            toks.append(Tok("str", read_string(src, i)[0], line))
        elif kind == "ident":
            toks.append(Tok("ident", text[2:] if text.startswith("r#") else text, line))
        elif kind not in ("ws", "comment"):
            toks.append(Tok(kind, text, line))
        line += src.count("\n", i, j)
        i = j
    return toks


def is_p(tok: Tok | None, text: str) -> bool:
    return tok is not None and tok.kind == "punct" and tok.text == text


def is_id(tok: Tok | None, text: str | None = None) -> bool:
    return tok is not None and tok.kind == "ident" and (text is None or tok.text == text)


OPEN = {"(": ")", "[": "]", "{": "}"}


def matching(toks: list[Tok], i: int) -> int:
    """Index of the bracket closing the one at `i`."""
    depth = 0
    for j in range(i, len(toks)):
        t = toks[j]
        if t.kind != "punct":
            continue
        if t.text in OPEN:
            depth += 1
        elif t.text in (")", "]", "}"):
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced bracket at line {toks[i].line}")


def skip_angles(toks: list[Tok], i: int) -> int:
    """Skips a `<...>` generic list starting at `i` (if any)."""
    if not is_p(toks[i] if i < len(toks) else None, "<"):
        return i
    depth = 0
    while i < len(toks):
        t = toks[i]
        if is_p(t, "<"):
            depth += 1
        elif is_p(t, ">"):
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def split_top(toks: list[Tok], sep: str = ",") -> list[list[Tok]]:
    """Splits tokens on `sep` outside brackets and angle brackets."""
    parts: list[list[Tok]] = [[]]
    depth = 0
    for t in toks:
        if t.kind == "punct":
            if t.text in OPEN or t.text == "<":
                depth += 1
            elif t.text in (")", "]", "}", ">"):
                depth -= 1
            elif t.text == sep and depth == 0:
                parts.append([])
                continue
        parts[-1].append(t)
    return [p for p in parts if p]


def render_type(toks: list[Tok]) -> str:
    """A Rust type as written, with module paths dropped (`gatehouse_core::crypto::Sealed` -> `Sealed`)."""
    kept: list[Tok] = []
    i = 0
    while i < len(toks):
        t = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if t.kind == "ident" and is_p(nxt, "::"):
            i += 2
            continue
        if is_p(t, "::") and not kept:
            i += 1
            continue
        kept.append(t)
        i += 1
    out = ""
    prev: Tok | None = None
    for t in kept:
        word = t.kind in ("ident", "num", "lifetime")
        if prev is not None and word and prev.kind in ("ident", "num", "lifetime"):
            out += " "
        out += t.text
        if is_p(t, ","):
            out += " "
        prev = t
    return out


# --------------------------------------------------------------------------------------------
# Items


@dataclass
class Field:
    name: str
    rust_type: str
    type_toks: list[Tok]
    doc: list[str]
    optional: str  # "", "yes", "nullable"
    flatten: bool
    line: int


@dataclass
class Variant:
    name: str  # the event type (after serde renames)
    rust_name: str
    doc: list[str]
    shape: str  # unit, struct, tuple
    fields: list[Field]
    tuple_types: list[list[Tok]]
    line: int


@dataclass
class TypeDef:
    kind: str  # struct, enum, type
    name: str
    doc: list[str]
    attrs: list[str]
    file: "SourceFile"
    line: int
    body: list[Tok]  # tokens inside `{}` / `()` (empty for unit structs)


@dataclass
class Impl:
    trait: str
    target: str
    body: list[Tok]
    file: "SourceFile"


@dataclass
class SourceFile:
    path: Path
    rel: str
    crate: str
    toks: list[Tok] = field(default_factory=list)
    types: dict[str, TypeDef] = field(default_factory=dict)
    values: dict[str, tuple[str, list[Tok], list[str], int]] = field(default_factory=dict)  # fn/static/const: kind, tokens, doc, line
    impls: list[Impl] = field(default_factory=list)
    uses: dict[str, list[str]] = field(default_factory=dict)
    raw_new_events: list[int] = field(default_factory=list)
    stream_literals: list[tuple[str, int]] = field(default_factory=list)
    test_ranges: list[tuple[int, int]] = field(default_factory=list)


def serde_attrs(attrs: list[str]) -> list[str]:
    return [a for a in attrs if a.startswith("serde")]


def serde_has(attrs: list[str], word: str) -> bool:
    """A bare word in a `#[serde(...)]` attribute (string literals left out)."""
    return any(re.search(rf"\b{word}\b", re.sub(r'"[^"]*"', '""', a)) for a in serde_attrs(attrs))


def serde_value(attrs: list[str], key: str) -> str | None:
    for a in serde_attrs(attrs):
        m = re.search(rf'\b{key}\s*=\s*"([^"]*)"', a)
        if m:
            return m.group(1)
    return None


def first_paragraph(doc: list[str]) -> str:
    lines: list[str] = []
    for line in doc:
        if not line.strip():
            if lines:
                break
            continue
        lines.append(line.strip())
    return " ".join(lines)


def words(name: str) -> list[str]:
    return re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+", name) or [name]


def rename_variant(name: str, rule: str | None) -> str:
    if not rule:
        return name
    parts = words(name)
    return {
        "lowercase": name.lower(),
        "UPPERCASE": name.upper(),
        "PascalCase": name,
        "camelCase": name[:1].lower() + name[1:],
        "snake_case": "_".join(p.lower() for p in parts),
        "SCREAMING_SNAKE_CASE": "_".join(p.upper() for p in parts),
        "kebab-case": "-".join(p.lower() for p in parts),
        "SCREAMING-KEBAB-CASE": "-".join(p.upper() for p in parts),
    }.get(rule, name)


def rename_field(name: str, rule: str | None) -> str:
    if not rule:
        return name
    parts = name.split("_")
    return {
        "lowercase": name.lower(),
        "UPPERCASE": name.upper(),
        "PascalCase": "".join(p.capitalize() for p in parts),
        "camelCase": parts[0] + "".join(p.capitalize() for p in parts[1:]),
        "snake_case": name,
        "SCREAMING_SNAKE_CASE": name.upper(),
        "kebab-case": name.replace("_", "-"),
        "SCREAMING-KEBAB-CASE": name.upper().replace("_", "-"),
    }.get(rule, name)


def leading(toks: list[Tok], i: int) -> tuple[list[str], list[str], int]:
    """Collects doc comments and attributes from `i`; returns (doc, attrs, next index)."""
    doc: list[str] = []
    attrs: list[str] = []
    while i < len(toks) and toks[i].kind in ("doc", "attr", "iattr"):
        if toks[i].kind == "doc":
            doc.append(toks[i].text)
        elif toks[i].kind == "attr":
            attrs.append(toks[i].text)
        i += 1
    return doc, attrs, i


def parse_fields(body: list[Tok], rule: str | None) -> list[Field]:
    fields: list[Field] = []
    for part in split_top(body):
        doc, attrs, i = leading(part, 0)
        if serde_has(attrs, "skip") or serde_has(attrs, "skip_deserializing"):
            continue
        if is_id(part[i] if i < len(part) else None, "pub"):
            i += 1
            if is_p(part[i], "("):
                i = matching(part, i) + 1
        name_tok = part[i]
        type_toks = part[i + 2 :]
        rust_type = render_type(type_toks)
        if serde_has(attrs, "default") or serde_has(attrs, "skip_serializing_if"):
            optional = "yes"
        elif rust_type.startswith("Option<"):
            optional = "nullable"
        else:
            optional = ""
        fields.append(
            Field(
                name=serde_value(attrs, "rename") or rename_field(name_tok.text, rule),
                rust_type=rust_type,
                type_toks=type_toks,
                doc=doc,
                optional=optional,
                flatten=serde_has(attrs, "flatten"),
                line=name_tok.line,
            )
        )
    return fields


def parse_variants(enum: TypeDef) -> list[Variant]:
    rule = serde_value(enum.attrs, "rename_all")
    field_rule = serde_value(enum.attrs, "rename_all_fields")
    variants: list[Variant] = []
    for part in split_top(enum.body):
        doc, attrs, i = leading(part, 0)
        if serde_has(attrs, "skip"):
            continue
        name_tok = part[i]
        rest = part[i + 1 :]
        name = serde_value(attrs, "rename") or rename_variant(name_tok.text, rule)
        if rest and is_p(rest[0], "{"):
            inner = rest[1 : matching(rest, 0)]
            fields = parse_fields(inner, serde_value(attrs, "rename_all") or field_rule)
            variants.append(Variant(name, name_tok.text, doc, "struct", fields, [], name_tok.line))
        elif rest and is_p(rest[0], "("):
            inner = rest[1 : matching(rest, 0)]
            types = [t[leading(t, 0)[2] :] for t in split_top(inner)]
            variants.append(Variant(name, name_tok.text, doc, "tuple", [], types, name_tok.line))
        else:
            variants.append(Variant(name, name_tok.text, doc, "unit", [], [], name_tok.line))
    return variants


def item_end(toks: list[Tok], i: int, end: int, block: bool) -> int:
    """Index after an item starting at `i`: up to `;` at depth 0, or (for `block` items) the
    first `{...}` at depth 0."""
    depth = 0
    j = i
    while j < end:
        t = toks[j]
        if t.kind == "punct":
            if t.text == "{" and depth == 0 and block:
                return matching(toks, j) + 1
            if t.text in OPEN:
                depth += 1
            elif t.text in (")", "]", "}"):
                depth -= 1
            elif t.text == ";" and depth == 0:
                return j + 1
        j += 1
    return end


def parse_use(toks: list[Tok], i: int, prefix: list[str]) -> tuple[list[tuple[str, list[str]]], int]:
    segs = list(prefix)
    while i < len(toks):
        t = toks[i]
        if is_p(t, "::"):
            i += 1
        elif is_p(t, "{"):
            close = matching(toks, i)
            out: list[tuple[str, list[str]]] = []
            for part in split_top(toks[i + 1 : close]):
                entries, _ = parse_use(part, 0, segs)
                out += entries
            return out, close + 1
        elif is_p(t, "*"):
            return [], i + 1
        elif t.kind == "ident":
            segs.append(t.text)
            i += 1
            if is_id(toks[i] if i < len(toks) else None, "as"):
                return [(toks[i + 1].text, segs)], i + 2
            if not is_p(toks[i] if i < len(toks) else None, "::"):
                if segs[-1] == "self":
                    segs = segs[:-1]
                return [(segs[-1], segs)], i
        else:
            break
    return [], i


def parse_items(f: SourceFile, start: int, end: int) -> None:
    toks = f.toks
    i = start
    while i < end:
        doc, attrs, i = leading(toks, i)
        if i >= end:
            break
        if is_p(toks[i], "}") or is_p(toks[i], ";"):
            i += 1
            continue
        if any(re.fullmatch(r"cfg\s*\(\s*test\s*\)", a) for a in attrs):
            after = item_end(toks, i, end, block=True)
            f.test_ranges.append((i, after))
            i = after
            continue
        j = i
        if is_id(toks[j], "pub"):
            j += 1
            if is_p(toks[j], "("):
                j = matching(toks, j) + 1
        while is_id(toks[j]) and toks[j].text in ("unsafe", "async", "extern", "default") or toks[j].kind == "str":
            j += 1
        kw = toks[j].text if toks[j].kind == "ident" else ""
        if kw in ("struct", "enum", "union"):
            name = toks[j + 1]
            k = skip_angles(toks, j + 2)
            while k < end and not (is_p(toks[k], "{") or is_p(toks[k], "(") or is_p(toks[k], ";")):
                k += 1
            if is_p(toks[k], ";"):
                body, after = [], k + 1
            else:
                close = matching(toks, k)
                body = toks[k + 1 : close]
                after = close + 1
                if is_p(toks[k], "("):
                    after = item_end(toks, after, end, block=False) if not is_p(toks[after - 1], ";") else after
            kind = "enum" if kw == "enum" else "struct"
            f.types[name.text] = TypeDef(kind, name.text, doc, attrs, f, name.line, body)
            i = after
        elif kw == "type":
            name = toks[j + 1]
            after = item_end(toks, j, end, block=False)
            eq = next((x for x in range(j, after) if is_p(toks[x], "=")), after - 1)
            f.types[name.text] = TypeDef("type", name.text, doc, attrs, f, name.line, toks[eq + 1 : after - 1])
            i = after
        elif kw == "mod":
            k = j + 2
            if is_p(toks[k], "{"):
                close = matching(toks, k)
                parse_items(f, k + 1, close)
                i = close + 1
            else:
                i = k + 1
        elif kw == "use":
            after = item_end(toks, j, end, block=False)
            for alias, path in parse_use(toks[j + 1 : after - 1], 0, [])[0]:
                f.uses[alias] = path
            i = after
        elif kw == "impl":
            k = skip_angles(toks, j + 1)
            header_end = item_end(toks, k, end, block=True)
            brace = next(x for x in range(k, header_end) if is_p(toks[x], "{"))
            header = toks[k:brace]
            trait = target = ""
            fors = [x for x, t in enumerate(header) if is_id(t, "for")]
            if fors:
                trait_toks, target_toks = header[: fors[0]], header[fors[0] + 1 :]
                trait = next((t.text for t in reversed(trait_toks) if t.kind == "ident"), "")
                # `a::b::Name<T>`: the ident before the generics.
                for x, t in enumerate(target_toks):
                    if t.kind == "ident" and not is_p(target_toks[x + 1] if x + 1 < len(target_toks) else None, "::"):
                        target = t.text
                        break
            f.impls.append(Impl(trait, target, toks[brace + 1 : header_end - 1], f))
            i = header_end
        elif kw in ("fn", "static", "const", "trait", "macro_rules"):
            name_at = j + 1
            if kw == "static" and is_id(toks[name_at], "mut"):
                name_at += 1
            if kw == "macro_rules":
                name_at += 1  # the `!`
            name = toks[name_at]
            after = item_end(toks, j, end, block=kw in ("fn", "trait", "macro_rules"))
            f.values[name.text] = (kw, toks[j:after], doc, name.line)
            i = after
        else:
            i = item_end(toks, j, end, block=True)


CRATE_DIRS: dict[str, Path] = {}


def load_sources() -> list[SourceFile]:
    for cargo in sorted(ROOT.glob("services/*/Cargo.toml")) + [ROOT / "events" / "Cargo.toml"]:
        m = re.search(r'^name\s*=\s*"([^"]+)"', cargo.read_text(encoding="utf-8"), re.M)
        if m:
            CRATE_DIRS[m.group(1).replace("-", "_")] = cargo.parent / "src"
    files: list[SourceFile] = []
    for src_dir in SOURCE_DIRS:
        crate = next((c for c, d in CRATE_DIRS.items() if d == src_dir), src_dir.parent.name)
        for path in sorted(src_dir.rglob("*.rs")):
            f = SourceFile(path, path.relative_to(ROOT).as_posix(), crate)
            f.toks = tokenize(path.read_text(encoding="utf-8"))
            parse_items(f, 0, len(f.toks))
            for idx, t in enumerate(f.toks):
                if any(a <= idx < b for a, b in f.test_ranges):
                    continue
                nxt = f.toks[idx + 1] if idx + 1 < len(f.toks) else None
                prev = f.toks[idx - 1] if idx else None
                if is_id(t, "NewEvent") and is_p(nxt, "{") and not is_p(prev, "->") and not (is_id(prev) and prev.text in ("struct", "impl", "for")):
                    f.raw_new_events.append(t.line)
                if is_id(t, "StreamId") and idx + 4 < len(f.toks) and is_id(f.toks[idx + 2], "new"):
                    arg = f.toks[idx + 4]
                    if arg.kind == "str":
                        f.stream_literals.append((arg.text, arg.line))
            files.append(f)
    return files


# --------------------------------------------------------------------------------------------
# The model


@dataclass
class Step:
    event_type: str
    from_version: int
    upcast: str  # fn name, or "closure"
    where: str  # file of the upcast fn (or of the step, for closures)


@dataclass
class EventEnum:
    typedef: TypeDef
    variants: list[Variant]
    aggregate: TypeDef | None
    stream_type: str
    steps: list[Step]


@dataclass
class NamedType:
    const: str
    event_type: str
    payload: str | None
    file: SourceFile


class Catalogue:
    def __init__(self) -> None:
        self.files = load_sources()
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.types_used: dict[tuple[str, str], TypeDef] = {}
        self.enums = self.find_enums()
        self.named = self.find_named_types()
        self.check_raw()

    # lookups

    def values_named(self, name: str, crate: str) -> list[tuple[SourceFile, tuple]]:
        same = [(f, f.values[name]) for f in self.files if name in f.values and f.crate == crate]
        return same or [(f, f.values[name]) for f in self.files if name in f.values]

    def resolve_path(self, segs: list[str], here: SourceFile) -> TypeDef | None:
        """The definition a path names (`crate::x::Name`, `gatehouse_core::crypto::Sealed`, `Name`)."""
        name = segs[-1]
        if len(segs) == 1:
            if name in here.types:
                return here.types[name]
            if name in here.uses and here.uses[name] != segs:
                return self.resolve_path(here.uses[name], here)
            candidates = [f.types[name] for f in self.files if name in f.types and f.crate == here.crate]
            candidates = candidates or [f.types[name] for f in self.files if name in f.types]
            return candidates[0] if len(candidates) == 1 else None
        first, mods = segs[0], segs[1:-1]
        if first in ("crate", "self", "super"):
            crate = here.crate
        elif first in CRATE_DIRS:
            crate = first
        elif first in here.uses:
            return self.resolve_path(here.uses[first] + segs[1:], here)
        else:
            return None
        src = CRATE_DIRS.get(crate)
        if src is None:
            return None
        if first in ("self", "super"):
            mods = []
        by_path = {f.path: f for f in self.files}
        if mods:
            for candidate in (src.joinpath(*mods).with_suffix(".rs"), src.joinpath(*mods, "mod.rs")):
                f = by_path.get(candidate)
                if f and name in f.types:
                    return f.types[name]
        lib = by_path.get(src / "lib.rs")
        if lib is not None:
            if name in lib.types:
                return lib.types[name]
            if name in lib.uses:
                path = lib.uses[name]
                if path[0] not in ("crate", "self", "super") and path[0] not in CRATE_DIRS:
                    path = ["crate", *path]  # `pub use module::Name` in lib.rs
                if path != segs:
                    return self.resolve_path(path, lib)
        candidates = [f.types[name] for f in self.files if name in f.types and f.crate == crate]
        return candidates[0] if len(candidates) == 1 else None

    def note_types(self, toks: list[Tok], here: SourceFile) -> None:
        """Remembers the workspace types a field type mentions, for the "Types used" section."""
        i = 0
        while i < len(toks):
            if toks[i].kind != "ident":
                i += 1
                continue
            segs = [toks[i].text]
            while i + 2 < len(toks) and is_p(toks[i + 1], "::") and toks[i + 2].kind == "ident":
                segs.append(toks[i + 2].text)
                i += 2
            i += 1
            if segs[-1][:1].isupper():
                found = self.resolve_path(segs, here)
                if found is not None:
                    self.types_used[(found.name, found.file.rel)] = found

    # events

    def find_enums(self) -> list[EventEnum]:
        domain = {(impl.target, impl.file.crate): impl for f in self.files for impl in f.impls if impl.trait == "DomainEvent"}
        aggregates: dict[str, tuple[TypeDef | None, str, SourceFile]] = {}
        for f in self.files:
            for impl in f.impls:
                if impl.trait != "Aggregate":
                    continue
                stream = event = ""
                b = impl.body
                for x, t in enumerate(b):
                    if is_id(t, "const") and is_id(b[x + 1], "STREAM_TYPE"):
                        lit = next((u for u in b[x:] if u.kind == "str" or is_p(u, ";")), None)
                        stream = lit.text if lit and lit.kind == "str" else ""
                    if is_id(t, "type") and is_id(b[x + 1], "Event") and is_p(b[x + 2], "="):
                        path = []
                        for u in b[x + 3 :]:
                            if is_p(u, ";"):
                                break
                            if u.kind == "ident":
                                path.append(u.text)
                        event = path[-1] if path else ""
                if not stream:
                    self.errors.append(f"{f.rel}: `impl Aggregate for {impl.target}` has no string `STREAM_TYPE`")
                aggregates[event] = (self.resolve_path([impl.target], f), stream, f)
        enums: list[EventEnum] = []
        for f in self.files:
            for typedef in f.types.values():
                if typedef.kind != "enum":
                    continue
                tagged = serde_value(typedef.attrs, "tag") == "type"
                impl = domain.get((typedef.name, f.crate))
                if impl is None:
                    continue
                if not tagged:
                    self.errors.append(f"{f.rel}:{typedef.line}: `{typedef.name}` implements DomainEvent without `#[serde(tag = \"type\")]`")
                    continue
                variants = parse_variants(typedef)
                aggregate, stream, _ = aggregates.get(typedef.name, (None, "", f))
                if not stream:
                    self.warnings.append(f"{f.rel}:{typedef.line}: no Aggregate has `type Event = {typedef.name}`")
                    stream = "(no aggregate)"
                for v in variants:
                    if not first_paragraph(v.doc):
                        self.errors.append(f"{f.rel}:{v.line}: event `{v.name}` ({typedef.name}) has no doc comment")
                    for fl in v.fields:
                        if not first_paragraph(fl.doc):
                            self.warnings.append(f"{f.rel}:{fl.line}: field `{fl.name}` of event `{v.name}` has no doc comment")
                        self.note_types(fl.type_toks, f)
                        if fl.name in PERSONAL_FIELDS | SECRET_FIELDS and "Sealed" not in fl.rust_type:
                            self.warnings.append(f"{f.rel}:{fl.line}: field `{fl.name}` of `{v.name}` is named like sealed data but is `{fl.rust_type}`")
                    if v.shape == "tuple":
                        if len(v.tuple_types) != 1:
                            self.errors.append(f"{f.rel}:{v.line}: `{v.name}` has {len(v.tuple_types)} unnamed fields: an internally tagged event needs one struct or named fields")
                        for types in v.tuple_types:
                            self.note_types(types, f)
                steps = self.find_steps(impl, typedef, variants)
                enums.append(EventEnum(typedef, variants, aggregate, stream, steps))
        seen: dict[tuple[str, str], str] = {}
        for e in enums:
            for v in e.variants:
                key = (e.stream_type, v.name)
                if key in seen:
                    self.errors.append(f"event type `{v.name}` appears twice in stream `{e.stream_type}` ({seen[key]} and {e.typedef.name})")
                seen[key] = e.typedef.name
        enums.sort(key=lambda e: (e.stream_type, e.typedef.file.rel, e.typedef.line))
        return enums

    def find_steps(self, impl: Impl, enum: TypeDef, variants: list[Variant]) -> list[Step]:
        body = impl.body
        start = next((x for x, t in enumerate(body) if is_id(t, "fn") and is_id(body[x + 1], "upcasters")), None)
        if start is None:
            return []
        fn_toks = body[start : item_end(body, start, len(body), block=True)]
        steps: list[Step] = []
        visited: set[str] = set()

        def scan(toks: list[Tok], where: SourceFile, depth: int) -> None:
            for x, t in enumerate(toks):
                if is_p(t, ".") and is_id(toks[x + 1] if x + 1 < len(toks) else None, "step") and is_p(toks[x + 2] if x + 2 < len(toks) else None, "("):
                    close = matching(toks, x + 2)
                    args = split_top(toks[x + 3 : close])
                    if len(args) != 3:
                        self.errors.append(f"{where.rel}:{t.line}: an upcaster `.step(...)` needs (type, from version, upcast)")
                        continue
                    type_tok, version_toks, upcast = args
                    event_type = self.string_value(type_tok, where)
                    m = re.fullmatch(r"([0-9_]+)(?:u32)?", render_type(version_toks))
                    if m:
                        version = int(m.group(1).replace("_", ""))
                    else:
                        self.errors.append(f"{where.rel}:{t.line}: upcaster from-version `{render_type(version_toks)}` is not a literal")
                        continue
                    if is_p(upcast[0], "|") or is_id(upcast[0], "move"):
                        steps.append(Step(event_type or "?", version, "closure", where.rel))
                    else:
                        name = upcast[-1].text
                        defined = self.values_named(name, where.crate)
                        steps.append(Step(event_type or "?", version, name, defined[0][0].rel if defined else where.rel))
                    if event_type is None:
                        self.errors.append(f"{where.rel}:{t.line}: upcaster event type `{render_type(type_tok)}` is not a string")
                elif t.kind == "ident" and depth < 4 and t.text not in visited:
                    for f, (kind, vtoks, _, _) in self.values_named(t.text, where.crate):
                        if kind in ("fn", "static", "const") and any(is_id(u, "step") for u in vtoks):
                            visited.add(t.text)
                            scan(vtoks, f, depth + 1)
                            break

        scan(fn_toks, impl.file, 0)
        names = {v.name for v in variants}
        for s in steps:
            if s.event_type not in names:
                self.errors.append(f"{enum.file.rel}: an upcaster of `{enum.name}` names `{s.event_type}`, which is not one of its events")
        for event_type in sorted({s.event_type for s in steps}):
            froms = sorted(s.from_version for s in steps if s.event_type == event_type)
            if froms != list(range(1, len(froms) + 1)):
                self.errors.append(f"{enum.file.rel}: the upcasters of `{event_type}` go from versions {froms}: they must be 1, 2, … with no gap or repeat")
        return steps

    def string_value(self, toks: list[Tok], where: SourceFile) -> str | None:
        if len(toks) == 1 and toks[0].kind == "str":
            return toks[0].text
        name = toks[-1].text if toks and toks[-1].kind == "ident" else None
        for _, (kind, vtoks, _, _) in self.values_named(name, where.crate) if name else []:
            if kind == "const":
                lit = [u for u in vtoks if u.kind == "str"]
                if len(lit) == 1:
                    return lit[0].text
        return None

    def find_named_types(self) -> list[NamedType]:
        """`const X: &str = "Type"` documented as an event type (read by name, not through an enum)."""
        named: list[NamedType] = []
        for f in self.files:
            for const, (kind, vtoks, doc, _) in f.values.items():
                text = " ".join(doc)
                if kind != "const" or not text.startswith("Event type"):
                    continue
                lit = [u for u in vtoks if u.kind == "str"]
                if len(lit) != 1:
                    continue
                m = re.search(r"payload:\s*\[`(\w+)`\]", text)
                named.append(NamedType(const, lit[0].text, m.group(1) if m else None, f))
        for n in named:
            matches = [(e, v) for e in self.enums for v in e.variants if v.name == n.event_type]
            payload = n.file.types.get(n.payload) if n.payload else None
            if not matches:
                if payload is None:
                    self.errors.append(f"{n.file.rel}: `{n.const}` names event type `{n.event_type}`, which no event enum has, and no payload struct")
                continue
            if payload is None:
                continue
            read = {fl.name for fl in parse_fields(payload.body, serde_value(payload.attrs, "rename_all")) if not fl.optional}
            for e, v in matches:
                have = {fl.name for fl in self.payload_fields(v, e.typedef.file)[0]}
                missing = read - have
                if missing:
                    self.errors.append(f"{n.file.rel}: `{n.const}` reads `{n.event_type}` as `{n.payload}`, but the `{e.stream_type}` event has no {', '.join(sorted(missing))}")
        return named

    def named_extra(self) -> list[NamedType]:
        known = {v.name for e in self.enums for v in e.variants}
        return [n for n in self.named if n.event_type not in known]

    def check_raw(self) -> None:
        for f in self.files:
            if f.rel.startswith("events/"):
                continue
            for line in f.raw_new_events:
                if f.rel not in RAW_APPENDS:
                    self.errors.append(f"{f.rel}:{line}: builds a `NewEvent` by hand: append through an event enum, or document the stream in RAW_STREAMS / RAW_APPENDS of tools/event_catalogue.py")
        streams = {e.stream_type for e in self.enums}
        for f in self.files:
            for literal, line in f.stream_literals:
                if literal not in streams and literal not in RAW_STREAMS:
                    self.warnings.append(f"{f.rel}:{line}: stream type `{literal}` has no aggregate and no entry in RAW_STREAMS")

    def payload_fields(self, v: Variant, here: SourceFile) -> tuple[list[Field], str | None]:
        """The payload's fields: the variant's own, or those of the one struct a tuple variant holds."""
        if v.shape != "tuple" or len(v.tuple_types) != 1:
            return v.fields, None
        toks = v.tuple_types[0]
        segs = [t.text for t in toks if t.kind == "ident"]
        found = self.resolve_path(segs, here) if segs else None
        if found is None or found.kind != "struct":
            return [], render_type(toks)
        return parse_fields(found.body, serde_value(found.attrs, "rename_all")), found.name


# --------------------------------------------------------------------------------------------
# Markdown


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def link(rel: str) -> str:
    return f"[`{rel}`](../{rel})"


def anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", text.lower()).replace(" ", "-")


def upcast_name(step: Step) -> str:
    return "(a closure)" if step.upcast == "closure" else f"`{step.upcast}`"


def lower_first(text: str) -> str:
    """`An app` -> `an app`, leaving `TOTP …` alone."""
    return text[:1].lower() + text[1:] if re.match(r"[A-Z][a-z']*\b(?![-_])", text) else text


def sealed_note(fl: Field) -> str:
    if "Sealed" not in fl.rust_type:
        return ""
    if fl.name in PERSONAL_FIELDS:
        return " **Personal data**, sealed with the user's key."
    if fl.name in SECRET_FIELDS:
        return " **Secret**, sealed; never disclosed."
    return " Sealed."


def render(cat: Catalogue) -> str:
    out: list[str] = []
    w = out.append
    total = sum(len(e.variants) for e in cat.enums)
    streams: dict[str, list[EventEnum]] = {}
    for e in cat.enums:
        streams.setdefault(e.stream_type, []).append(e)

    w("# Event catalogue")
    w("")
    w(f"<!-- Generated by tools/event_catalogue.py from the Rust sources; do not edit by hand. "
      f"Regenerate with `{REGENERATE}`. ./test.sh fails when this file is stale. -->")
    w("")
    w(f"Every event type Gatehouse appends: {total} event types in {len(streams)} stream types. "
      "Each is a variant of a serde enum tagged by `type` (the tag is the stored event type, the "
      "other fields are the JSON payload) belonging to one aggregate, whose `STREAM_TYPE` is the "
      "stream type. The log is the product's record of what happened (SPEC §8): events are facts, "
      "never rewritten or deleted.")
    w("")

    # The envelope.
    envelope = next((f.types["RecordedEvent"] for f in cat.files if f.rel == "events/src/envelope.rs" and "RecordedEvent" in f.types), None)
    w("## The envelope")
    w("")
    w("What every stored event carries besides its payload (SPEC §8; `RecordedEvent` in "
      f"{link('events/src/envelope.rs')}). The store assigns the id, position, stream version "
      "and recorded time; the events of one append share the correlation id, causation id, actor "
      "and client context.")
    w("")
    if envelope is not None:
        w("| field | type | description |")
        w("|---|---|---|")
        env_file = envelope.file
        for fl in parse_fields(envelope.body, None):
            desc = first_paragraph(fl.doc)
            inner = re.sub(r"^Option<(.*)>$", r"\1", fl.rust_type)
            t = env_file.types.get(inner)
            if t is not None and t.kind == "struct":
                parts = [f"`{s.name}` ({lower_first(first_paragraph(s.doc)).rstrip('.')})" for s in parse_fields(t.body, None)]
                desc += f" A `{inner}`: " + ", ".join(parts) + "."
            elif t is not None and t.kind == "enum":
                desc += " " + re.sub(r"^Who caused an event\. ", "", first_paragraph(t.doc))
            w(f"| `{fl.name}` | `{cell(fl.rust_type)}` | {cell(desc)} |")
        w("")
    w("Platform events (the `platform` stream) belong to the nil tenant "
      "`00000000-0000-0000-0000-000000000000`.")
    w("")

    # Payloads.
    w("## Payloads")
    w("")
    w("A payload is a JSON object holding the event's fields as listed below (the `type` tag is "
      "not repeated in it). In the tables:")
    w("")
    w("- **type** is the Rust type with module paths dropped. `Uuid` is a string (hyphenated), "
      "`DateTime<Utc>` an RFC 3339 string, `Sealed` a base64url string (nonce, ciphertext and "
      "tag), `Option<T>` a `T` or `null`, `Vec<T>` an array; the workspace's own types are under "
      f"[Types used](#types-used).")
    w("- **optional** *yes*: the field may be missing (`#[serde(default)]`, or left out when empty "
      "by `skip_serializing_if`), so events written before it existed still read; *nullable*: "
      "always written, may be `null`.")
    w("- A payload of a single struct (a tuple variant) has that struct's fields.")
    w("")
    w("### Personal data and secrets")
    w("")
    w("No secret or personal data is ever in a payload in clear. Fields named "
      + ", ".join(f"`{n}`" for n in sorted(PERSONAL_FIELDS))
      + " hold **personal data**, sealed (XChaCha20-Poly1305) with the user's own data key: "
      "erasing the user destroys that key (crypto-shredding), the log stays whole and replayable, "
      "and the sealed fields become unreadable. Fields named "
      + ", ".join(f"`{n}`" for n in sorted(SECRET_FIELDS))
      + " hold **secrets** (password hashes, messages with their codes, TOTP secrets, private "
      "keys), sealed as well and never disclosed by any API. Codes, API keys, client secrets and "
      "refresh tokens appear only as digests or hashes; where equality on personal data is needed "
      "(an email's unique claim, a linked identity) a blind index (HMAC) stands in for it.")
    w("")

    # Versions and upcasters.
    w("## Schema versions and upcasters")
    w("")
    w("Every stored event carries the schema version its payload was written at. An event enum's "
      "schema history is its `Upcasters` (`fn upcasters()` of its `DomainEvent` impl, "
      f"{link('events/src/aggregate.rs')}): `.step(\"Type\", n, upcast)` turns a payload of "
      "version *n* into version *n + 1*. A type's current version is one more than its last step "
      "(1 without any), so the version written and the chain read cannot disagree. Reading an older "
      "event runs its steps in order before decoding; old events are never rewritten. To change a "
      "payload incompatibly, add a step for the old version and keep the field docs current; "
      "adding an optional field (`#[serde(default)]`) needs no step.")
    w("")
    all_steps = [(e, s) for e in cat.enums for s in e.steps]
    if not all_steps:
        w("No upcaster is registered today: every event type is at schema version 1.")
    else:
        w("| stream | event type | step | upcast | defined in |")
        w("|---|---|---|---|---|")
        for e, s in all_steps:
            w(f"| `{e.stream_type}` | `{s.event_type}` | {s.from_version} → {s.from_version + 1} | {upcast_name(s)} | {link(s.where)} |")
    w("")

    # Index.
    w("## Streams")
    w("")
    w("| stream type | aggregate | events | event enum |")
    w("|---|---|---|---|")
    for stream, es in streams.items():
        for e in es:
            agg = e.aggregate.name if e.aggregate else "—"
            w(f"| [`{stream}`](#{anchor(stream + ' stream')}) | `{agg}` | {len(e.variants)} | `{e.typedef.name}` in {link(e.typedef.file.rel)} |")
    w("")

    # Streams.
    readers = {}
    for n in cat.named:
        readers.setdefault(n.event_type, []).append(n)
    for stream, es in streams.items():
        w(f"## `{stream}` stream")
        w("")
        for e in es:
            agg = e.aggregate
            about = lower_first(first_paragraph(e.typedef.doc)) or "events."
            agg_text = f"Folded by the aggregate `{agg.name}` ({lower_first(first_paragraph(agg.doc)).rstrip('.')})." if agg else "No aggregate folds them."
            w(f"`{e.typedef.name}` in {link(e.typedef.file.rel)}: {about} {agg_text}")
            w("")
            for v in e.variants:
                w(f"### {v.name}")
                w("")
                w(first_paragraph(v.doc) or "*(no doc comment)*")
                w("")
                steps = sorted((s for s in e.steps if s.event_type == v.name), key=lambda s: s.from_version)
                version = 1 + max((s.from_version for s in steps), default=0)
                if steps:
                    chain = ", ".join(f"{s.from_version} → {s.from_version + 1} {upcast_name(s)}" for s in steps)
                    w(f"Schema version {version}; upcasters: {chain}.")
                else:
                    w(f"Schema version {version}, no upcasters.")
                for n in readers.get(v.name, []):
                    payload = f" as `{n.payload}`" if n.payload else ""
                    w(f"Also read by type name (`{n.const}`{payload}) in {link(n.file.rel)}.")
                w("")
                fields, struct = cat.payload_fields(v, e.typedef.file)
                if struct:
                    w(f"The payload is a `{struct}`:")
                    w("")
                if not fields:
                    w("No payload fields." if not struct else "")
                    w("")
                    continue
                w("| field | type | optional | description |")
                w("|---|---|---|---|")
                for fl in fields:
                    desc = (first_paragraph(fl.doc) or "—") + sealed_note(fl)
                    if fl.flatten:
                        desc += f" Flattened: the fields of `{fl.rust_type}` sit in the payload itself."
                    w(f"| `{fl.name}` | `{cell(fl.rust_type)}` | {fl.optional} | {cell(desc)} |")
                w("")

    extra = cat.named_extra()
    w("## Not catalogued above")
    w("")
    for n in extra:
        payload = f", payload `{n.payload}`" if n.payload else ""
        w(f"- `{n.event_type}` (`{n.const}` in {link(n.file.rel)}{payload}): read by type name; no event enum declares it.")
    for stream, text in RAW_STREAMS.items():
        w(f"- `{stream}`: {text}")
    w("")

    # Types used.
    w("## Types used")
    w("")
    w("The workspace's own types in the payloads above, with their definitions.")
    w("")
    w("| type | defined in | description |")
    w("|---|---|---|")
    for (name, rel), t in sorted(cat.types_used.items()):
        desc = first_paragraph(t.doc)
        if t.kind == "enum":
            variants = parse_variants(t)
            if variants and all(v.shape == "unit" for v in variants) and not serde_value(t.attrs, "tag"):
                desc += " One of " + ", ".join(f"`{v.name}`" for v in variants) + "."
        w(f"| `{name}` | {link(rel)} | {cell(desc)} |")
    w("")
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/events.md is stale or an event is undocumented")
    args = parser.parse_args()

    cat = Catalogue()
    text = render(cat)
    for warning in cat.warnings:
        print(f"event catalogue: warning: {warning}", file=sys.stderr)
    for error in cat.errors:
        print(f"event catalogue: error: {error}", file=sys.stderr)
    rel = OUTPUT.relative_to(ROOT).as_posix()
    count = sum(len(e.variants) for e in cat.enums)

    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        stale = current != text
        if stale:
            print(f"event catalogue: {rel} is stale: run `{REGENERATE}` and commit it.", file=sys.stderr)
            diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(), f"{rel} (committed)", f"{rel} (from the sources)", lineterm="", n=1))
            for line in diff[:40]:
                print(f"    {line}", file=sys.stderr)
            if len(diff) > 40:
                print(f"    … {len(diff) - 40} more diff lines", file=sys.stderr)
        if stale or cat.errors:
            return 1
        print(f"event catalogue: {rel} is current ({count} event types)")
        return 0

    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8", newline="\n")
    print(f"event catalogue: wrote {rel} ({count} event types)")
    return 1 if cat.errors else 0


if __name__ == "__main__":
    sys.exit(main())
