"""
Command-line settings for the stage scripts (data.py, train.py, nihs.py, perplexity.py).

A stage script defines its settings as commented module-level globals and then calls

    config = configure(globals(), sys.argv[1:])

which applies, left to right,
- config files given as positional arguments (`config/x.py`, plain Python assignments),
- `--key=value` overrides, each parsed as a Python literal and type-checked against the default,
and returns the resolved settings as a dict (the script's globals are updated in place too).

Rules for an override `--key=value`:
- `--memory-layer=6` is the same as `--memory_layer=6`.
- The value is parsed with ast.literal_eval; a value that is not a literal (`--dataset=pg19`) is
  taken as a string where a string is accepted.
- An int is accepted where the default is a float. A list or tuple default also accepts a
  comma-separated value (`--lengths=256,512`), each item parsed as a literal.
- A None default accepts any value. A script can widen the accepted types of a key with
  `configure(..., types={'memory_layer': (int, list)})`.
- A bare `--flag` sets a bool to True. `--no_flag` / `--no-flag` sets a bool to False and any
  other setting to None, which every stage script reads as "off" (so `--no_memory_loss` turns a
  memory_loss='dino' default off).
- An unknown key raises ConfigError naming the closest valid keys.
- `--help` lists every key with its default and the comment written after it, then exits 0.

A config key is a lowercase module-level name assigned with `=` in the script's source, present
in its globals when configure() runs, whose value is an int, float, bool, str, None, list or
tuple. Names with a leading underscore and UPPER_CASE constants are not settings.
"""

import ast
import difflib
import io
import sys
import tokenize
from contextlib import contextmanager
from pathlib import Path

SETTING_TYPES = (int, float, bool, str, type(None), list, tuple)


class ConfigError(ValueError):
    """Invalid command-line or config-file setting; the message is one line with the fix."""


# -----------------------------------------------------------------------------
# discovering the settings of a script

def read_source(scope):
    """Return the source text of the module whose globals are `scope`, or None if it has no file."""
    path = scope.get("__file__")
    if not path or not Path(path).is_file():
        return None
    return Path(path).read_text(encoding="utf-8")


def assigned_names(source):
    """Return {name: (first_line, last_line)} for simple `name = value` statements at module level."""
    names = {}
    for stmt in ast.parse(source).body:
        if isinstance(stmt, ast.Assign):
            targets = [t for t in stmt.targets if isinstance(t, ast.Name)]
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            targets = [stmt.target]
        else:
            continue
        for target in targets:
            names.setdefault(target.id, (stmt.lineno, stmt.end_lineno))
    return names


def line_comments(source):
    """Return {line number: comment text without '#'} for every comment in the source."""
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    return comments


def is_setting_name(name):
    return not name.startswith("_") and not name.isupper()


def find_settings(scope):
    """Return {key: comment} for the config keys of `scope`, in source order.

    Without a source file (an interactive session) every lowercase global of a setting type
    counts, with no comments.
    """
    source = read_source(scope)
    if source is None:
        return {k: "" for k, v in scope.items() if is_setting_name(k) and isinstance(v, SETTING_TYPES)}
    comments = line_comments(source)
    settings = {}
    for name, (first, last) in assigned_names(source).items():
        if not is_setting_name(name) or name not in scope or not isinstance(scope[name], SETTING_TYPES):
            continue
        settings[name] = " ".join(comments[n] for n in range(first, last + 1) if n in comments)
    return settings


# -----------------------------------------------------------------------------
# parsing and type-checking one value

def type_names(types):
    return " or ".join(t.__name__ if t is not type(None) else "None" for t in types)


def parse_literal(text):
    """Parse a Python literal, or return the text itself when it is not one (a bare string)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def accepted_types(key, defaults, types):
    if key in types:
        accepted = types[key]
        return tuple(accepted) if isinstance(accepted, (tuple, list)) else (accepted,)
    return (type(defaults[key]),)


def check_type(key, value, accepted, default):
    """Return `value` converted to one of the accepted types, or raise ConfigError."""
    if type(None) in accepted:
        return value  # a None default accepts anything
    if isinstance(value, bool):
        if bool in accepted:
            return value
    elif isinstance(value, int) and int in accepted:
        return value
    elif isinstance(value, (int, float)) and float in accepted:
        return float(value)
    elif isinstance(value, str) and str in accepted:
        return value
    elif isinstance(value, (list, tuple)):
        for container in (list, tuple):
            if container in accepted:
                return container(check_items(key, value, default))
    raise ConfigError(f"invalid value for {key}: {value!r} ({type(value).__name__}), "
                      f"expected {type_names(accepted)} (default {default!r})")


def check_items(key, items, default):
    """Check list items against the default: its items' types, or its own type when it is a scalar."""
    if isinstance(default, (list, tuple)):
        if not default:
            return list(items)  # an empty default gives no item type to check against
        item_types = tuple({type(d) for d in default})
    elif default is None:
        return list(items)
    else:
        item_types = (type(default),)  # e.g. memory_layer=6 declared (int, list): a list of ints
    for item in items:
        if not is_accepted(item, item_types):
            raise ConfigError(f"invalid item for {key}: {item!r} ({type(item).__name__}), "
                              f"expected a list of {type_names(item_types)} (default {default!r})")
    return [check_type(key, item, item_types, default) for item in items]


def is_accepted(value, accepted):
    try:
        check_type("", value, accepted, None)
        return True
    except ConfigError:
        return False


def parse_value(key, text, defaults, types):
    """Parse the text of `--key=text` into a value of an accepted type for `key`."""
    accepted = accepted_types(key, defaults, types)
    value = parse_literal(text)
    if bool in accepted and text.lower() in ("true", "false"):
        value = text.lower() == "true"
    wants_sequence = list in accepted or tuple in accepted
    if wants_sequence and not is_accepted(value, accepted):
        value = [parse_literal(item.strip()) for item in text.split(",") if item.strip()]
    if str in accepted and not is_accepted(value, accepted):
        value = text  # `--dataset=123` stays the string '123'
    return check_type(key, value, accepted, defaults[key])


# -----------------------------------------------------------------------------
# applying arguments

def unknown_key_error(key, keys, prog):
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join('--' + k for k in close)}? " if close else ""
    return ConfigError(f"unknown setting --{key}; {hint}(python {prog} --help lists all settings)")


def apply_flag(arg, defaults, types, prog):
    """Return (key, value) for one `--key=value`, `--flag` or `--no_flag` argument."""
    body = arg[2:]
    key, has_value, text = body.partition("=")
    key = key.replace("-", "_")
    if key in defaults:
        if has_value:
            return key, parse_value(key, text, defaults, types)
        if bool in accepted_types(key, defaults, types):
            return key, True
        raise ConfigError(f"--{key} needs a value: pass --{key}=VALUE (default {defaults[key]!r})")
    if key.startswith("no_") and key[3:] in defaults:
        base = key[3:]
        if has_value:
            raise ConfigError(f"--{key} takes no value; pass --{base}=VALUE or --{key} alone")
        return base, False if isinstance(defaults[base], bool) else None
    raise unknown_key_error(key, list(defaults), prog)


def apply_config_file(path, scope, defaults, types, prog):
    """Execute a config file and return {key: value} for the settings it assigns."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; pass an existing .py file or --key=value settings")
    namespace = {k: scope[k] for k in defaults}
    try:
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
    except Exception as e:
        raise ConfigError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    changes = {}
    for key, value in namespace.items():
        if key.startswith("_") or not isinstance(value, SETTING_TYPES):
            continue  # helper names, imported modules and functions are not settings
        if key not in defaults:
            raise ConfigError(f"{path}: {unknown_key_error(key, list(defaults), prog)} "
                              f"(name helper variables in config files with a leading underscore)")
        if value is not scope[key]:
            accepted = accepted_types(key, defaults, types)
            changes[key] = check_type(key, value, accepted, defaults[key])
    return changes


def format_help(prog, settings, defaults):
    lines = [f"usage: python {prog} [config.py ...] [--key=value ...]", "",
             "Settings and their defaults. A bare --flag sets a bool to True, and --no_flag sets it",
             "to False (any other setting to None, which means off):"]
    options = {k: f"--{k}={defaults[k]!r}" for k in settings}
    width = min(max((len(o) for o in options.values()), default=0), 40)  # long defaults push their comment right
    for key, comment in settings.items():
        lines.append(f"  {options[key]:<{width}}  {comment}".rstrip())
    return "\n".join(lines)


def configure(scope, argv, types=None):
    """Apply config files and --key=value overrides from `argv` to the settings in `scope`.

    `scope` is the calling script's globals(); its settings are updated in place. `types` maps a
    key to the type or tuple of types it accepts when the default's type is too narrow.
    Returns the resolved settings {key: value} in source order. Raises ConfigError on bad input;
    `--help` or `-h` prints the settings and exits 0.
    """
    types = dict(types or {})
    settings = find_settings(scope)
    defaults = {k: scope[k] for k in settings}
    prog = Path(scope.get("__file__") or "script.py").name
    unknown = [k for k in types if k not in settings]
    if unknown:
        raise ConfigError(f"types given for unknown settings {unknown}; declare them as module-level globals first")

    if any(arg in ("--help", "-h") for arg in argv):
        print(format_help(prog, settings, defaults))
        sys.exit(0)

    for arg in argv:
        if arg.startswith("--"):
            key, value = apply_flag(arg, defaults, types, prog)
            scope[key] = value
        elif arg.startswith("-"):
            raise ConfigError(f"invalid argument {arg!r}; settings are written --key=value")
        elif arg.endswith(".py"):
            scope.update(apply_config_file(arg, scope, defaults, types, prog))
        else:
            raise ConfigError(f"unexpected argument {arg!r}; pass config files ending in .py or --key=value settings")
    return {k: scope[k] for k in settings}


@contextmanager
def exit_on_error(*error_types):
    """Turn ConfigError and the given exception types into `error: message` on stderr and exit status 2.

    Use it around a stage script's main code so bad input prints one line, not a traceback.
    """
    try:
        yield
    except (ConfigError, *error_types) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
