"""Screening of untrusted Lean text (statements, headers, tactics) before Lean sees it.

Threat: Lean *runs code while it elaborates* (`#eval`, `run_tac`, `native_decide`, `decide
+native`, `plausible`, `elab`/`macro` definitions, `initialize`, `@[implemented_by]`, ...).
Inside a `by` block in a binder or a type such code runs in the REPL process and could print
forged REPL answers or escape. This module closes that class with allow-lists where one is
possible and a token-level deny-list where the language is open:

- *Header*: only `import M` (M under an allowed root), then `open`, `namespace`, `section`,
  `end`, `universe`, `variable`, `noncomputable section` and allow-listed `set_option`.
- *Statement*: that preamble, then exactly one `theorem`/`lemma`/`example`, optionally
  tagged by allow-listed attributes (`@[simp]`), with modifiers `private`/`protected`/
  `noncomputable`/`nonrec`. No proof body (a trailing `:= by sorry` placeholder is dropped).
- *Options*: only names on an allow-list, values typed and bounded (`maxHeartbeats` in
  1..cap: `0` means "unlimited" and is rejected; `maxRecDepth` capped).
- *Everywhere*: no `#command`, no command/extension/declaration keyword, no evaluating
  tactic or term (`native_decide`, `native`, `plausible`, `slim_check`, `polyrith`,
  `bv_decide`, `eval%`, `run_tac`, `by_elab`, ...) and no name with a component that only
  matters to evaluated or meta code (`IO`, `EIO`, `BaseIO`, `System`, `Internal`, `Elab`,
  `Meta`, `ofReduceBool`, `trustCompiler`, ...) - checked on *every component* of every
  dotted name, so `_root_.IO.println`, `Std.Internal.x` and `open IO in println` are caught.
  Interpolated strings (`s!"..{e}.."`, and any literal holding `{`, which `trace`,
  `throwError`, `dbg_trace` interpolate and evaluate), quotations (`` ` ``) and raw strings
  (`r#"..."#`) are rejected.

Harmless text is accepted: string and char literals used as data, identifiers that merely
contain a keyword (`unsafe_count`, `is_initialized`), «guillemet» names (checked by their
content), `@[simp]`-style attributes on the submitted theorem.

Design invariants:
- One lexer (`_lex`) decides what is a comment, a string, a name. Comments are replaced by
  spaces (newlines kept, so positions are unchanged) and the *blanked* text is what callers
  send to Lean (`CheckedStatement.text`, `CheckedTactic.text`, `CheckedHeader.text`):
  whatever this module treated as a comment can never reach Lean as code.
- Word boundaries use a character class that is a *subset* of Lean's identifier characters,
  so this lexer never joins what Lean splits: every place Lean starts a keyword is a place
  this module starts a word (it may split more often, which only rejects more).
- Every rejection raises `UntrustedInputError` with `rule` (a stable rule name) and
  `position` (`"line:column"`, 1-based line, 0-based column like Lean), both in the message.
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
    "ALLOWED_ATTRIBUTES",
    "check_statement",
    "check_header",
    "check_tactic",
    "split_statement",
    "parse_header",
    "screen_tactics",
    "statement_from_source",
]

MAX_STATEMENT_CHARS = 20_000
MAX_HEADER_CHARS = 10_000
MAX_TACTIC_CHARS = 10_000

DEFAULT_ALLOWED_IMPORT_ROOTS: tuple[str, ...] = ("Mathlib", "Aesop", "Std", "Batteries")

#: The cap a header's `set_option maxHeartbeats 0` ("unlimited", as in the miniF2F header)
#: is lowered to; the REPL client also enforces wall-clock limits on every request.
HEARTBEAT_CAP = 10_000_000


class UntrustedInputError(ValueError):
    """The text was rejected. `rule` names the rule, `position` is `"line:column"` (or None)."""

    def __init__(self, message: str, *, rule: str = "input", position: str | None = None) -> None:
        super().__init__(message)
        self.rule = rule
        self.position = position


def _reject(what: str, detail: str, rule: str, code: str | None = None, pos: int | None = None) -> UntrustedInputError:
    where = _line_col(code, pos) if code is not None and pos is not None else None
    text = f"{what} rejected by rule `{rule}`" + (f" at {where}" if where else "") + f": {detail}"
    return UntrustedInputError(text, rule=rule, position=where)


@dataclass(frozen=True)
class SetOptionRule:
    """An allowed option: `kind` is "nat" (within `min_value`..`max_value`, inclusive) or "bool"."""

    kind: str
    max_value: int | None = None
    min_value: int = 0


DEFAULT_SET_OPTIONS: Mapping[str, SetOptionRule] = {
    "maxHeartbeats": SetOptionRule("nat", HEARTBEAT_CAP, 1),
    "synthInstance.maxHeartbeats": SetOptionRule("nat", HEARTBEAT_CAP, 1),
    "synthInstance.maxSize": SetOptionRule("nat", 10_000, 1),
    "maxRecDepth": SetOptionRule("nat", 10_000, 1),
    "autoImplicit": SetOptionRule("bool"),
    "relaxedAutoImplicit": SetOptionRule("bool"),
    "push_neg.use_distrib": SetOptionRule("bool"),
    "pp.*": SetOptionRule("bool"),
    "linter.*": SetOptionRule("bool"),
}

#: Attributes that only tag the submitted theorem for simp-like sets (no code, no extension).
ALLOWED_ATTRIBUTES = frozenset({"simp", "norm_cast", "push_cast", "field_simps", "mfld_simps", "nolint"})

# Words that start commands, define syntax/elaborators/declarations or run code. Rejected
# wherever they appear as a whole word or as a component of a dotted name.
_FORBIDDEN_WORDS: dict[str, str] = {
    **{w: "code-running command" for w in ("run_cmd", "run_elab", "run_meta", "run_tac", "by_elab", "evalExpr", "evalTerm", "eval_expr")},
    **{
        w: "evaluating tactic (runs compiled code)"
        for w in (
            "native_decide", "native", "plausible", "slim_check", "polyrith", "bv_decide", "bv_check",
            "ofReduceBool", "ofReduceNat", "reduceBool", "reduceNat", "trustCompiler",
            "ofNative", "nativeDecide", "Native",
        )
    },
    **{
        w: "syntax/elaborator extension"
        for w in (
            "elab", "elab_rules", "macro", "macro_rules", "syntax", "declare_syntax_cat",
            "notation", "notation3", "infix", "infixl", "infixr", "prefix", "postfix",
            "simproc", "dsimproc", "simproc_decl", "builtin_simproc", "binder_predicate",
            "declare_simp_like_tactic", "register_simp_attr", "register_option",
            "register_label_attr", "add_aesop_rules", "declare_aesop_rule_sets",
            "initialize_simps_projections", "grind_pattern", "norm_num_extension",
        )
    },
    **{w: "initialization hook" for w in ("initialize", "builtin_initialize")},
    **{w: "file-reading elaborator" for w in ("include_str", "include_bytes", "load_file")},
    **{w: "unsafe or foreign-code marker" for w in ("unsafe", "extern", "implemented_by", "export", "partial", "csimp")},
    **{
        w: "declaration other than the theorem"
        for w in (
            "def", "abbrev", "instance", "structure", "class", "inductive", "coinductive",
            "axiom", "opaque", "mutual", "deriving", "where", "irreducible_def", "alias",
            "add_decl_doc", "compile_inductive", "library_note", "assert_not_exists",
            "suppress_compilation", "unsuppress_compilation", "seal", "unseal", "omit", "include",
            "local", "attribute", "scoped_notation",
        )
    },
    "import": "`import` outside the header",
    "admit": "`admit` (an unfinished proof)",
}

# `name%` term elaborators that evaluate their argument.
_EVALUATING_ELABORATORS = frozenset({"eval", "by_elab", "run_elab", "elab", "run", "exec"})

# Name components that only matter to evaluated or meta-level code.
_FORBIDDEN_COMPONENTS: dict[str, str] = {
    **{c: "runtime (IO) API" for c in ("IO", "EIO", "BaseIO", "System", "Process", "FS", "Internal", "ST", "Task")},
    **{c: "meta-programming API" for c in ("Elab", "Meta", "Compiler", "Parser", "Environment", "CoreM", "MetaM", "TermElabM", "TacticM", "CommandElabM", "Unsafe")},
}

# Core's unsafe API is camel-cased: `unsafeCast`, `unsafeIO`, `ptrAddrUnsafe`, `withPtrAddrUnsafe`
# (an identifier that merely contains the word, `unsafe_count`, is fine).
_UNSAFE_API = re.compile(r"^unsafe[A-Z]|[a-z]Unsafe$|Unsafe[A-Z]")

_DECL_KEYWORDS = ("theorem", "lemma", "example")
_DECL_MODIFIERS = ("private", "protected", "noncomputable", "nonrec")
_PREAMBLE_KEYWORDS = ("open", "namespace", "section", "end", "variable", "universe", "set_option", "noncomputable")

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
    """`kind`: "word" (one name component; `text` is its content, guillemets removed),
    "hash" (`#name`), "num", "str" (string literal), "char" (char literal) or "sym"."""

    kind: str
    text: str
    start: int
    end: int


def _line_col(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1)
    return f"{line}:{col}"


def _check_characters(text: str, what: str) -> str:
    """Normalises CRLF and rejects characters that can hide or disguise code."""
    text = text.replace("\r\n", "\n")
    for i, c in enumerate(text):
        if c in "\n\t" or c == " ":
            continue
        cat = unicodedata.category(c)
        if cat in _BAD_CATEGORIES:
            raise _reject(what, f"contains {_BAD_CATEGORIES[cat]} U+{ord(c):04X}", "character", text, i)
    return text


_STRING_ESCAPES = frozenset('\\"\'ntr')
# Characters a «name» may not contain (Lean allows almost anything; data names need none of these).
_GUILLEMET_BAD = frozenset('#"`\'«@$%;{}[]()')


def _string_end(text: str, i: int, what: str) -> int:
    """End offset (after the closing quote) of the string literal whose `"` is at `i`."""
    n = len(text)
    j = i + 1
    while j < n:
        c = text[j]
        if c == '"':
            return j + 1
        if c == "\\":
            e = text[j + 1] if j + 1 < n else ""
            if e in _STRING_ESCAPES:
                j += 2
            elif e == "x":
                j += 4
            elif e == "u":
                close = text.find("}", j)
                if not text.startswith("u{", j + 1) or close < 0:
                    raise _reject(what, "malformed `\\u` escape in a string literal", "string", text, j)
                j = close + 1
            elif e == "\n":
                j += 2
            else:
                raise _reject(what, f"unknown escape `\\{e}` in a string literal", "string", text, j)
        else:
            j += 1
    raise _reject(what, "unterminated string literal", "string", text, i)


def _lex(text: str, what: str, *, trusted: bool = False) -> tuple[str, list[_Token]]:
    """`(blanked, tokens)`: comments (`--`, nested `/- -/`) replaced by spaces; tokens of the rest.

    `trusted` (benchmark files, traced repositories): only the structure is wanted, so the
    screening rules inside the lexer (interpolation, quotations, raw strings, odd «names»)
    do not apply.
    """
    out = list(text)
    tokens: list[_Token] = []
    n = len(text)
    i = 0
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "-" and text.startswith("--", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        elif c == "/" and text.startswith("/-", i):
            depth, j = 0, i
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
                raise _reject(what, "unterminated block comment", "comment", text, i)
            for k in range(i, j):
                if out[k] != "\n":
                    out[k] = " "
            i = j
        elif c == '"':
            prev = tokens[-1] if tokens else None
            # `s!"…"`, `m! "…"`: Lean allows whitespace between the `!` token and the string.
            if not trusted and prev is not None and prev.kind == "word" and prev.text.endswith("!"):
                raise _reject(what, f"interpolated string `{prev.text}\"...\"` (its `{{...}}` parts are code)", "interpolated-string", text, prev.start)
            j = _string_end(text, i, what)
            # `trace "{e}"`, `throwError "{e}"`, `dbg_trace "{e}"` interpolate a plain-looking
            # literal and evaluate `e`: a string that could interpolate is not data.
            brace = -1 if trusted else text.find("{", i, j)
            if brace >= 0:
                raise _reject(what, "a `{` in a string literal (string interpolation evaluates code)", "string-interpolation", text, brace)
            tokens.append(_Token("str", text[i:j], i, j))
            i = j
        elif c == "'" and text.startswith("''", i) and not (tokens and tokens[-1].end == i and tokens[-1].kind == "word"):
            # Like Lean: a `'` followed by `'` never starts a char literal (`f '' s`).
            tokens.append(_Token("sym", "''", i, i + 2))
            i += 2
        elif c == "'" and _char_literal_end(text, i) is not None and not (tokens and tokens[-1].end == i and tokens[-1].kind == "word"):
            j = _char_literal_end(text, i)
            assert j is not None
            tokens.append(_Token("char", text[i:j], i, j))
            i = j
        elif c == "«":
            j = text.find("»", i)
            if j < 0 or "\n" in text[i:j]:
                raise _reject(what, "unterminated «guillemet» name", "guillemet", text, i)
            inner = text[i + 1 : j]
            bad = None if trusted else next((ch for ch in inner if ch in _GUILLEMET_BAD), None)
            if not inner.strip() or bad is not None:
                detail = "empty «» name" if bad is None else f"«guillemet» name containing `{bad}`"
                raise _reject(what, detail, "guillemet", text, i)
            tokens.append(_Token("word", inner, i, j + 1))
            i = j + 1
        elif c == "`" and not trusted:
            raise _reject(what, "quoted name or syntax quotation (`)", "quotation", text, i)
        elif "0" <= c <= "9":
            j = i
            while j < n and "0" <= text[j] <= "9":
                j += 1
            tokens.append(_Token("num", text[i:j], i, j))
            i = j
        elif _is_id_first(c):
            j = i + 1
            while j < n and _is_id_rest(text[j]):
                j += 1
            word = text[i:j]
            if word == "r" and j < n and text[j] in '#"' and not trusted:
                raise _reject(what, "raw string literal", "raw-string", text, i)
            tokens.append(_Token("word", word, i, j))
            i = j
        elif c == "#" and i + 1 < n and _is_id_first(text[i + 1]):
            j = i + 2
            while j < n and _is_id_rest(text[j]):
                j += 1
            tokens.append(_Token("hash", text[i:j], i, j))
            i = j
        elif text.startswith(":=", i) or text.startswith("@[", i):
            tokens.append(_Token("sym", text[i : i + 2], i, i + 2))
            i += 2
        else:
            tokens.append(_Token("sym", c, i, i + 1))
            i += 1
    return "".join(out), tokens


def _char_literal_end(text: str, i: int) -> int | None:
    """End of a char literal `'x'` / `'\\n'` starting at `i`, or None if `'` is not one."""
    if text.startswith("'\\", i):
        j = text.find("'", i + 2)
        return j + 1 if 0 < j <= i + 12 and "\n" not in text[i:j] else None
    if i + 2 < len(text) and text[i + 1] not in "'\n\\" and text[i + 2] == "'":
        return i + 3
    return None


def _dotted_at(tokens: Sequence[_Token], i: int) -> tuple[list[_Token], int]:
    """The components of the dotted name starting at word token `i`, and the index after it."""
    parts = [tokens[i]]
    j = i
    while (
        j + 2 < len(tokens)
        and tokens[j + 1].text == "."
        and tokens[j + 1].kind == "sym"
        and tokens[j + 1].start == tokens[j].end
        and tokens[j + 2].kind == "word"
        and tokens[j + 2].start == tokens[j + 1].end
    ):
        parts.append(tokens[j + 2])
        j += 2
    return parts, j + 1


def _name(parts: Sequence[_Token]) -> str:
    return ".".join(p.text for p in parts)


def _scan_forbidden(code: str, tokens: Sequence[_Token], what: str, *, allow: frozenset[str] = frozenset()) -> None:
    """Rejects `#commands`, forbidden words (as any name component) and forbidden components."""
    for k, t in enumerate(tokens):
        if t.kind == "hash" and len(t.text) > 2:
            raise _reject(what, f"the command `{t.text}`", "hash-command", code, t.start)
        if t.kind == "sym" and t.text == "@[":
            raise _reject(what, "an attribute `@[...]` here (only allow-listed attributes directly on the theorem)", "attribute", code, t.start)
        # `eval% e`, `by_elab% ...`: a word glued to `%` and not followed by an operand
        # (`n%100`, `a%b` are `mod`) is a term elaborator; the evaluating ones are rejected
        # even when glued to their argument (Lean reads `eval%x` as `eval% x`).
        if (
            t.kind == "sym" and t.text == "%" and k > 0 and tokens[k - 1].end == t.start and tokens[k - 1].kind == "word"
            and (
                tokens[k - 1].text in _EVALUATING_ELABORATORS
                or not (k + 1 < len(tokens) and tokens[k + 1].start == t.end and tokens[k + 1].kind in ("word", "num"))
            )
        ):
            raise _reject(what, f"the term elaborator `{tokens[k - 1].text}%`", "elaborator", code, tokens[k - 1].start)
        if t.kind == "word":
            inner = t.text.split() if t.text != t.text.strip() or " " in t.text else [t.text]
            bad = next((w for w in inner if w in _FORBIDDEN_WORDS and w not in allow), None)
            if bad is not None and bad != t.text:
                raise _reject(what, f"`{bad}` inside a «guillemet» name", "forbidden-word", code, t.start)
            if _UNSAFE_API.search(t.text):
                raise _reject(what, f"`{t.text}` (unsafe API)", "forbidden-word", code, t.start)
            if t.text in _FORBIDDEN_WORDS and t.text not in allow:
                raise _reject(what, f"`{t.text}` ({_FORBIDDEN_WORDS[t.text]})", "forbidden-word", code, t.start)
            if t.text in _FORBIDDEN_COMPONENTS:
                i = k  # report the whole dotted name this component belongs to
                while i >= 2 and tokens[i - 1].text == "." and tokens[i - 1].end == tokens[i].start \
                        and tokens[i - 2].kind == "word" and tokens[i - 2].end == tokens[i - 1].start:
                    i -= 2
                parts, _ = _dotted_at(tokens, i)
                raise _reject(
                    what, f"`{_name(parts)}` names the {_FORBIDDEN_COMPONENTS[t.text]} (`{t.text}`)", "forbidden-name", code, tokens[i].start
                )


def _option_allowed(name: str, rules: Mapping[str, SetOptionRule]) -> SetOptionRule | None:
    if name in rules:
        return rules[name]
    for pattern, rule in rules.items():
        if pattern.endswith(".*") and name.startswith(pattern[:-1]):
            return rule
    return None


def _parse_set_option(
    tokens: Sequence[_Token], i: int, code: str, what: str, rules: Mapping[str, SetOptionRule], *, clamp_unlimited: bool = False
) -> tuple[int, bool, tuple[int, int, str] | None]:
    """Checks `set_option NAME VALUE [in]` at token `i`: (next index, has `in`, replacement).

    `replacement` is `(start, end, text)` when `clamp_unlimited` lowers `maxHeartbeats 0`.
    """
    pos = tokens[i].start
    if i + 1 >= len(tokens) or tokens[i + 1].kind != "word":
        raise _reject(what, "`set_option` without an option name", "set-option", code, pos)
    parts, j = _dotted_at(tokens, i + 1)
    name = _name(parts)
    rule = _option_allowed(name, rules)
    if rule is None:
        raise _reject(what, f"option `{name}` is not on the allow-list", "set-option", code, pos)
    if j >= len(tokens):
        raise _reject(what, f"`set_option {name}` has no value", "set-option", code, pos)
    value = tokens[j]
    replacement = None
    if rule.kind == "nat":
        if value.kind != "num" or not value.text.isdigit():
            raise _reject(what, f"`set_option {name}` needs a natural number, got `{value.text}`", "set-option", code, value.start)
        v = int(value.text)
        if v == 0 and clamp_unlimited and name in ("maxHeartbeats", "synthInstance.maxHeartbeats") and rule.max_value:
            replacement = (value.start, value.end, str(rule.max_value))
        elif v < rule.min_value or (rule.max_value is not None and v > rule.max_value):
            raise _reject(
                what, f"`set_option {name} {value.text}` is outside {rule.min_value}..{rule.max_value}", "set-option-bound", code, value.start
            )
    elif rule.kind == "bool":
        if value.text not in ("true", "false"):
            raise _reject(what, f"`set_option {name}` needs true/false, got `{value.text}`", "set-option", code, value.start)
    else:  # pragma: no cover - the rule kinds are fixed
        raise _reject(what, f"option `{name}` has an unsupported rule", "set-option", code, pos)
    j += 1
    if j < len(tokens) and tokens[j].kind == "word" and tokens[j].text == "in":
        return j + 1, True, replacement
    return j, False, replacement


_OPEN_ARG_WORDS = frozenset({"scoped", "hiding", "renaming"})


def _parse_open(tokens: Sequence[_Token], i: int, stop: frozenset[str]) -> tuple[int, bool]:
    """`open A B.C (x y) hiding z renaming a → b [in]`: returns (next index, has `in`)."""
    j = i + 1
    while j < len(tokens):
        t = tokens[j]
        if t.kind == "word" and t.text == "in":
            return j + 1, True
        if t.kind == "word" and t.text in stop:
            break
        if t.kind == "word" or t.text in (".", "(", ")", "→", "->"):
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
    part and `declaration` the `@[attr] modifiers theorem ...` part (both slices of
    `text`). `name` is the declared name (None for `example`); `keyword_start` is the offset
    of the declaration keyword in `text`, `modifiers_start` that of its first attribute or
    modifier, `name_end` the offset just after the declared name (None without a name),
    `modifiers` the modifier words and `attributes` the attribute names in source order.
    """

    text: str
    preamble: str
    declaration: str
    kind: str
    name: str | None
    keyword_start: int
    modifiers_start: int = 0
    name_end: int | None = None
    modifiers: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    name_parts: tuple[str, ...] = ()  # the name's components, «guillemets» removed


@dataclass(frozen=True)
class CheckedHeader:
    """An accepted header: `imports` (module names, in source order) and `body` (the rest).

    `adjusted` lists normalisations applied (e.g. `maxHeartbeats 0` lowered to the cap).
    """

    text: str
    imports: tuple[str, ...]
    body: str
    adjusted: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckedTactic:
    """An accepted tactic; `text` has comments blanked and is what to send to Lean."""

    text: str


@dataclass(frozen=True)
class _Split:
    code: str
    tokens: list[_Token] = field(repr=False)
    decl_index: int
    modifiers_index: int  # first token of the attribute group / modifiers
    attributes: tuple[tuple[str, int], ...]  # (name, offset)


def _strip_placeholder(code: str, tokens: list[_Token]) -> tuple[str, list[_Token]]:
    texts = [t.text for t in tokens[-3:]]
    for tail in ([":=", "by", "sorry"], [":=", "by"], [":=", "sorry"], [":="]):
        if len(texts) >= len(tail) and texts[-len(tail):] == tail:
            cut = tokens[-len(tail)].start
            return code[:cut].rstrip(), tokens[: -len(tail)]
    return code.rstrip(), tokens


def _split(text: str, what: str, *, strict_attributes: bool = True) -> _Split:
    code, tokens = _lex(text, what, trusted=not strict_attributes)
    code, tokens = _strip_placeholder(code, tokens)
    decl = [i for i, t in enumerate(tokens) if t.kind == "word" and t.text in _DECL_KEYWORDS]
    if not decl:
        raise _reject(what, "no `theorem`, `lemma` or `example` declaration", "declaration", code, 0)
    if len(decl) > 1:
        extra = tokens[decl[1]]
        raise _reject(what, f"more than one declaration (another `{extra.text}`)", "declaration", code, extra.start)
    d = decl[0]
    m = d
    # `noncomputable section` belongs to the preamble, `noncomputable theorem` to the declaration.
    while m > 0 and tokens[m - 1].kind == "word" and tokens[m - 1].text in _DECL_MODIFIERS:
        m -= 1
    attributes: tuple[tuple[str, int], ...] = ()
    if m > 0 and tokens[m - 1].text == "]":
        opener = next((k for k in range(m - 1, -1, -1) if tokens[k].text == "@["), None)
        if opener is not None:
            inner = tokens[opener + 1 : m - 1]
            if strict_attributes:
                attributes = _parse_attributes(inner, code, what)
            else:  # trusted text (a traced repository): attributes are only recorded
                attributes = tuple((t.text, t.start) for k, t in enumerate(inner) if t.kind == "word" and (k == 0 or inner[k - 1].text == ","))
            m = opener
    return _Split(code, tokens, d, m, attributes)


def _parse_attributes(inner: Sequence[_Token], code: str, what: str) -> tuple[tuple[str, int], ...]:
    """`simp, norm_cast` / `nolint unusedArguments`: allow-listed names, word arguments only."""
    out: list[tuple[str, int]] = []
    expect_name = True
    for t in inner:
        if t.text == ",":
            if expect_name:
                raise _reject(what, "empty attribute", "attribute", code, t.start)
            expect_name = True
        elif t.kind == "word" and expect_name:
            if t.text not in ALLOWED_ATTRIBUTES:
                raise _reject(what, f"attribute `{t.text}` is not on the allow-list ({', '.join(sorted(ALLOWED_ATTRIBUTES))})", "attribute", code, t.start)
            out.append((t.text, t.start))
            expect_name = False
        elif t.kind == "word" and out and out[-1][0] == "nolint":
            continue
        else:
            raise _reject(what, f"unexpected `{t.text}` in an attribute", "attribute", code, t.start)
    if not out:
        raise _reject(what, "empty attribute list", "attribute", code, inner[0].start if inner else 0)
    return tuple(out)


def split_statement(text: str) -> CheckedStatement:
    """Splits a *trusted* statement (benchmark files) into preamble and declaration.

    No security screening beyond the lexer; use `check_statement` for untrusted input.
    """
    s = _split(text.replace("\r\n", "\n"), "statement", strict_attributes=False)
    return _make_checked(s)


def _make_checked(s: _Split) -> CheckedStatement:
    tokens, code = s.tokens, s.code
    kw = tokens[s.decl_index]
    name = None
    name_end = None
    name_parts: tuple[str, ...] = ()
    if kw.text != "example" and s.decl_index + 1 < len(tokens) and tokens[s.decl_index + 1].kind == "word":
        parts, _ = _dotted_at(tokens, s.decl_index + 1)
        name, name_end, name_parts = _name(parts), parts[-1].end, tuple(p.text for p in parts)
    mod_start = tokens[s.modifiers_index].start
    modifiers = tuple(t.text for t in tokens[s.modifiers_index : s.decl_index] if t.kind == "word" and t.text in _DECL_MODIFIERS)
    return CheckedStatement(
        text=code,
        preamble=code[:mod_start].strip(),
        declaration=code[mod_start:],
        kind=kw.text,
        name=name,
        keyword_start=kw.start,
        modifiers_start=mod_start,
        name_end=name_end,
        modifiers=modifiers,
        attributes=tuple(a for a, _ in s.attributes),
        name_parts=name_parts,
    )


def _check_text(text: object, what: str, max_chars: int) -> str:
    """The checks every untrusted text passes first: a non-empty string within `max_chars`
    characters, with no disallowed characters (`_check_characters`)."""
    if not isinstance(text, str):
        raise _reject(what, f"must be a string, got {type(text).__name__}", "type")
    if not text.strip():
        raise _reject(what, "is empty", "empty")
    if len(text) > max_chars:
        raise _reject(what, f"has {len(text)} characters; the limit is {max_chars}", "size")
    return _check_characters(text, what)


def check_statement(
    text: str,
    *,
    set_options: Mapping[str, SetOptionRule] = DEFAULT_SET_OPTIONS,
    max_chars: int = MAX_STATEMENT_CHARS,
) -> CheckedStatement:
    """Accepts exactly one `theorem`/`lemma`/`example` with an optional preamble.

    The preamble may hold `open`, `namespace`, `section`, `end`, `variable`, `universe`,
    `noncomputable section` and allow-listed `set_option` commands; the declaration may be
    tagged with allow-listed attributes. Raises `UntrustedInputError` naming the first
    problem found (rule and line:column).
    """
    what = "statement"
    text = _check_text(text, what, max_chars)
    s = _split(text, what)
    code, tokens = s.code, s.tokens
    # The attribute group was checked by `_split`; everything else must not hold one.
    outside = [t for k, t in enumerate(tokens) if not (s.attributes and s.modifiers_index <= k < s.decl_index)]
    _scan_forbidden(code, outside, what)
    for t in tokens:
        if t.kind == "word" and t.text == "sorry":
            raise _reject(what, "`sorry` outside the trailing `:= by sorry` placeholder", "sorry", code, t.start)
    _check_preamble(tokens[: s.modifiers_index], code, what, set_options)
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
            raise _reject(
                what, "a proof body after `:=`; submit the statement only (it may end with `:= by sorry`)", "proof-body", code, t.start
            )


def _check_preamble(
    tokens: Sequence[_Token], code: str, what: str, rules: Mapping[str, SetOptionRule], *, clamp_unlimited: bool = False
) -> list[tuple[int, int, str]]:
    """The allow-list of preamble commands; returns `set_option` value replacements (headers)."""
    stop = frozenset(_PREAMBLE_KEYWORDS)
    replacements: list[tuple[int, int, str]] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t.kind != "word" or t.text not in _PREAMBLE_KEYWORDS:
            raise _reject(what, f"unexpected `{t.text}` before the declaration (only open/namespace/section/end/variable/universe/set_option)", "preamble", code, t.start)
        if t.text == "open":
            j, has_in = _parse_open(tokens, i, stop)
            if j == i + 1:
                raise _reject(what, "`open` without a namespace", "preamble", code, t.start)
            i = j
        elif t.text == "set_option":
            i, _, rep = _parse_set_option(tokens, i, code, what, rules, clamp_unlimited=clamp_unlimited)
            if rep:
                replacements.append(rep)
        elif t.text in ("namespace", "section", "end", "universe"):
            j = i + 1
            while j < len(tokens) and (tokens[j].kind == "word" and tokens[j].text not in stop or tokens[j].text == "."):
                j += 1
            if t.text == "namespace" and j == i + 1:
                raise _reject(what, "`namespace` without a name", "preamble", code, t.start)
            i = j
        elif t.text == "noncomputable":
            if i + 1 >= len(tokens) or tokens[i + 1].text != "section":
                raise _reject(what, "`noncomputable` must be followed by `section`", "preamble", code, t.start)
            i += 1
        else:  # variable: binders are terms, screened by the forbidden-token scan
            j = i + 1
            while j < len(tokens) and not (tokens[j].kind == "word" and tokens[j].text in stop):
                j += 1
            i = j
    return replacements


def _check_declaration_body(
    tokens: Sequence[_Token], code: str, what: str, rules: Mapping[str, SetOptionRule]
) -> None:
    """Inside the declaration only the term-level `open ... in` / `set_option ... in` forms are allowed."""
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t.kind == "word" and t.text in _PREAMBLE_KEYWORDS and t.text != "noncomputable":
            if t.text == "set_option":
                i, has_in, _ = _parse_set_option(tokens, i, code, what, rules)
            elif t.text == "open":
                i, has_in = _parse_open(tokens, i, frozenset(_PREAMBLE_KEYWORDS))
            else:
                raise _reject(what, f"the command `{t.text}` where only a term/tactic may stand", "command", code, t.start)
            if not has_in:
                raise _reject(what, f"`{t.text}` without `in` (a separate command)", "command", code, t.start)
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
    `set_option`, ...); no string or char literal. An empty header is accepted. The
    benchmarks' `set_option maxHeartbeats 0` ("unlimited") is lowered to `HEARTBEAT_CAP`
    in the returned text (named in `adjusted`); any other out-of-bounds value is rejected.
    """
    what = "header"
    if not isinstance(text, str):
        raise _reject(what, f"must be a string, got {type(text).__name__}", "type")
    if len(text) > max_chars:
        raise _reject(what, f"has {len(text)} characters; the limit is {max_chars}", "size")
    text = _check_characters(text, what)
    code, tokens = _lex(text, what)
    imports, body_start, i = _read_imports(tokens, code, what)
    for module, pos in imports:
        if not any(module == r or module.startswith(r + ".") for r in allowed_import_roots):
            raise _reject(what, f"imports `{module}`, which is outside the allowed roots {', '.join(allowed_import_roots)}", "import", code, pos)
    rest = tokens[i:]
    _scan_forbidden(code, rest, what)
    for t in rest:
        if t.kind in ("str", "char"):
            raise _reject(what, "a literal in the header", "header-literal", code, t.start)
        if t.kind == "word" and t.text in _DECL_KEYWORDS + ("sorry",):
            raise _reject(what, f"`{t.text}` in the header", "declaration", code, t.start)
    replacements = _check_preamble(rest, code, what, set_options, clamp_unlimited=True)
    adjusted = []
    for start, end, value in sorted(replacements, reverse=True):
        code = code[:start] + value + code[end:]
        adjusted.append(f"set_option value 0 (unlimited) at {_line_col(text, start)} lowered to {value}")
    return CheckedHeader(text=code, imports=tuple(m for m, _ in imports), body=code[body_start:].strip(), adjusted=tuple(reversed(adjusted)))


def _read_imports(tokens: Sequence[_Token], code: str, what: str) -> tuple[list[tuple[str, int]], int, int]:
    """Leading `import A.B` commands: ((module, offset) list, offset where the body starts, token index)."""
    imports: list[tuple[str, int]] = []
    i = 0
    body_start = 0
    while i < len(tokens) and tokens[i].kind == "word" and tokens[i].text == "import":
        if i + 1 >= len(tokens) or tokens[i + 1].kind != "word":
            raise _reject(what, "`import` without a module name", "import", code, tokens[i].start)
        parts, i = _dotted_at(tokens, i + 1)
        imports.append((_name(parts), parts[0].start))
        body_start = tokens[i - 1].end
    return imports, body_start, i


def parse_header(text: str) -> CheckedHeader:
    """Splits a *trusted* header into imports and body (no security screening)."""
    text = text.replace("\r\n", "\n")
    code, tokens = _lex(text, "header", trusted=True)
    imports, body_start, _ = _read_imports(tokens, code, "header")
    return CheckedHeader(text=code, imports=tuple(m for m, _ in imports), body=code[body_start:].strip())


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
    code, tokens = _lex(text, what)
    _scan_forbidden(code, tokens, what, allow=frozenset({"admit"}))
    for t in tokens:
        if t.kind == "word" and t.text in _DECL_KEYWORDS:
            raise _reject(what, f"the declaration keyword `{t.text}`", "declaration", code, t.start)
    _check_declaration_body(tokens, code, what, set_options)
    return CheckedTactic(text=code.strip("\n").rstrip())


def screen_tactics(tactics: Iterable[str]) -> list[str]:
    """`check_tactic` on each tactic of a proof; the texts to send. Raises `UntrustedInputError`
    whose message starts with `tactic N` (1-based). The one screen every backend uses."""
    out: list[str] = []
    for i, t in enumerate(tactics, 1):
        try:
            out.append(check_tactic(t).text)
        except UntrustedInputError as e:
            raise UntrustedInputError(f"tactic {i}: {e}", rule=e.rule, position=e.position) from e
    return out


def statement_from_source(source: str, line: int, column: int = 1) -> str | None:
    """The statement of the declaration starting at `line`:`column` (1-based, as LeanDojo
    records positions) of a *trusted* source file: its text up to the proof's depth-0 `:=`
    (comments blanked). None when the declaration has no such `:=` (`|` equations, `where`).
    """
    lines = source.replace("\r\n", "\n").split("\n")
    if not 1 <= line <= len(lines):
        return None
    offset = sum(len(x) + 1 for x in lines[: line - 1]) + max(0, column - 1)
    try:
        code, tokens = _lex(source.replace("\r\n", "\n")[offset:], "source", trusted=True)
    except UntrustedInputError:
        return None
    keyword = next((k for k, t in enumerate(tokens) if t.kind == "word" and t.text in _DECL_KEYWORDS), None)
    if keyword is None:
        return None
    depth = 0
    for t in tokens[keyword + 1 :]:
        if t.text in _OPENERS:
            depth += 1
        elif t.text in _OPENERS.values():
            depth = max(0, depth - 1)
        elif depth == 0 and t.kind == "word" and t.text in _DECL_KEYWORDS + ("where",):
            return None
        elif depth == 0 and t.text == "|":
            return None
        elif depth == 0 and t.text == ":=":
            return code[: t.start].strip()
    return None
