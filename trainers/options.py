"""One source per recipe's options: flags, ``--config`` YAML keys and LightningCLI options from its dataclass.

A recipe's options are one frozen dataclass (:mod:`trainers.configs`) with a type, a default and a one-line
comment (or ``metadata={"help": ...}``) per field. From it:

- :class:`RecipeOptions` adds one flag per field to an ``argparse`` parser (``encoder_start`` -> ``--encoder-start``;
  tuples as comma-separated lists; booleans as ``--x/--no-x``; a ``Literal`` as choices; the comment as help, with
  the dataclass default), reads a ``--config`` YAML file whose keys are the field names, and merges both into the
  dataclass's keyword arguments (flags win). Per command only a field's presentation is written: its group, and a
  spelling other than the default (``--targets`` for ``target_modules``, ``--quiet`` for ``progress``).
- :func:`give_signature` makes a LightningCLI class take a set of fields as its ``__init__`` parameters (types,
  defaults and help from the dataclass), so ``model:`` and ``data:`` sections hold exactly the fields.
- :func:`check_config_keys` checks the keys of a LightningCLI YAML file against its parser.

A field added to a dataclass thus gets a flag, a YAML key and a LightningCLI key with no more code. Unknown keys
are errors that name the file, the key and the nearest valid key. Imports no torch.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

MISSING = dataclasses.MISSING


class _NotASwitch:
    def __repr__(self) -> str:
        return "NOT_A_SWITCH"


NOT_A_SWITCH = _NotASwitch()  # Flag.const of a flag that takes a value


# ---------------------------------------------------------------------------------------------------- help texts
def field_help(config: type) -> dict[str, str]:
    """Each field's help: its ``metadata["help"]``, else its comment (the one on its line, else the comment lines
    right above it), from the class that defines it last (a subclass may only change a default)."""
    helps: dict[str, str] = {}
    for klass in reversed(config.__mro__):
        if dataclasses.is_dataclass(klass):
            helps.update(_comments(klass))
    for f in dataclasses.fields(config):
        if f.metadata.get("help"):
            helps[f.name] = f.metadata["help"]
    return helps


@functools.cache
def _comments(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source (a frozen application): no help texts
        return {}
    comments = {}  # line -> (text, whether the line is a comment alone)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.lstrip().startswith("#"))
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1)
                    if n in comments and not comments[n][1]]
        above, n = [], node.lineno - 1
        while n in comments and comments[n][1]:
            above.insert(0, comments[n][0])
            n -= 1
        if trailing:
            out[node.target.id] = " ".join(trailing)
        elif above:
            out[node.target.id] = _as_help(" ".join(above))
    return out


def _as_help(text: str) -> str:
    """A comment block (sentences) as a flag's help (a phrase, as argparse's own): no final full stop, the first
    word in lower case unless it is a name (SpecAugment, FFN)."""
    first = text.split(" ", 1)[0]
    if first[:1].isupper() and first[1:].islower():
        text = text[0].lower() + text[1:]
    return text[:-1] if text.endswith(".") else text


# ---------------------------------------------------------------------------------------------------- types
def _optional(tp) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); ``X`` -> (X, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def _item(tp):
    """``tuple[X, ...]`` -> X; anything else -> None."""
    if typing.get_origin(tp) in (tuple, list, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return args[0] if args else str
    return None


def _choices(tp) -> tuple | None:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def convert(value, tp, where: str):
    """``value`` (a flag's text, or a YAML value) as the type ``tp``; ``where`` names it in errors
    (``--speed-perturb`` or ``c.yaml: speed_perturb``). A tuple takes a list or a comma-separated string."""
    tp, optional = _optional(tp)
    if value is None:
        if optional or _item(tp) is not None:
            return None if optional else ()
        raise _bad(where, value, "a value, not null")
    item = _item(tp)
    if item is not None:
        items = value if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",") if v.strip()]
        try:
            return tuple(convert(v, item, where) for v in items)
        except ValueError:
            if item in (int, float):
                raise _bad(where, value, "comma-separated numbers") from None
            raise
    choices = _choices(tp)
    if choices is not None:
        if value not in choices:
            raise _bad(where, value, f"one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false", "yes", "no", "on", "off"):
            return str(value).lower() in ("true", "yes", "on")
        raise _bad(where, value, "true or false")
    if tp in (int, float):
        expected = "an integer" if tp is int else "a number"
        if isinstance(value, bool) or (tp is int and isinstance(value, float) and not value.is_integer()):
            raise _bad(where, value, expected)
        try:
            return tp(value) if not isinstance(value, str) else tp(float(value) if tp is float else int(value))
        except ValueError:
            raise _bad(where, value, expected) from None
    if isinstance(value, (dict, list)):
        raise _bad(where, value, "a single value")
    return str(value)


def _bad(where: str, value, expected: str) -> ValueError:
    """``--speed-perturb fast: expected ...`` for a flag, ``c.yaml: rank: expected ..., got 'x'`` for a YAML key."""
    if where.startswith("--"):
        return ValueError(f"{where} {value}: expected {expected}")
    return ValueError(f"{where}: expected {expected}, got {value!r}")


def _format(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, tuple):
        return ",".join(_format(v) for v in value)
    return str(value)


def nearest(key: str, valid: Iterable[str]) -> str | None:
    """The valid key spelt most like ``key``."""
    valid = sorted(set(valid))
    return next(iter(difflib.get_close_matches(key, valid, n=1, cutoff=0.0)), None) if valid else None


def unknown_key_error(key: str, where: str, valid: Iterable[str]) -> ValueError:
    """``where: unknown option 'rnak' (nearest valid key: 'rank')``."""
    near = nearest(key, valid)
    return ValueError(f"{where}: unknown option {key!r}" + (f" (nearest valid key: {near!r})" if near else ""))


# ---------------------------------------------------------------------------------------------------- flags
@dataclass(frozen=True)
class Flag:
    """How a field is spelt on the command line, where the default (``--field-name``) does not fit."""

    names: tuple[str, ...] = ()  # option strings, e.g. ("--targets",)
    metavar: str | None = None
    repeat: bool = False  # a tuple field whose flag repeats (--pack A --pack B) instead of taking a comma list
    const: Any = NOT_A_SWITCH  # a switch that sets the field to this value (--quiet: progress False)
    help: str | None = None  # only where the spelling inverts the field's meaning (--quiet: "no progress bars")
    default: str | None = None  # the default as the command computes it, for the help (run_dir: runs/<name>)


class RecipeOptions:
    """The flags and ``--config`` keys of one command, from its recipe's config dataclass(es).

    Args:
        command: the command, for messages (``whisper-experts train``).
        config: the recipe's dataclass.
        variants: further dataclasses the command may build instead, by a label (``{"--kind sparse":
            SparseTrainConfig}``); their own fields get flags too, and a different default is shown beside.
        flags: per field, a :class:`Flag` where its spelling differs from ``--field-name``.
        custom: fields the command sets through flags of its own (``{"extra_data": "--data"}``): no flag is made.
        keys: YAML keys that are not fields (``{"name": str}``), each with its type.
        aliases: YAML keys that stand for a field (``{"language": "languages"}``).
    """

    def __init__(self, command: str, config: type, variants: Mapping[str, type] | None = None, *,
                 flags: Mapping[str, Flag] | None = None, custom: Mapping[str, str] | None = None,
                 keys: Mapping[str, Any] | None = None, aliases: Mapping[str, str] | None = None):
        self.command, self.config, self.variants = command, config, dict(variants or {})
        self.flags, self.custom = dict(flags or {}), dict(custom or {})
        self.keys, self.aliases = dict(keys or {}), dict(aliases or {})
        self.types: dict[str, Any] = {}
        self.defaults: dict[str, dict[str | None, Any]] = {}  # field -> {variant label or None: default}
        self.help: dict[str, str] = {}
        for label, cls in [(None, config), *self.variants.items()]:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                self.types.setdefault(f.name, hints[f.name])
                self.defaults.setdefault(f.name, {})[label] = f.default if f.default_factory is MISSING \
                    else f.default_factory()
            self.help = {**field_help(cls), **self.help}
        unknown = (set(self.flags) | set(self.custom)) - set(self.types)
        if unknown:
            raise ValueError(f"{command}: flags for fields that do not exist: {', '.join(sorted(unknown))}")

    def flag_names(self, name: str) -> tuple[str, ...]:
        """The option strings of field ``name`` (its own flag, or the command's flag that sets it)."""
        if name in self.custom:
            return (self.custom[name].split()[0],)
        return self.flags.get(name, Flag()).names or ("--" + name.replace("_", "-"),)

    def yaml_keys(self) -> set[str]:
        return set(self.types) | set(self.keys) | set(self.aliases)

    def config_help(self, renamed: Mapping[str, str] | None = None) -> str:
        """The help of a command's ``--config`` flag: which keys the YAML file takes (``renamed``: the keys of the
        command's own flags whose names differ, e.g. ``{"--tag": "tags"}``)."""
        keys = {}
        for n in self.types:
            spec = self.flags.get(n, Flag())
            if n not in self.custom and self.flag_names(n)[0] != "--" + n.replace("_", "-"):
                keys[self.flag_names(n)[0]] = n if spec.const is NOT_A_SWITCH else f"{n}: {str(spec.const).lower()}"
        renamed = [f"{flag}: {key}" for flag, key in {**keys, **(renamed or {})}.items()]
        example = next((n for n in self.types if "_" in n and _optional(self.types[n])[0] in (int, float)
                        and self.defaults[n].get(None) not in (None, MISSING, 0)), None)
        shown = self.defaults[example][None] if example else None
        like = f" ({self.flag_names(example)[0]} {_format(shown)} is {example}: {_format(shown)})" if example else ""
        return (f"YAML file of options: each flag's name with underscores as its key{like}"
                f"{'; ' + ', '.join(renamed) if renamed else ''}. Flags given override it")

    # ------------------------------------------------------------------ argparse
    @staticmethod
    def dest(name: str) -> str:
        """The argparse dest of field ``name``'s flag (prefixed: a field may share a name with a command's own
        option, as ``registry`` does)."""
        return f"option_{name}"

    def add(self, group, *names: str) -> None:
        """Add the flags of fields ``names`` to ``group`` (an argparse parser or argument group)."""
        for name in names:
            self._add(group, name)

    def add_rest(self, parser, title: str = "more options") -> None:
        """Add every field whose flag ``parser`` lacks (a field new to the dataclass lands here until a group of the
        command names it)."""
        present = {a.dest for a in parser._actions}
        rest = [n for n in self.types if self.dest(n) not in present and n not in self.custom]
        if rest:
            self.add(parser.add_argument_group(title), *rest)

    def _add(self, group, name: str) -> None:
        spec, tp = self.flags.get(name, Flag()), self.types[name]
        base, _ = _optional(tp)
        kwargs = dict(dest=self.dest(name), default=None, help=self._help(name, spec))
        if spec.const is not NOT_A_SWITCH:
            kwargs.update(action="store_const", const=spec.const)
        elif base is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        else:
            # argparse would name the value after the dest; name it after the flag, as a hand-written flag is
            metavar = spec.metavar or self.flag_names(name)[0].lstrip("-").replace("-", "_").upper()
            choices = _choices(base)
            if _item(base) is not None:
                kwargs.update(metavar=metavar, action="append" if spec.repeat else "store")
            elif choices is not None:
                kwargs.update(choices=choices, metavar=spec.metavar)
            else:
                kwargs.update(metavar=metavar, type=base if base in (int, float) else None)
        group.add_argument(*self.flag_names(name), **kwargs)

    def _help(self, name: str, spec: Flag) -> str:
        text = spec.help or self.help.get(name, "")
        defaults = self.defaults[name]
        shown = []
        if spec.default is not None:
            shown.append(spec.default)
        elif spec.const is NOT_A_SWITCH and "default" not in text.lower():
            first = defaults.get(None, next(iter(defaults.values())))
            if first is not MISSING and first not in (None, ()):
                shown.append(_format(first))
        if spec.default is None:
            shown += [f"{label}: {_format(v)}" for label, v in defaults.items()
                      if label is not None and v != defaults.get(None, v) and v is not MISSING]
        if spec.repeat:
            text += "; repeat the flag for several"
        text = f"{text} (default {'; '.join(shown)})" if shown else text
        return text.replace("%", "%%")

    def from_args(self, args: argparse.Namespace) -> dict:
        """The fields given on the command line, converted to their types."""
        values = {}
        for name in self.types:
            value = getattr(args, self.dest(name), None)
            if value is None:
                continue
            values[name] = convert(value, self.types[name], self.flag_names(name)[0])
        return values

    # ------------------------------------------------------------------ YAML
    def read_config(self, path: str) -> dict:
        """A ``--config`` YAML file's options, checked (unknown keys, types) and converted; aliases resolved."""
        import yaml

        from trainers.cli.common import resolve_config

        resolved = resolve_config(path)
        try:
            loaded = yaml.safe_load(Path(resolved).read_text())
        except FileNotFoundError:
            raise ValueError(f"--config {path}: no such file") from None
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: not valid YAML: {e}") from None
        if loaded is None:
            return {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of option: value")
        unknown = [str(k) for k in loaded if k not in self.yaml_keys()]
        if unknown:
            errors = [unknown_key_error(k, path, self.yaml_keys()) for k in unknown]
            raise ValueError("; ".join(str(e) for e in errors) + f"; see `{self.command} --help`")
        values = {}
        for key, value in loaded.items():
            name = self.aliases.get(key, key)
            tp = self.keys.get(key, self.types.get(name))
            values[name] = value if tp is Any else convert(value, tp, f"{path}: {key}")
        return values

    def values(self, args: argparse.Namespace, config_flag: str = "config") -> dict:
        """The ``--config`` file's options (if one is given), overridden by the flags given."""
        path = getattr(args, config_flag, None)
        return {**(self.read_config(path) if path else {}), **self.from_args(args)}


# ---------------------------------------------------------------------------------------------------- LightningCLI
def give_signature(cls: type, config: type, names: Sequence[str], extra: Sequence[tuple] = ()) -> type:
    """Make ``cls.__init__(self, **options)`` read, by LightningCLI (jsonargparse), as taking the fields ``names`` of
    ``config``: the signature holds their types and defaults, the docstring their help. A tuple field with a
    default also takes null, for empty (:func:`config_values` turns it back into ``()``). ``extra``: parameters
    of ``cls.__init__`` that are not fields, as (name, type, default, help), first.

    ``cls.__init__`` must not call ``super()``: Lightning's ``save_hyperparameters`` would read the parameters of
    this signature from its frame (call the parent class's ``__init__`` by name).
    """
    hints = typing.get_type_hints(config)
    by_name = {f.name: f for f in dataclasses.fields(config)}
    helps = field_help(config)
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for name, tp, default, text in extra:
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=tp, default=default))
        helps = {**helps, name: text}
    for name in names:
        f, tp = by_name[name], hints[name]
        default = f.default if f.default_factory is MISSING else f.default_factory()
        if _item(tp) is not None and default is not MISSING:
            tp = typing.Optional[tp]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=tp,
                                        default=inspect.Parameter.empty if default is MISSING else default))
    cls.__init__.__signature__ = inspect.Signature(params)
    args = "\n".join(f"    {n}: {helps.get(n, n)}" for n in [*(e[0] for e in extra), *names])
    cls.__init__.__doc__ = f"{(cls.__init__.__doc__ or '').rstrip()}\n\nArgs:\n{args}\n"
    return cls


def config_values(config: type, options: Mapping) -> dict:
    """``options`` given to a :func:`give_signature` class, as keyword arguments of ``config`` (null tuples empty,
    lists as tuples)."""
    hints = typing.get_type_hints(config)
    out = {}
    for name, value in options.items():
        if _item(_optional(hints[name])[0]) is not None:
            value = tuple(value) if value is not None else None if _optional(hints[name])[1] else ()
        out[name] = value
    return out


def check_config_keys(parser, config: Mapping, where: str, prefix: str = "") -> None:
    """Refuse a key of a LightningCLI config (``config``, read from ``where``) that ``parser`` has no option for,
    naming the key, the file and the nearest valid key. A value of an option typed as a dataclass is checked
    against the dataclass's fields; other values (a trainer's ``callbacks``, ``logger``) are left to the parser."""
    leaves, groups = {}, set()
    for action in parser._actions:
        if type(action).__name__ == "_ActionConfigLoad":
            groups.add(action.dest)
        elif action.dest not in ("help", "config", "print_config") and not action.dest.endswith(".help"):
            leaves[action.dest] = getattr(action, "_typehint", None)
    _check_level(config, prefix, leaves, groups, where)


def _check_level(config: Mapping, prefix: str, leaves: dict, groups: set, where: str) -> None:
    for key, value in config.items():
        path = f"{prefix}{key}"
        if path in leaves:
            cls = _dataclass_of(leaves[path])
            if cls is not None and isinstance(value, Mapping):
                valid = {f.name for f in dataclasses.fields(cls)}
                for sub in value:
                    if sub not in valid:
                        raise unknown_key_error(f"{path}.{sub}", where, [f"{path}.{v}" for v in valid])
        elif path in groups or any(d.startswith(path + ".") for d in [*leaves, *groups]):
            if isinstance(value, Mapping):
                _check_level(value, path + ".", leaves, groups, where)
        else:
            siblings = {d[len(prefix):].split(".")[0] for d in [*leaves, *groups] if d.startswith(prefix)}
            raise unknown_key_error(path, where, [prefix + s for s in siblings])


def _dataclass_of(tp):
    tp, _ = _optional(tp) if tp is not None else (None, False)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def config_files(args: Sequence[str]) -> list[str]:
    """The existing files named by ``--config FILE`` / ``--config=FILE`` in a LightningCLI argument list."""
    named = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    named += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    return [p for p in named if Path(p).is_file()]
