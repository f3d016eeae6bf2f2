"""
The quickstart's corpus: real text that any machine with Python has, in the SmolLM2 spirit (code, prose, math), built
offline in seconds. Each source is a generator of (document text, bytes) that prepare.py tokenizes:
    code    the Python standard library's source, one document per file
    prose   its docstrings and pydoc topics, one document per module
    math    generated word problems with worked solutions (a fixed seed)
`python prepare.py --preset quickstart` (or train.py's data_prepare = "quickstart") builds data_cache/quickstart.
"""
import ast
import codecs
import math
import os
import random
import sys
import sysconfig
import zlib

QUICKSTART_DIR = os.path.join("data_cache", "quickstart")
QUICKSTART_DIRS = {"quickstart": QUICKSTART_DIR, "quickstart_smollm2": os.path.join("data_cache", "quickstart_smollm2")}
QUICKSTART_VOCAB = 8192  # the quickstart's own BPE: a 49152-token head was ~80% of its FLOPs (BENCHMARKS.md)
QUICKSTART_VERSION = 2   # 2: the corpus BPE by default, SmolLM2's tokenizer in quickstart_smollm2


def _stdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    # tests are repetitive; encodings/ holds generated tables; pydoc_data/ is the prose source's documentation
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib", "turtledemo",
            "encodings", "pydoc_data"}
    out = []
    for r, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        out += [os.path.join(r, n) for n in sorted(names) if n.endswith(".py")]
    # a fixed pseudo-random order (crc of the relative path), so a byte budget samples the whole library
    return sorted(out, key=lambda p: (zlib.crc32(os.path.relpath(p, root).encode()), p)), root


def quickstart_code(max_bytes=5_000_000):
    """Python standard library source, one document per file."""
    files, root = _stdlib_files()
    used = 0
    for p in files:
        if used >= max_bytes:
            break
        with open(p, encoding="utf-8", errors="replace") as f:
            text = f.read()
        used += len(text)
        yield text, len(text)


def quickstart_prose(max_bytes=3_000_000):
    """English prose: the language reference topics pydoc ships, the license, the Zen, and the docstrings of the standard
    library (one document per module: its docstring, then each class and function with its docstring)."""
    try:
        from pydoc_data.topics import topics  # some Linux distributions split it off; the docstrings still follow
    except ImportError:
        topics = {}
    for k in sorted(topics):
        yield topics[k].strip(), len(topics[k])
    lic = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    if os.path.exists(lic):
        with open(lic, encoding="utf-8", errors="replace") as f:
            t = f.read()
        yield t, len(t)
    files, root = _stdlib_files()
    used = 0
    # parsing the whole library is most of the quickstart's time: spread it over the cores (results in file order)
    import multiprocessing as mp
    with mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(min(8, os.cpu_count() or 1)) as pool:
        for text in pool.imap(_module_docs, [(p, root) for p in files], chunksize=8):
            if used >= max_bytes:
                break
            if text:
                used += len(text)
                yield text, len(text)


def _module_docs(path_root):  # one module's docstrings as a document ("" if none)
    p, root = path_root
    with open(p, "rb") as f:
        src = f.read()
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return ""
    mod = os.path.relpath(p, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
    if mod == "this":  # the Zen of Python, stored rot13-encoded
        s = next((n.value.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)
                  and n.targets[0].id == "s"), "")
        return codecs.decode(s, "rot13")
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"The {mod} module\n\n{doc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d and len(d) >= 80 and not node.name.startswith("_"):
                what = "class" if isinstance(node, ast.ClassDef) else "function"
                parts.append(f"{mod}.{node.name} ({what})\n\n{d}")
    return "\n\n".join(parts)


def _math_problem(rng):
    """One generated worked problem with its solution, as plain text."""
    kind = rng.randrange(10)
    if kind == 0:
        a, b = rng.randint(100, 99999), rng.randint(100, 99999)
        return f"Problem: Compute {a} + {b}.\nSolution: Add the numbers column by column, carrying as needed: " \
               f"{a} + {b} = {a + b}.\nAnswer: {a + b}"
    if kind == 1:
        a, b = rng.randint(12, 999), rng.randint(12, 99)
        t, o = b // 10 * 10, b % 10
        return (f"Problem: Compute {a} × {b}.\nSolution: Split {b} into {t} + {o}. Then {a} × {t} = {a * t} and "
                f"{a} × {o} = {a * o}. Adding, {a * t} + {a * o} = {a * b}.\nAnswer: {a * b}")
    if kind == 2:
        a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-50, 50)
        c = a * x + b
        op, bb = ("+", b) if b >= 0 else ("-", -b)
        undo = f"Subtract {bb} from both sides" if b >= 0 else f"Add {bb} to both sides"
        return (f"Problem: Solve {a}x {op} {bb} = {c} for x.\nSolution: {undo}: {a}x = {c - b}. Divide both sides by "
                f"{a}: x = {x}. Check: {a} · ({x}) {op} {bb} = {c}.\nAnswer: x = {x}")
    if kind == 3:
        a, b, c, d = rng.randint(1, 9), rng.randint(2, 12), rng.randint(1, 9), rng.randint(2, 12)
        l = b * d // math.gcd(b, d)
        num = a * (l // b) + c * (l // d)
        g = math.gcd(num, l)
        simp = f" = {num // g}/{l // g}" if g > 1 else ""
        return (f"Problem: Add the fractions {a}/{b} + {c}/{d}.\nSolution: The least common denominator of {b} and {d} "
                f"is {l}. So {a}/{b} = {a * (l // b)}/{l} and {c}/{d} = {c * (l // d)}/{l}. Their sum is {num}/{l}"
                f"{simp}.\nAnswer: {num // g}/{l // g}")
    if kind == 4:
        p, n = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 75]), rng.randint(2, 400) * 4
        return (f"Problem: What is {p}% of {n}?\nSolution: {p}% means {p}/100, so {p}% of {n} is {n} × {p} / 100 = "
                f"{n * p} / 100 = {n * p / 100:g}.\nAnswer: {n * p / 100:g}")
    if kind == 5:
        a, b = rng.randint(20, 5000), rng.randint(20, 5000)
        steps, x, y = [], max(a, b), min(a, b)
        while y:
            steps.append(f"{x} = {x // y} × {y} + {x % y}")
            x, y = y, x % y
        return (f"Problem: Find the greatest common divisor of {a} and {b}.\nSolution: Use Euclid's algorithm, "
                f"dividing and keeping the remainder: " + "; ".join(steps) + f". The last non-zero remainder is {x}."
                f"\nAnswer: {x}")
    if kind == 6:
        item = rng.choice(["pencils", "apples", "notebooks", "tickets", "stamps", "cookies"])
        name = rng.choice(["Sam", "Maria", "Ken", "Aisha", "Lena", "Omar", "Priya", "Tom"])
        price, n = rng.randint(2, 30), rng.randint(2, 15)
        paid = (price * n // 10 + 1 + rng.randint(0, 3)) * 10
        return (f"Problem: {item.capitalize()} cost ${price} each. {name} buys {n} {item} and pays with ${paid}. How "
                f"much change does {name} get?\nSolution: The {item} cost {n} × ${price} = ${price * n}. The change is "
                f"${paid} - ${price * n} = ${paid - price * n}.\nAnswer: ${paid - price * n}")
    if kind == 7:
        r1, r2 = rng.randint(-12, 12), rng.randint(-12, 12)
        s, p = -(r1 + r2), r1 * r2
        f = lambda r: f"(x {'-' if r >= 0 else '+'} {abs(r)})"
        return (f"Problem: Solve x² {'+' if s >= 0 else '-'} {abs(s)}x {'+' if p >= 0 else '-'} {abs(p)} = 0.\n"
                f"Solution: Look for two numbers whose product is {p} and whose sum is {-s}: they are {r1} and {r2}. "
                f"So the equation factors as {f(r1)}{f(r2)} = 0, and a product is zero when a factor is zero.\n"
                f"Answer: x = {min(r1, r2)} or x = {max(r1, r2)}")
    if kind == 8:
        x, y = rng.randint(-9, 9), rng.randint(-9, 9)
        a, b, c, d = rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 6), rng.randint(-6, -1)
        e, f = a * x + b * y, c * x + d * y
        det = a * d - b * c
        if det == 0:
            return _math_problem(rng)
        return (f"Problem: Solve the system {a}x + {b}y = {e} and {c}x + ({d})y = {f}.\nSolution: Multiply the first "
                f"equation by {c} and the second by {a}: {a * c}x + {b * c}y = {e * c} and {a * c}x + ({a * d})y = "
                f"{a * f}. Subtracting gives ({b * c - a * d})y = {e * c - a * f}, so y = {y}. Substituting into the "
                f"first equation: {a}x + {b * y} = {e}, so {a}x = {e - b * y} and x = {x}.\nAnswer: x = {x}, y = {y}")
    coefs = [rng.randint(-9, 9) for _ in range(rng.randint(2, 5))]
    terms = [(c, len(coefs) - 1 - i) for i, c in enumerate(coefs) if c]
    fmt = lambda c, k: f"{c}" if k == 0 else (f"{c}x" if k == 1 else f"{c}x^{k}")
    poly = " + ".join(fmt(c, k) for c, k in terms) or "0"
    dterms = [(c * k, k - 1) for c, k in terms if k > 0]
    deriv = " + ".join(fmt(c, k) for c, k in dterms) or "0"
    steps = "; ".join(f"the derivative of {fmt(c, k)} is {fmt(c * k, k - 1) if k else '0'}" for c, k in terms)
    return (f"Problem: Differentiate f(x) = {poly}.\nSolution: Use the power rule, d/dx x^n = n x^(n-1), term by term: "
            f"{steps}.\nAnswer: f'(x) = {deriv}")


def quickstart_math(n_docs=5_000, seed=0):
    """Generated worked problems (arithmetic, fractions, percentages, Euclid, equations, systems, factoring, derivatives),
    a few per document, as a worksheet."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        text = "\n\n".join(_math_problem(rng) for _ in range(rng.randint(1, 4)))
        yield text, len(text)


def quickstart_math_mc(n_items=200, seed=10_001):
    """A held-out 4-way multiple-choice task on the worked problems (eval.py's `quickstart_math`): the context is a
    problem and its worked solution up to "Answer:", the choices the true answer and three near misses (its last number
    changed by +1, -1, +10). A model that has learned to carry the solution's result into the answer line beats the
    0.25 of chance. Another seed than the training documents, so the problems are new to the model."""
    import re
    rng = random.Random(seed)
    items = []
    while len(items) < n_items:
        text = _math_problem(rng)
        query, answer = text.rsplit("\nAnswer: ", 1)
        last = list(re.finditer(r"\d+", answer))
        if not last:
            continue
        m = last[-1]
        near = [answer[:m.start()] + str(int(m.group()) + d) + answer[m.end():] for d in (1, -1, 10)]
        if len({answer, *near}) < 4:
            continue
        choices = [answer, *near]
        rng.shuffle(choices)
        items.append((query + "\nAnswer:", choices, choices.index(answer)))
    return items


def chat_demo_item(rng):
    """One generated arithmetic question with its exact answer line and a plausible wrong one (off by one or ten):
    the embedded post-training demo (prepare.py --preset chat_demo)."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        q, x = rng.choice([f"What is {a} + {b}?", f"Add {a} and {b}.", f"Compute {a} plus {b}."]), a + b
    elif kind == 1:
        a, b = rng.randint(20, 99), rng.randint(1, 19)
        q, x = rng.choice([f"What is {a} - {b}?", f"Subtract {b} from {a}.", f"Compute {a} minus {b}."]), a - b
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q, x = rng.choice([f"What is {a} times {b}?", f"Multiply {a} by {b}.", f"Compute {a} x {b}."]), a * b
    wrong = x + rng.choice([-10, -1, 1, 10])
    return q, f"The answer is {x}.", f"The answer is {wrong}."


def chat_demo(n, seed):
    """n rows of the demo task as (question, answer, wrong answer); seeds 0/1/2 are train/DPO/held-out test."""
    rng = random.Random(1000 + seed)
    return [chat_demo_item(rng) for _ in range(n)]


QUICKSTART_SOURCES = {"code": quickstart_code, "prose": quickstart_prose, "math": quickstart_math}
