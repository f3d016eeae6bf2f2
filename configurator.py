"""
nanoGPT's configurator, made strict. A script keeps its defaults as module globals, then calls

    from configurator import configure
    configure(globals(), sys.argv[1:])

which applies, in order, an optional config file (a plain Python file of assignments: `python train.py configs/x.py`)
and `--key=value` overrides (values parsed with ast.literal_eval, bare words as strings). Unlike nanoGPT, a key that is
not a default is an error naming the closest valid key, inside config files too, and a value of the wrong type is an error.
"""
import ast
import difflib
import sys
import types

_LITERALS = (bool, int, float, str, type(None), list, tuple, dict)


def _fail(msg):
    sys.exit(f"config error: {msg}")


def _known(g: dict) -> dict:
    return {k: v for k, v in g.items() if not k.startswith("_") and isinstance(v, _LITERALS)}


def _closest(key, known):
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(sorted(known))}"


def _check(key, value, default, where):
    # returns the value, converted where that is lossless (int -> float); None defaults accept any literal
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if not (isinstance(default, bool) and isinstance(value, bool)):
            _fail(f"{where}: {key} must be {type(default).__name__}, got {value!r} ({type(value).__name__})")
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if not isinstance(value, type(default)):
        _fail(f"{where}: {key} must be {type(default).__name__}, got {value!r} ({type(value).__name__})")
    return value


def configure(g: dict, argv, allow_config_file: bool = True) -> list:
    known = _known(g)
    for arg in argv:
        if not arg.startswith("--"):
            if not allow_config_file:
                _fail(f"unexpected argument {arg!r}: options are --key=value; {_closest('', known)}")
            # a config file: executed in its own namespace, then checked key by key
            ns = {}
            try:
                with open(arg) as f:
                    code = f.read()
            except OSError as e:
                _fail(f"cannot read config file {arg!r}: {e}")
            exec(compile(code, arg, "exec"), ns)
            for key, value in ns.items():
                if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    continue  # imports and helpers inside a config file are allowed
                if key not in known:
                    _fail(f"{arg}: unknown key {key!r}; {_closest(key, known)}")
                g[key] = _check(key, value, known[key], arg)
        else:
            if "=" not in arg:
                _fail(f"{arg!r}: options are written --key=value")
            key, raw = arg[2:].split("=", 1)
            if key not in known:
                _fail(f"unknown option --{key}; {_closest(key, known)}")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word is a string: --init_from=resume
            if isinstance(known[key], str) and not isinstance(value, str):
                value = raw  # --start=42 means the text "42"
            g[key] = _check(key, value, known[key], f"--{key}")
    return sorted(known)
