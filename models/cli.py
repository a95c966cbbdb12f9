"""One command-line style for every ``python -m`` entry point: Hydra-style ``key=value`` overrides.

Each tool declares a dataclass of its options (``opt(default, "help")`` per field); ``parse`` merges the
overrides into it with OmegaConf (types checked, ``__post_init__`` run), answers ``-h``/``--help`` with
the fields, their defaults and help, and turns every mistake into one line on stderr and exit code 2
(an unknown key names the valid ones). A list option takes ``key=a,b`` or ``key=[a,b]``; whatever follows
a bare ``--`` goes, verbatim, to the schema's passthrough field (e.g. bench/run.py's overrides).
bench/run.py itself is a Hydra app with the same override grammar. A leaf module (OmegaConf only) in the lowest
package, so that the model family's own commands (python -m models, python -m models.convert) use it without
importing anything above models/; the
harness's tools and the reports use it alike.
"""

from __future__ import annotations

import dataclasses
import sys
import typing

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class UsageError(ValueError):
    """A bad option value found after parsing (raise it from ``__post_init__`` or the tool): exit 2."""


def opt(default=MISSING, help: str = "", passthrough: bool = False):  # noqa: A002 - the argparse word for it
    """A field with its help text; a list default is copied per instance; MISSING = required. ``passthrough``:
    this list field takes whatever follows a bare ``--``."""
    meta = {"help": help, "passthrough": passthrough}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _passthrough(schema) -> str | None:
    return next((f.name for f in dataclasses.fields(schema) if f.metadata.get("passthrough")), None)


def _list_fields(schema) -> set[str]:
    hints = typing.get_type_hints(schema)
    return {f.name for f in dataclasses.fields(schema) if typing.get_origin(hints[f.name]) is list}


def help_text(schema, prog: str, doc: str) -> str:
    extra = _passthrough(schema)
    lines = [doc.strip(), "", f"usage: {prog} [key=value ...]" + (f" [-- {extra} ...]" if extra else ""),
             "", "keys:"]
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name == extra:
            continue
        if f.default is not dataclasses.MISSING and f.default is not MISSING:
            default = f"default {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {f.default_factory()!r}"
        else:
            default = "required"
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"  {f.name}=<{kind}>  ({default})  {f.metadata.get('help', '')}")
    return "\n".join(lines)


def fail(prog: str, message: str) -> typing.NoReturn:
    """One line on stderr, exit code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse(schema, argv: list[str] | None = None, prog: str = "", doc: str = ""):
    """An instance of ``schema`` from ``key=value`` overrides (``argv`` default: sys.argv[1:])."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(schema, prog, doc))
        sys.exit(0)
    rest: list[str] = []
    extra = _passthrough(schema)
    if "--" in argv:
        argv, rest = argv[:argv.index("--")], argv[argv.index("--") + 1:]
        if not extra:
            fail(prog, "'--' takes nothing here")
    names = [f.name for f in dataclasses.fields(schema) if f.name != extra]
    for a in argv:
        if "=" not in a or a.startswith("-"):
            fail(prog, f"expected key=value, got {a!r}; keys: {', '.join(names)} (see --help)")
    lists = _list_fields(schema)
    try:
        given = OmegaConf.to_container(OmegaConf.from_dotlist(argv))
        for key, value in given.items():
            if key not in names:
                raise ConfigKeyError(f"unknown key {key!r}; valid keys: {', '.join(names)}")
            if key in lists and not isinstance(value, list):
                given[key] = [] if value in (None, "") else [v for v in str(value).split(",") if v]
        if rest:
            given[extra] = rest
        merged = OmegaConf.merge(OmegaConf.structured(schema), given)
        missing = [k for k in names if OmegaConf.is_missing(merged, k)]
        if missing:
            raise UsageError(f"{', '.join(f'{k}=' for k in missing)} required (see --help)")
        return OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        fail(prog, str(exc).splitlines()[0].strip("'\""))
    except OmegaConfBaseException as exc:
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ValueError) and not isinstance(cause, OmegaConfBaseException):
            fail(prog, str(cause))  # a __post_init__ check
        key = getattr(exc, "full_key", "") or ""
        fail(prog, (f"{key}: " if key else "") + " ".join(str(exc).split("\n")[0].split()))
    except (UsageError, ValueError) as exc:
        fail(prog, str(exc))
