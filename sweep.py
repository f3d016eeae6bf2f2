"""
Ablations the SmolLM2 way: variants of one base config x seeds, each run in its own out_dir, run one after another on
this machine or one per task of a Slurm job array. Finished runs are skipped and interrupted ones resume, so the same
command continues a sweep wherever it stopped.

    python sweep.py configs/ablation_schedule.py             # every run in turn
    python sweep.py configs/ablation_schedule.py --list      # the runs, their out_dirs and how far each got
    python sweep.py configs/ablation_schedule.py --task=4    # one run (0-based, --list's order)
    sbatch --array=0-5 --wrap="python sweep.py configs/ablation_schedule.py"   # one run per array task

A sweep file is Python, like a config file:

    base = "configs/quickstart.py"                # train.py's config file for every run
    out_dir = "out/ablation_schedule"             # run i goes to out_dir/<variant>/seed<k>
    seeds = [1, 2, 3]                             # train.py's seed (weights and data order)
    common = {"time_budget": 0.0, "max_steps": 1200}   # overrides every run shares
    variants = {"wsd": {}, "cosine": {"schedule": "cosine"}}   # name -> its overrides ("{seed}" in a string: the seed)
    # or: grid = {"decay_shape": ["linear", "1-sqrt"], "decay_frac": [0.1, 0.2]}: every combination, each variant
    # named from its values ("decay_shape=linear,decay_frac=0.1")

Each run is `python train.py <base> --key=value ... --seed=<k> --out_dir=<its dir>`: its overrides are checked by
train.py's configurator, and its out_dir is an ordinary run that report.py reads.
"""
import ast
import itertools
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
SWEEP_KEYS = {"base": str, "out_dir": str, "seeds": list, "common": dict, "variants": dict, "grid": dict}


class SweepError(ValueError):
    pass


def load_sweep(path):
    # the sweep file's assignments -> {key: value}, checked; literals only (a sweep is data)
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError) as e:
        raise SweepError(f"{path}: {e}") from None
    spec = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise SweepError(f"{path}:{node.lineno}: a sweep file holds only assignments (key = literal)")
        key = node.targets[0].id
        if key not in SWEEP_KEYS:
            raise SweepError(f"{path}:{node.lineno}: unknown key {key!r}; a sweep has {', '.join(SWEEP_KEYS)}")
        try:
            spec[key] = ast.literal_eval(node.value)
        except ValueError:
            raise SweepError(f"{path}:{node.lineno}: {key} must be a literal (a string, number, list or dict)") from None
        if not isinstance(spec[key], SWEEP_KEYS[key]):
            raise SweepError(f"{path}: {key} must be a {SWEEP_KEYS[key].__name__}, got {spec[key]!r}")
    for key in ("base", "out_dir"):
        if key not in spec:
            raise SweepError(f"{path}: no {key} = ...; a sweep needs base (train.py's config) and out_dir")
    if ("variants" in spec) == ("grid" in spec):
        raise SweepError(f"{path}: give either variants (name -> overrides) or grid (key -> values), one of them")
    if not os.path.isfile(os.path.join(ROOT, spec["base"])) and not os.path.isfile(spec["base"]):
        raise SweepError(f"{path}: base={spec['base']!r} is not a file")
    spec.setdefault("seeds", [spec.get("common", {}).get("seed", 1337)])
    spec.setdefault("common", {})
    if not spec["seeds"] or not all(isinstance(s, int) for s in spec["seeds"]):
        raise SweepError(f"{path}: seeds must be a non-empty list of integers, got {spec['seeds']!r}")
    if "grid" in spec:
        if not spec["grid"] or not all(isinstance(v, list) and v for v in spec["grid"].values()):
            raise SweepError(f"{path}: grid maps each key to a non-empty list of values, got {spec['grid']!r}")
        keys = list(spec["grid"])
        spec["variants"] = {",".join(f"{k}={v}" for k, v in zip(keys, values)): dict(zip(keys, values))
                            for values in itertools.product(*(spec["grid"][k] for k in keys))}
    for name, overrides in spec["variants"].items():
        if not isinstance(overrides, dict) or not name or "/" in name:
            raise SweepError(f"{path}: variant {name!r} must be a name without '/' mapped to a dict of overrides")
        if {"seed", "out_dir"} & (set(overrides) | set(spec["common"])):
            raise SweepError(f"{path}: seed and out_dir are the sweep's to set (seeds, out_dir), not a variant's")
    return spec


def runs(spec):
    # -> [(variant, seed, out_dir, train.py's arguments)], variants in order, seeds inside
    out = []
    for name, overrides in spec["variants"].items():
        for seed in spec["seeds"]:
            d = os.path.join(spec["out_dir"], name, f"seed{seed}")
            values = {k: v.replace("{seed}", str(seed)) if isinstance(v, str) else v  # e.g. decay_from, per seed
                      for k, v in {**spec["common"], **overrides}.items()}
            args = [spec["base"]] + [f"--{k}={v!r}" for k, v in values.items()]
            out.append((name, seed, d, args + [f"--seed={seed}", f"--out_dir={d}"]))
    return out


def state(run_dir):
    # "done" (its last evaluation is at its final step), "started" (a checkpoint to resume from) or "new"
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            max_steps = json.load(f)["max_steps"]
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            evals = [r["step"] for r in map(json.loads, filter(str.strip, f)) if "val_loss" in r]
        if evals and evals[-1] == max_steps:
            return "done"
    except (OSError, ValueError, KeyError):
        pass
    has_ckpt = os.path.isdir(run_dir) and any(n.startswith("ckpt_") for n in os.listdir(run_dir))
    return "started" if has_ckpt else "new"


def run_one(variant, seed, run_dir, args):
    s = state(run_dir)
    if s == "done":
        print(f"sweep: {variant} seed {seed}: done already ({run_dir})", flush=True)
        return 0
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args] + (["--init_from=resume"] if s == "started" else [])
    print(f"sweep: {variant} seed {seed}: {'resuming' if s == 'started' else 'starting'} in {run_dir}", flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc == 0 and state(run_dir) != "done":  # stopped by a signal: it saved a checkpoint, the next call resumes
        print(f"sweep: {variant} seed {seed}: stopped before its end; run the sweep again to resume", flush=True)
        return 1
    return rc


def main(argv):
    opts = {a.split("=")[0]: a.split("=", 1)[1] if "=" in a else "" for a in argv if a.startswith("--")}
    files = [a for a in argv if not a.startswith("--")]
    if len(files) != 1 or set(opts) - {"--list", "--task"}:
        raise SweepError("usage: python sweep.py SWEEP_FILE [--list | --task=I]")
    spec = load_sweep(files[0])
    todo = runs(spec)
    if "--list" in opts:
        for i, (variant, seed, d, _) in enumerate(todo):
            print(f"{i:3d}  {state(d):7s}  {variant}  seed {seed}  {d}")
        return 0
    task = opts.get("--task", os.environ.get("SLURM_ARRAY_TASK_ID"))
    if task is not None:
        if not (task.isdigit() and int(task) < len(todo)):
            raise SweepError(f"task {task!r}: this sweep has runs 0-{len(todo) - 1} (python sweep.py {files[0]} --list)")
        todo = [todo[int(task)]]
    failed = [f"{v} seed {s}" for v, s, d, a in todo if run_one(v, s, d, a) != 0]
    if failed:
        raise SweepError(f"{len(failed)} of {len(todo)} runs did not finish: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SweepError as e:
        sys.exit(f"error: {e}")
