"""Screening of untrusted Lean text (statements, headers, tactics) before Lean sees it.

Anything that can run code or change the checker while Lean *elaborates* is rejected:
`#eval`/`#exit`/other `#` commands, `run_cmd`/`run_tac`/`run_elab`/`run_meta`/`by_elab`,
`elab`/`macro`/`syntax`/`notation`/... definitions, `initialize`, `unsafe`,
`@[extern]`/`@[implemented_by]` (every attribute is rejected), `import` outside the header,
`set_option` outside an allow-list, `axiom`/`opaque`/`def`/... declarations, strings,
quoted names and guillemet identifiers, and invisible or look-alike-prone Unicode.

Design invariants:
- One lexer (`_lex`) decides what is a comment. Comments are replaced by spaces (newlines
  kept, so positions are unchanged) and the *blanked* text is what callers send to Lean
  (`CheckedStatement.text`, `CheckedTactic.text`, `CheckedHeader.text`): whatever this module
  treated as a comment can never reach Lean as code, even if our comment rules and Lean's
  differed.
- Token boundaries are computed with a character class that is a *subset* of Lean's
  identifier characters (`isIdFirst`/`isIdRest` of every Lean 4 release), and dots split
  names, so every place Lean starts a keyword is a place this module starts a word.
  The most dangerous keywords are also searched as raw substrings.
- Rejections raise `UntrustedInputError` whose message names what was found.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

__all__ = [
    "UntrustedInputError",
    "CheckedStatement",
    "CheckedHeader",
    "CheckedTactic",
    "SetOptionRule",
    "DEFAULT_ALLOWED_IMPORT_ROOTS",
    "DEFAULT_SET_OPTIONS",
    "check_statement",
    "check_header",
    "check_tactic",
    "split_statement",
    "parse_header",
]

MAX_STATEMENT_CHARS = 20_000
MAX_HEADER_CHARS = 10_000
MAX_TACTIC_CHARS = 10_000

DEFAULT_ALLOWED_IMPORT_ROOTS: tuple[str, ...] = ("Mathlib", "Aesop", "Std", "Batteries")


class UntrustedInputError(ValueError):
    """The text was rejected; the message names what was found and where."""


@dataclass(frozen=True)
class SetOptionRule:
    """An allowed option: `kind` is "nat" (bounded by `max_value`, inclusive), "bool" or "any"."""

    kind: str
    max_value: int | None = None


# Options that only bound resources, printing or linting. `0` (= unlimited) is allowed for
# heartbeat limits because the REPL client enforces a wall-clock limit on every request.
DEFAULT_SET_OPTIONS: Mapping[str, SetOptionRule] = {
    "maxHeartbeats": SetOptionRule("nat", 10_000_000),
    "synthInstance.maxHeartbeats": SetOptionRule("nat", 10_000_000),
    "synthInstance.maxSize": SetOptionRule("nat", 100_000),
    "maxRecDepth": SetOptionRule("nat", 100_000),
    "autoImplicit": SetOptionRule("bool"),
    "relaxedAutoImplicit": SetOptionRule("bool"),
    "pp.*": SetOptionRule("any"),
    "linter.*": SetOptionRule("bool"),
}

# Words that start commands or run code; rejected wherever they appear as a token.
_FORBIDDEN_WORDS: dict[str, str] = {
    **{w: "a code-running command" for w in ("run_cmd", "run_elab", "run_meta", "run_tac", "by_elab")},
    **{
        w: "a syntax/elaborator extension"
        for w in (
            "elab", "elab_rules", "macro", "macro_rules", "syntax", "declare_syntax_cat",
            "notation", "notation3", "infix", "infixl", "infixr", "prefix", "postfix",
            "simproc", "dsimproc", "simproc_decl", "builtin_simproc", "binder_predicate",
            "declare_simp_like_tactic", "register_simp_attr", "register_option",
            "register_label_attr", "add_aesop_rules", "declare_aesop_rule_sets",
            "initialize_simps_projections", "grind_pattern",
        )
    },
    **{w: "an initialization hook" for w in ("initialize", "builtin_initialize")},
    **{w: "an unsafe or foreign-code marker" for w in ("unsafe", "extern", "implemented_by", "export", "partial")},
    **{
        w: "a declaration other than the theorem"
        for w in (
            "def", "abbrev", "instance", "structure", "class", "inductive", "coinductive",
            "axiom", "opaque", "mutual", "deriving", "where", "irreducible_def", "alias",
            "add_decl_doc", "compile_inductive", "library_note", "assert_not_exists",
            "suppress_compilation", "unsuppress_compilation", "seal", "unseal", "omit", "include",
            "local", "attribute",
        )
    },
    "import": "an `import` outside the header",
    "admit": "`admit` (an unfinished proof)",
}

# Substrings rejected even inside longer words (defence in depth against lexer disagreements).
_FORBIDDEN_SUBSTRINGS: tuple[str, ...] = (
    "run_cmd", "run_tac", "run_elab", "run_meta", "by_elab", "implemented_by",
    "macro_rules", "elab_rules", "declare_syntax_cat", "initialize",
)

# Name components that only matter to code that is evaluated.
_FORBIDDEN_NAME_ROOTS = ("IO", "EIO", "BaseIO", "System")
_FORBIDDEN_NAME_PREFIXES = ("Lean.Elab", "Lean.Meta", "Lean.Compiler", "Lean.Parser", "Lean.Environment")

_DECL_KEYWORDS = ("theorem", "lemma", "example")
_DECL_MODIFIERS = ("private", "protected", "noncomputable", "nonrec")
_PREAMBLE_KEYWORDS = ("open", "namespace", "section", "end", "variable", "universe", "set_option", "noncomputable")

_HASH_COMMAND = re.compile(r"#[A-Za-z_][A-Za-z_0-9!?]{2,}")

# Unicode categories that are invisible, ambiguous or unassigned.
_BAD_CATEGORIES = {
    "Cc": "a control character",
    "Cf": "an invisible formatting character (bidi override, zero-width, BOM ...)",
    "Co": "a private-use character",
    "Cs": "a surrogate code point",
    "Cn": "an unassigned code point",
    "Zl": "a Unicode line separator",
    "Zp": "a Unicode paragraph separator",
    "Zs": "an unusual space character",
}


# --- Lean's identifier characters (the subset common to all Lean 4 releases) -------------


def _is_letter_like(o: int) -> bool:
    return (
        (0x3B1 <= o <= 0x3C9 and o != 0x3BB)
        or (0x391 <= o <= 0x3A9 and o not in (0x3A0, 0x3A3))
        or (0x3CA <= o <= 0x3FB)
        or (0x1F00 <= o <= 0x1FFE)
        or (0x2100 <= o <= 0x214F)
        or (0x1D49C <= o <= 0x1D59F)
    )


def _is_subscript_alnum(o: int) -> bool:
    return 0x2080 <= o <= 0x2089 or 0x2090 <= o <= 0x209C or 0x1D62 <= o <= 0x1D6A


def _is_id_first(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or c == "_" or _is_letter_like(ord(c))


def _is_id_rest(c: str) -> bool:
    return _is_id_first(c) or ("0" <= c <= "9") or c in "'!?" or _is_subscript_alnum(ord(c))


# --- lexing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    kind: str  # "word" | "hash" | "num" | "sym"
    text: str
    start: int
    end: int


def _line_col(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1)
    return f"line {line}, column {col}"


def _check_characters(text: str, what: str) -> str:
    """Normalises CRLF and rejects characters that can hide or disguise code."""
    if "\x00" in text:
        raise UntrustedInputError(f"{what} contains a NUL character")
    text = text.replace("\r\n", "\n")
    for i, c in enumerate(text):
        if c in "\n\t" or c == " ":
            continue
        cat = unicodedata.category(c)
        if cat in _BAD_CATEGORIES:
            raise UntrustedInputError(
                f"{what} contains {_BAD_CATEGORIES[cat]} U+{ord(c):04X} at {_line_col(text, i)}"
            )
    return text


def _blank_comments(text: str, what: str) -> str:
    """Replaces `--` line comments and nested `/- -/` block comments by spaces.

    Rejects what this module does not lex: string literals, quoted names, guillemets.
    """
    out = list(text)
    n = len(text)
    i = 0
    while i < n:
        c = text[i]
        if c == "-" and text.startswith("--", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        elif c == "/" and text.startswith("/-", i):
            depth = 0
            j = i
            while j < n:
                if text.startswith("/-", j):
                    depth += 1
                    j += 2
                elif text.startswith("-/", j):
                    depth -= 1
                    j += 2
                    if depth == 0:
                        break
                else:
                    j += 1
            if depth != 0:
                raise UntrustedInputError(f"{what} has an unterminated block comment starting at {_line_col(text, i)}")
            for k in range(i, j):
                if out[k] != "\n":
                    out[k] = " "
            i = j
        elif c == '"':
            raise UntrustedInputError(f"{what} contains a string literal at {_line_col(text, i)}")
        elif c in "«»":
            raise UntrustedInputError(f"{what} contains a guillemet-quoted identifier at {_line_col(text, i)}")
        elif c == "`":
            raise UntrustedInputError(f"{what} contains a quoted name or syntax quotation (`) at {_line_col(text, i)}")
        else:
            i += 1
    return "".join(out)


def _tokenize(code: str) -> list[_Token]:
    tokens: list[_Token] = []
    n = len(code)
    i = 0
    while i < n:
        c = code[i]
        if c.isspace():
            i += 1
        elif "0" <= c <= "9":
            j = i
            while j < n and "0" <= code[j] <= "9":
                j += 1
            tokens.append(_Token("num", code[i:j], i, j))
            i = j
        elif _is_id_first(c):
            j = i + 1
            while j < n and _is_id_rest(code[j]):
                j += 1
            tokens.append(_Token("word", code[i:j], i, j))
            i = j
        elif c == "#" and i + 1 < n and _is_id_first(code[i + 1]):
            j = i + 2
            while j < n and _is_id_rest(code[j]):
                j += 1
            tokens.append(_Token("hash", code[i:j], i, j))
            i = j
        elif code.startswith(":=", i) or code.startswith("@[", i):
            tokens.append(_Token("sym", code[i : i + 2], i, i + 2))
            i += 2
        else:
            tokens.append(_Token("sym", c, i, i + 1))
            i += 1
    return tokens


def _dotted_at(tokens: Sequence[_Token], i: int) -> tuple[str, int]:
    """The dotted identifier starting at word token `i` (`Lean.Elab.foo`) and the index after it."""
    parts = [tokens[i].text]
    j = i
    while (
        j + 2 < len(tokens)
        and tokens[j + 1].text == "."
        and tokens[j + 1].start == tokens[j].end
        and tokens[j + 2].kind == "word"
        and tokens[j + 2].start == tokens[j + 1].end
    ):
        parts.append(tokens[j + 2].text)
        j += 2
    return ".".join(parts), j + 1


def _dotted_names(tokens: Sequence[_Token]) -> Iterable[tuple[str, int]]:
    """Every maximal dotted identifier with its start offset."""
    i = 0
    while i < len(tokens):
        if tokens[i].kind != "word":
            i += 1
            continue
        name, j = _dotted_at(tokens, i)
        yield name, tokens[i].start
        i = j


def _scan_forbidden(code: str, tokens: Sequence[_Token], what: str, *, allow: frozenset[str] = frozenset()) -> None:
    for sub in _FORBIDDEN_SUBSTRINGS:
        k = code.find(sub)
        if k >= 0:
            raise UntrustedInputError(f"{what} contains `{sub}` at {_line_col(code, k)}")
    m = _HASH_COMMAND.search(code)
    if m:
        raise UntrustedInputError(f"{what} contains the command `{m.group(0)}` at {_line_col(code, m.start())}")
    for t in tokens:
        if t.kind == "word" and t.text in _FORBIDDEN_WORDS and t.text not in allow:
            raise UntrustedInputError(
                f"{what} contains `{t.text}` ({_FORBIDDEN_WORDS[t.text]}) at {_line_col(code, t.start)}"
            )
        if t.kind == "sym" and t.text == "@[":
            raise UntrustedInputError(f"{what} contains an attribute `@[...]` at {_line_col(code, t.start)}")
    for name, pos in _dotted_names(tokens):
        root = name.split(".", 1)[0]
        if root in _FORBIDDEN_NAME_ROOTS or any(
            name == p or name.startswith(p + ".") for p in _FORBIDDEN_NAME_PREFIXES
        ):
            raise UntrustedInputError(f"{what} refers to `{name}` (runtime/meta-programming API) at {_line_col(code, pos)}")
        if "unsafe" in name.lower():
            raise UntrustedInputError(f"{what} refers to `{name}` (unsafe API) at {_line_col(code, pos)}")


def _option_allowed(name: str, rules: Mapping[str, SetOptionRule]) -> SetOptionRule | None:
    if name in rules:
        return rules[name]
    for pattern, rule in rules.items():
        if pattern.endswith(".*") and name.startswith(pattern[:-1]):
            return rule
    return None


def _parse_set_option(
    tokens: Sequence[_Token], i: int, code: str, what: str, rules: Mapping[str, SetOptionRule]
) -> tuple[int, bool]:
    """Checks `set_option NAME VALUE [in]` starting at token `i`; returns (next index, has `in`)."""
    pos = tokens[i].start
    j = i + 1
    name_parts: list[str] = []
    while j < len(tokens) and tokens[j].kind == "word":
        name_parts.append(tokens[j].text)
        if j + 1 < len(tokens) and tokens[j + 1].text == "." and tokens[j + 1].start == tokens[j].end:
            j += 2
        else:
            j += 1
            break
    if not name_parts:
        raise UntrustedInputError(f"{what}: `set_option` without an option name at {_line_col(code, pos)}")
    name = ".".join(name_parts)
    rule = _option_allowed(name, rules)
    if rule is None:
        raise UntrustedInputError(f"{what} sets option `{name}`, which is not on the allow-list, at {_line_col(code, pos)}")
    if j >= len(tokens):
        raise UntrustedInputError(f"{what}: `set_option {name}` has no value at {_line_col(code, pos)}")
    value = tokens[j]
    if rule.kind == "nat":
        if value.kind != "num":
            raise UntrustedInputError(f"{what}: `set_option {name}` needs a natural number, got `{value.text}`")
        if rule.max_value is not None and int(value.text) > rule.max_value:
            raise UntrustedInputError(
                f"{what}: `set_option {name} {value.text}` exceeds the allowed maximum {rule.max_value}"
            )
    elif rule.kind == "bool":
        if value.text not in ("true", "false"):
            raise UntrustedInputError(f"{what}: `set_option {name}` needs true/false, got `{value.text}`")
    elif value.kind not in ("num", "word"):
        raise UntrustedInputError(f"{what}: `set_option {name}` has an unsupported value `{value.text}`")
    j += 1
    if j < len(tokens) and tokens[j].text == "in":
        return j + 1, True
    return j, False


_OPEN_ARG_WORDS = frozenset({"scoped", "hiding", "renaming"})


def _parse_open(tokens: Sequence[_Token], i: int, stop: frozenset[str]) -> tuple[int, bool]:
    """`open A B.C (x y) hiding z renaming a → b [in]`: returns (next index, has `in`)."""
    j = i + 1
    while j < len(tokens):
        t = tokens[j]
        if t.text == "in":
            return j + 1, True
        if t.kind == "word" and t.text in stop:
            break
        if t.kind == "word" or t.text in (".", "(", ")", "→", "->") or t.text in _OPEN_ARG_WORDS:
            j += 1
            continue
        break
    return j, False


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedStatement:
    """An accepted statement.

    `text` is what to send to Lean: comments blanked, trailing proof placeholder (`:=`,
    `:= by`, `:= by sorry`, `:= sorry`) removed. `preamble` is its `open`/`namespace`/...
    part and `declaration` the `theorem ...` part (both slices of `text`). `name` is the
    declared name (None for `example`); `keyword_start` is the offset of the declaration
    keyword in `text`.
    """

    text: str
    preamble: str
    declaration: str
    kind: str
    name: str | None
    keyword_start: int


@dataclass(frozen=True)
class CheckedHeader:
    """An accepted header: `imports` (module names, in source order) and `body` (the rest)."""

    text: str
    imports: tuple[str, ...]
    body: str


@dataclass(frozen=True)
class CheckedTactic:
    """An accepted tactic; `text` has comments blanked and is what to send to Lean."""

    text: str


@dataclass(frozen=True)
class _Split:
    code: str
    tokens: list[_Token] = field(repr=False)
    decl_index: int
    modifiers_start: int


def _strip_placeholder(code: str, tokens: list[_Token]) -> tuple[str, list[_Token]]:
    texts = [t.text for t in tokens[-3:]]
    for tail in ([":=", "by", "sorry"], [":=", "by"], [":=", "sorry"], [":="]):
        if len(texts) >= len(tail) and texts[-len(tail):] == tail:
            cut = tokens[-len(tail)].start
            return code[:cut].rstrip(), tokens[: -len(tail)]
    return code.rstrip(), tokens


def _split(text: str, what: str) -> _Split:
    code = _blank_comments(text, what)
    tokens = _tokenize(code)
    code, tokens = _strip_placeholder(code, tokens)
    decl = [i for i, t in enumerate(tokens) if t.kind == "word" and t.text in _DECL_KEYWORDS]
    if not decl:
        raise UntrustedInputError(f"{what} has no `theorem`, `lemma` or `example` declaration")
    if len(decl) > 1:
        extra = tokens[decl[1]]
        raise UntrustedInputError(
            f"{what} has more than one declaration (another `{extra.text}` at {_line_col(code, extra.start)})"
        )
    d = decl[0]
    m = d
    while m > 0 and tokens[m - 1].kind == "word" and tokens[m - 1].text in _DECL_MODIFIERS:
        m -= 1
    # `noncomputable section` belongs to the preamble, `noncomputable theorem` to the declaration.
    return _Split(code, tokens, d, m)


def split_statement(text: str) -> CheckedStatement:
    """Splits a *trusted* statement (benchmark files) into preamble and declaration.

    No security screening beyond the lexer; use `check_statement` for untrusted input.
    """
    s = _split(text.replace("\r\n", "\n"), "statement")
    return _make_checked(s)


def _make_checked(s: _Split) -> CheckedStatement:
    tokens, code = s.tokens, s.code
    kw = tokens[s.decl_index]
    name = None
    if kw.text != "example" and s.decl_index + 1 < len(tokens) and tokens[s.decl_index + 1].kind == "word":
        name, _ = _dotted_at(tokens, s.decl_index + 1)
    mod_start = tokens[s.modifiers_start].start
    return CheckedStatement(
        text=code,
        preamble=code[:mod_start].strip(),
        declaration=code[mod_start:],
        kind=kw.text,
        name=name,
        keyword_start=kw.start,
    )


def _check_text(text: object, what: str, max_chars: int) -> str:
    """The checks every untrusted text passes first: a non-empty string within `max_chars`
    characters, with no disallowed characters (`_check_characters`)."""
    if not isinstance(text, str):
        raise UntrustedInputError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise UntrustedInputError(f"{what} is empty")
    if len(text) > max_chars:
        raise UntrustedInputError(f"{what} has {len(text)} characters; the limit is {max_chars}")
    return _check_characters(text, what)


def check_statement(
    text: str,
    *,
    set_options: Mapping[str, SetOptionRule] = DEFAULT_SET_OPTIONS,
    max_chars: int = MAX_STATEMENT_CHARS,
) -> CheckedStatement:
    """Accepts exactly one `theorem`/`lemma`/`example` with an optional preamble.

    The preamble may hold `open`, `namespace`, `section`, `end`, `variable`, `universe`,
    `noncomputable section` and allow-listed `set_option` commands. Raises
    `UntrustedInputError` naming the first problem found.
    """
    what = "statement"
    text = _check_text(text, what, max_chars)
    s = _split(text, what)
    code, tokens = s.code, s.tokens
    _scan_forbidden(code, tokens, what)
    for t in tokens:
        if t.kind == "word" and t.text == "sorry":
            raise UntrustedInputError(
                f"{what} contains `sorry` outside the trailing `:= by sorry` placeholder at {_line_col(code, t.start)}"
            )
    _check_preamble(tokens[: s.modifiers_start], code, what, set_options)
    _check_declaration_body(tokens[s.decl_index + 1 :], code, what, set_options)
    _check_no_proof_body(tokens[s.decl_index + 1 :], code, what)
    return _make_checked(s)


_OPENERS = {"(": ")", "[": "]", "{": "}", "⟨": "⟩", "⦃": "⦄"}
_LOCAL_BINDERS = frozenset({"let", "have", "set", "show", "fun", "λ"})


def _check_no_proof_body(tokens: Sequence[_Token], code: str, what: str) -> None:
    """A depth-0 `:=` in the declaration (not after `let`/`have`/...) starts a proof body."""
    depth = 0
    seen_binder = False
    for t in tokens:
        if t.text in _OPENERS:
            depth += 1
        elif t.text in _OPENERS.values():
            depth = max(0, depth - 1)
        elif depth == 0 and t.kind == "word" and t.text in _LOCAL_BINDERS:
            seen_binder = True
        elif depth == 0 and t.text == ":=" and not seen_binder:
            raise UntrustedInputError(
                f"{what} carries a proof body after `:=` at {_line_col(code, t.start)}; "
                "submit the statement only (it may end with `:= by sorry`)"
            )


def _check_preamble(tokens: Sequence[_Token], code: str, what: str, rules: Mapping[str, SetOptionRule]) -> None:
    stop = frozenset(_PREAMBLE_KEYWORDS)
    i = 0
    while i < len(tokens):
        t = tokens[i]
        where = _line_col(code, t.start)
        if t.kind != "word" or t.text not in _PREAMBLE_KEYWORDS:
            raise UntrustedInputError(f"{what} has unexpected `{t.text}` before the declaration at {where}")
        if t.text == "open":
            j, _ = _parse_open(tokens, i, stop)
            if j == i + 1:
                raise UntrustedInputError(f"{what}: `open` without a namespace at {where}")
            i = j
        elif t.text == "set_option":
            i, _ = _parse_set_option(tokens, i, code, what, rules)
        elif t.text in ("namespace", "section", "end", "universe"):
            j = i + 1
            while j < len(tokens) and (tokens[j].kind == "word" and tokens[j].text not in stop or tokens[j].text == "."):
                j += 1
            if t.text == "namespace" and j == i + 1:
                raise UntrustedInputError(f"{what}: `namespace` without a name at {where}")
            i = j
        elif t.text == "noncomputable":
            if i + 1 >= len(tokens) or tokens[i + 1].text != "section":
                raise UntrustedInputError(f"{what}: `noncomputable` must be followed by `section` at {where}")
            i += 1
        else:  # variable: binders are terms, screened by the forbidden-token scan
            j = i + 1
            while j < len(tokens) and not (tokens[j].kind == "word" and tokens[j].text in stop):
                j += 1
            i = j


def _check_declaration_body(
    tokens: Sequence[_Token], code: str, what: str, rules: Mapping[str, SetOptionRule]
) -> None:
    """Inside the declaration only the term-level `open ... in` / `set_option ... in` forms are allowed."""
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t.kind == "word" and t.text in _PREAMBLE_KEYWORDS and t.text != "noncomputable":
            where = _line_col(code, t.start)
            if t.text == "set_option":
                i, has_in = _parse_set_option(tokens, i, code, what, rules)
            elif t.text == "open":
                i, has_in = _parse_open(tokens, i, frozenset(_PREAMBLE_KEYWORDS))
            else:
                raise UntrustedInputError(f"{what} has the command `{t.text}` where only a term/tactic may stand, at {where}")
            if not has_in:
                raise UntrustedInputError(f"{what} has `{t.text}` without `in` (a separate command) at {where}")
        else:
            i += 1


def check_header(
    text: str,
    *,
    allowed_import_roots: Sequence[str] = DEFAULT_ALLOWED_IMPORT_ROOTS,
    set_options: Mapping[str, SetOptionRule] = DEFAULT_SET_OPTIONS,
    max_chars: int = MAX_HEADER_CHARS,
) -> CheckedHeader:
    """Accepts `import M` lines (M under an allowed root) followed by a preamble.

    The preamble follows the statement rules (`open`, `namespace`, allow-listed
    `set_option`, ...). An empty header is accepted.
    """
    what = "header"
    if not isinstance(text, str):
        raise UntrustedInputError(f"{what} must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise UntrustedInputError(f"{what} has {len(text)} characters; the limit is {max_chars}")
    text = _check_characters(text, what)
    code = _blank_comments(text, what)
    tokens = _tokenize(code)
    imports, body_start, i = _read_imports(tokens, code, what)
    for module in imports:
        if not any(module == r or module.startswith(r + ".") for r in allowed_import_roots):
            raise UntrustedInputError(
                f"{what} imports `{module}`, which is outside the allowed roots {', '.join(allowed_import_roots)}"
            )
    rest = tokens[i:]
    _scan_forbidden(code[body_start:], _tokenize(code[body_start:]), what)
    for t in rest:
        if t.kind == "word" and t.text in _DECL_KEYWORDS + ("sorry",):
            raise UntrustedInputError(f"{what} contains `{t.text}` at {_line_col(code, t.start)}")
    _check_preamble(rest, code, what, set_options)
    return CheckedHeader(text=code, imports=tuple(imports), body=code[body_start:].strip())


def _read_imports(tokens: Sequence[_Token], code: str, what: str) -> tuple[list[str], int, int]:
    """Leading `import A.B` commands: (module names, offset where the body starts, token index)."""
    imports: list[str] = []
    i = 0
    body_start = 0
    while i < len(tokens) and tokens[i].kind == "word" and tokens[i].text == "import":
        if i + 1 >= len(tokens) or tokens[i + 1].kind != "word":
            raise UntrustedInputError(f"{what}: `import` without a module name at {_line_col(code, tokens[i].start)}")
        name, i = _dotted_at(tokens, i + 1)
        imports.append(name)
        body_start = tokens[i - 1].end
    return imports, body_start, i


def parse_header(text: str) -> CheckedHeader:
    """Splits a *trusted* header into imports and body (no security screening)."""
    text = text.replace("\r\n", "\n")
    code = _blank_comments(text, "header")
    tokens = _tokenize(code)
    imports, body_start, _ = _read_imports(tokens, code, "header")
    return CheckedHeader(text=code, imports=tuple(imports), body=code[body_start:].strip())


def check_tactic(
    text: str,
    *,
    set_options: Mapping[str, SetOptionRule] = DEFAULT_SET_OPTIONS,
    max_chars: int = MAX_TACTIC_CHARS,
) -> CheckedTactic:
    """Accepts a tactic (sequence) that cannot run code or leave the proof (see `_check_tactic`).

    Results for the default options are memoised (searches submit the same tactics often).
    """
    if set_options is DEFAULT_SET_OPTIONS and max_chars == MAX_TACTIC_CHARS and isinstance(text, str):
        return _check_tactic_default(text)
    return _check_tactic(text, set_options=set_options, max_chars=max_chars)


@functools.lru_cache(maxsize=65536)
def _check_tactic_default(text: str) -> CheckedTactic:
    return _check_tactic(text, set_options=DEFAULT_SET_OPTIONS, max_chars=MAX_TACTIC_CHARS)


def _check_tactic(
    text: str,
    *,
    set_options: Mapping[str, SetOptionRule],
    max_chars: int,
) -> CheckedTactic:
    """Accepts a tactic (sequence) that cannot run code or leave the proof.

    Rejects everything `check_statement` rejects in a body (except `sorry`/`admit`, which
    Lean reports as given-up), plus declaration and preamble commands: a tactic line such as
    `#eval ...` or `theorem ...` would otherwise start a new command when the proof is
    re-checked as one declaration. `open ... in` and allow-listed `set_option ... in` stay.
    """
    what = "tactic"
    text = _check_text(text, what, max_chars)
    code = _blank_comments(text, what)
    tokens = _tokenize(code)
    _scan_forbidden(code, tokens, what, allow=frozenset({"admit"}))
    for t in tokens:
        if t.kind == "word" and t.text in _DECL_KEYWORDS:
            raise UntrustedInputError(f"{what} contains the declaration keyword `{t.text}` at {_line_col(code, t.start)}")
    _check_declaration_body(tokens, code, what, set_options)
    return CheckedTactic(text=code.strip("\n").rstrip())
