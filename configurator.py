"""
nanoGPT's configurator, made strict. A script keeps its defaults as module globals, then calls

    from configurator import configure
    configure(globals(), sys.argv[1:])

which applies, in order, an optional config file (a plain Python file of assignments: `python train.py configs/x.py`)
and `--key=value` overrides (values parsed with ast.literal_eval, bare words as strings). Unlike nanoGPT, a key that is
not a default is an error naming the closest valid key, inside config files too, and a value of the wrong type is an error.
Keys that decide the same thing (`exclusive`, e.g. max_steps and epochs) cannot silently override each other: the one
set later wins (the command line over a config file) and says so; two set in the same place are an error.

It is also the one place for the option checks the scripts share: dtype names and the sampling ranges.
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


def configure(g: dict, argv, allow_config_file: bool = True, exclusive=()) -> list:
    known = _known(g)
    where = {}  # key -> (its place: 0, 1, ... per config file, then the command line; the place's name)
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
                where[key] = (argv.index(arg), arg)
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
            where[key] = (len(argv), "the command line")
    for group in exclusive:
        _one_of(g, known, where, group)
    return sorted(known)


def _one_of(g, known, where, group):
    # keys that decide the same thing: the one set last wins, the others go back to their defaults (which defer)
    given = sorted((where[k], k) for k in group if k in where)
    if len(given) < 2:
        return
    (place, name), last = given[-1]
    same = [k for k in group if k in where and where[k][0] == place]  # in the group's order
    if len(same) > 1:
        _fail(f"{' and '.join(same)} are both set in {name}; they decide the same thing: drop one")
    for _, k in given[:-1]:
        print(f"note: {last}={g[last]!r} ({name}) decides, not {k}={g[k]!r} ({where[k][1]})", file=sys.stderr)
        g[k] = known[k]


def require(config: dict, choices: dict, positive=()):
    # one-line errors for values outside their choices (compared with their type: True is not 1) and for counts that
    # must be positive
    for key, allowed in choices.items():
        v = config[key]
        if not any(v is a or (type(v) is type(a) and v == a) for a in allowed):
            _fail(f"{key}={v!r} is not one of {allowed}")
    for key in positive:
        if config[key] <= 0:
            _fail(f"{key} must be positive, got {config[key]}")


# -----------------------------------------------------------------------------
# option checks shared by the scripts: one range per option, everywhere

DTYPES = ("float32", "bfloat16", "float16")


class OptionError(ValueError):
    """An option out of its range: the message says which and what is allowed; param names it (serve.py's errors)."""

    def __init__(self, param, message):
        super().__init__(message)
        self.param = param


def torch_dtype(name: str):
    # a checked dtype name -> the torch dtype (torch imported here, so a bad flag answers before torch loads)
    if name not in DTYPES:
        raise OptionError("dtype", f"dtype={name!r} must be one of {', '.join(DTYPES)}")
    import torch
    return getattr(torch, name)


def check_sampling(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=1):
    # the sampling ranges of sample.py, eval.py, serve.py and engine.Request (temperature and top_p: OpenAI's)
    for param, ok, rule in (("temperature", 0 <= temperature <= 2, "in [0, 2] (0 = greedy)"),
                            ("top_p", 0 < top_p <= 1, "in (0, 1] (1 = no nucleus cut)"),
                            ("top_k", top_k >= 0, ">= 0 (0 = all tokens)"),
                            ("max_new_tokens", max_new_tokens >= 1, ">= 1")):
        if not ok:
            value = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens}[param]
            raise OptionError(param, f"{param}={value} must be {rule}")
