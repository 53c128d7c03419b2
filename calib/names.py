"""The rules for names, and the limits on every document MUSE parses.

Names (models, calibrations, references, predictors, intents, versions) become
directory and file names in the registry, so one rule holds for all of them:
``Name`` for msgspec Structs, ``check_name`` for everything else.

Tenant names come from clients and API keys.  They need not be file names, but
they become metrics labels, score-log values and (encoded, see
``tenant_file_stem``) the names of per-tenant calibration files, so they are
printable, bounded and free of path separators: ``check_tenant``.

Documents (deployment files, references, calibrations, request bodies) are
parsed within ``MAX_DEPTH`` levels of nesting and ``MAX_ELEMENTS`` values:
``parse_document`` reads JSON or TOML into builtins within both limits (deep
nesting is refused, never a RecursionError), ready for ``msgspec.convert``."""

from __future__ import annotations

import base64
import binascii
import re
import string
from typing import Annotated, Any

import msgspec

# -- names -----------------------------------------------------------------------------------

MAX_NAME_LENGTH = 128
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0," + str(MAX_NAME_LENGTH - 1) + "}"
# "$(?!\\n)": Python's "$" also matches before a final newline ("abc\\n"), which is no name.
NAME_PATTERN = f"^{_NAME}$(?!\\n)"
REF_PATTERN = f"^{_NAME}/{_NAME}$(?!\\n)"  # NAME/VERSION
NAME_RULE = f"1 to {MAX_NAME_LENGTH} letters, digits, '_', '.' or '-', starting with a letter or digit"
NAME_RE = re.compile(NAME_PATTERN)

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN, description=NAME_RULE)]
NameRef = Annotated[str, msgspec.Meta(pattern=REF_PATTERN, description="NAME/VERSION, each a name: " + NAME_RULE)]


def check_name(kind: str, value: object) -> str:
    """``value`` if it is a valid name; else ValueError naming ``kind``, the value and the rule."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(f"{kind} {value!r} is not a valid name: use {NAME_RULE}")
    return value


# -- tenant names ------------------------------------------------------------------------------

MAX_TENANT_BYTES = 128
TENANT_RULE = (
    f"1 to {MAX_TENANT_BYTES} bytes of UTF-8, printable (no control, format or separator characters "
    "other than the space), without '/', '\\' or '*', not '.' or '..', and no spaces at either end"
)
_FORBIDDEN = frozenset("/\\*")


def tenant_problem(value: object) -> str | None:
    """Why ``value`` is not a tenant name, or None when it is one."""
    if not isinstance(value, str):
        return f"a tenant name is a string, not {type(value).__name__}"
    if not value:
        return "a tenant name cannot be empty"
    if len(value.encode("utf-8", "surrogatepass")) > MAX_TENANT_BYTES:
        return f"longer than {MAX_TENANT_BYTES} bytes of UTF-8"
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        return f"holds the unprintable character U+{ord(bad):04X}"
    bad_chars = _FORBIDDEN.intersection(value)
    if bad_chars:
        return f"holds {', '.join(repr(c) for c in sorted(bad_chars))}"
    if value in (".", ".."):
        return "'.' and '..' are not tenant names"
    if value != value.strip(" "):
        return "starts or ends with a space"
    return None


DEFAULT_TENANT = "*"  # in routes and quotas: every tenant without an entry of its own


def route_tenant_problem(value: object) -> str | None:
    """Why ``value`` is neither a tenant name nor DEFAULT_TENANT, or None."""
    return None if value == DEFAULT_TENANT else tenant_problem(value)


def is_tenant(value: object) -> bool:
    return tenant_problem(value) is None


def check_tenant(value: object, kind: str = "tenant") -> str:
    """``value`` if it is a valid tenant name; else ValueError naming ``kind``, the value and the rule."""
    problem = tenant_problem(value)
    if problem is not None:
        raise ValueError(f"{kind} {value!r} is not a valid tenant name ({problem}); use {TENANT_RULE}")
    assert isinstance(value, str)
    return value


# Tenant names as file names (calibrations/NAME/VERSION/tenants/<stem>.json): a reversible
# encoding whose output never holds a separator, never starts with '.' and fits a file name.
# Names made of letters, digits, '_', '-' and (not leading) '.' are their own stem; any other
# byte of the UTF-8 is %XX; a stem that would be longer than _MAX_STEM is '~' + base64url.
_SAFE = frozenset(string.ascii_letters + string.digits + "_-.")
_HEX = frozenset(string.hexdigits)
_MAX_STEM = 200  # file names hold 255 bytes; 4 * ceil(MAX_TENANT_BYTES / 3) + 1 = 173 fit


def tenant_file_stem(tenant: str) -> str:
    """The file-name stem for ``tenant`` (validated); ``tenant_from_file_stem`` reverses it."""
    check_tenant(tenant)
    parts = []
    for i, byte in enumerate(tenant.encode()):
        c = chr(byte)
        parts.append(c if c in _SAFE and not (i == 0 and c == ".") else f"%{byte:02X}")
    stem = "".join(parts)
    if len(stem) > _MAX_STEM:
        stem = "~" + base64.urlsafe_b64encode(tenant.encode()).decode().rstrip("=")
    return stem


def tenant_from_file_stem(stem: str) -> str:
    """The tenant whose file-name stem is ``stem``; ValueError unless ``stem`` is exactly the
    stem ``tenant_file_stem`` makes for a valid tenant name (so each tenant has one file)."""
    try:
        if stem.startswith("~"):
            raw = base64.urlsafe_b64decode(stem[1:] + "=" * (-len(stem[1:]) % 4))
        else:
            raw = _unquote(stem)
        tenant = raw.decode("utf-8")
        if tenant_file_stem(tenant) == stem:
            return tenant
    except (ValueError, binascii.Error):
        pass
    raise ValueError(f"{stem!r} is not the file-name encoding of a tenant name")


def _unquote(stem: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(stem):
        if stem[i] == "%":
            pair = stem[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise ValueError(f"{stem!r}: '%' not followed by two hex digits")
            out.append(int(pair, 16))
            i += 3
        else:
            out.extend(stem[i].encode())
            i += 1
    return bytes(out)


# -- limits on parsed documents ------------------------------------------------------------------

# An event's id, as clients send it (server/schemas.py) and as labels name it (core/labels.py):
# what the server accepts can always be labelled.
MAX_EVENT_ID_CHARS = 256

MAX_DEPTH = 32  # levels of nesting (arrays and tables/objects) in any JSON or TOML document
MAX_ELEMENTS = 1_000_000  # values (array items plus table/object entries) in one document
LIMITS = f"at most {MAX_DEPTH} levels of nesting and {MAX_ELEMENTS} values (muse.calib.names.MAX_DEPTH/MAX_ELEMENTS)"


class LimitError(ValueError):
    """A document beyond MAX_DEPTH or MAX_ELEMENTS; the message names the source and the limit."""


def too_deep(source: str, where: str = "") -> LimitError:
    at = f" at {where if len(where) <= 60 else where[:60] + '...'}" if where else ""
    return LimitError(f"{source}: nested deeper than {MAX_DEPTH} levels{at}; documents hold {LIMITS}")


def check_limits(obj: Any, source: str, max_depth: int = MAX_DEPTH, max_elements: int = MAX_ELEMENTS) -> None:
    """LimitError when ``obj`` (decoded builtins) nests deeper than ``max_depth`` or holds more
    than ``max_elements`` values.  Iterative: any depth is measured without recursion."""
    elements = 0
    stack: list[tuple[Any, int, str]] = [(obj, 1, "$")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list):
            items = enumerate(node)  # type: ignore[assignment]
        else:
            continue
        if depth > max_depth:
            raise too_deep(source, path)
        elements += len(node)
        if elements > max_elements:
            raise LimitError(f"{source}: more than {max_elements} values; documents hold {LIMITS}")
        for key, child in items:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"))


# TOML's dotted keys (a.b.c = 1, [a.b.c]) nest without brackets, and tomllib reads a long one
# in quadratic time (50,000 parts: 40 s): runs of MAX_DEPTH dots are refused before parsing,
# once strings and comments are blanked out (dots in them nest nothing).
_TOML_STRINGS = re.compile(r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*')
_TOML_DOTTED = re.compile(r'(?<![A-Za-z0-9_-])(?:[A-Za-z0-9_-]+|"")(?:[ \t]*\.[ \t]*(?:[A-Za-z0-9_-]+|""))+')  # linear


def parse_document(raw: bytes, source: str, *, toml: bool) -> Any:
    """A JSON or TOML document as builtins, within MAX_DEPTH and MAX_ELEMENTS.

    LimitError beyond them; msgspec.DecodeError (naming the problem) when it is not valid
    JSON/TOML.  Convert the result with ``msgspec.convert(obj, Type)``, whose errors name
    the path like ``msgspec.json.decode``'s."""
    if toml:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise msgspec.DecodeError(f"not UTF-8 ({exc})") from None
        if any(run.group().count(".") >= MAX_DEPTH for run in _TOML_DOTTED.finditer(_TOML_STRINGS.sub('""', text))):
            raise too_deep(source, f"a dotted key of more than {MAX_DEPTH} parts")
    try:
        obj = msgspec.toml.decode(raw) if toml else msgspec.json.decode(raw)
    except RecursionError:  # msgspec.toml's parser (tomllib) recurses into nested arrays and tables
        raise too_deep(source) from None
    except msgspec.ValidationError as exc:  # untyped: only numbers out of range
        raise msgspec.DecodeError(str(exc)) from None
    check_limits(obj, source)
    return obj
