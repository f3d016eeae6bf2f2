"""
A sweep's variants compared (sweep.py's out_dir: <variant>/seed<k>/ runs): which is better, by how much, and whether
the difference is more than the noise of seeds and evaluation items.

    python compare.py out/ablation_schedule                      # compare.md + curves.png in that directory
    python compare.py out/ablation_schedule --baseline=wsd --out=reports/schedule
    python compare.py out/ablation_branches --pairs=branch_550:cosine_550,stable:cosine_1100   # chosen pairs

What it reads and computes:
- each run's final validation bits per byte, overall (the mean over sources, as train.py logs it) and per source;
- each run's final checkpoint scored item by item on the run's own eval_tasks (eval.py, greedy, on the CPU);
- per variant: every number's mean over seeds, with its stderr (across seeds; for eval scores across items and seeds);
- variants ranked by val bpb, each against the best (or --baseline): the paired difference and its 95% interval.
  Val bpb pairs runs by seed (one seed = one initialisation and data order), with a t interval over the seeds'
  differences. Eval scores use a bootstrap that resamples the items and, as blocks, the seeds (10,000 draws).
- one line per pair: which is better and by how much, or "no significant difference" when the interval holds 0;
- curves.png: each variant's validation bpb and training loss, the mean over its seeds, the seeds' range shaded.
"""
import os
import re
import sys

import numpy as np

from eval import mean_stderr
from report import fail, load_run, series

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
DRAWS = 10_000


def load_sweep_runs(root):
    # -> {variant: {seed: run}} from root/<variant>/seed<k>/metrics.jsonl
    if not os.path.isdir(root):
        fail(f"{root}: no such directory (pass a sweep's out_dir)")
    out = {}
    for variant in sorted(os.listdir(root)):
        vdir = os.path.join(root, variant)
        for name in sorted(os.listdir(vdir)) if os.path.isdir(vdir) else []:
            m = re.fullmatch(r"seed(-?\d+)", name)
            if m and os.path.isfile(os.path.join(vdir, name, "metrics.jsonl")):
                out.setdefault(variant, {})[int(m.group(1))] = load_run(os.path.join(vdir, name))
    if len(out) < 2:
        fail(f"{root}: {len(out)} variant(s) with runs (<variant>/seed<k>/metrics.jsonl); a comparison needs two")
    for variant, runs in out.items():
        for seed, run in runs.items():
            if not run["evals"]:
                fail(f"{run['path']}: no validation yet; finish the sweep first (python sweep.py SWEEP_FILE)")
    return out


def final_bpb(run):
    last = run["evals"][-1]
    return {k[len("val_bpb/"):] if "/" in k else "all": v for k, v in last.items() if k.startswith("val_bpb")}


def item_scores(run):
    # {task/metric: [score per item]} of the run's final checkpoint on its own eval_tasks
    import eval as ev
    from checkpoint import open_model
    cfg = run["config"]
    if not cfg.get("eval_tasks"):
        return {}
    opened = open_model(run["path"])
    out = {}
    for task, limit in ev.task_list(cfg["eval_tasks"], cfg.get("eval_limit", 0), cfg.get("eval_data_dir", "")):
        scores = ev.run_task(opened.model.eval(), opened.tokenizer, task, ev.task_examples(task, limit), progress=False)
        metric = next(m for m in scores if m != "random")  # acc, exact_match or pass@1
        out[f"{task.name}/{metric}"] = scores[metric]
    return out


def t_interval(diffs):
    # mean and 95% half-width of paired differences (Student's t); None where there is one pair
    mean, se = mean_stderr(diffs)
    return mean, (T975.get(len(diffs) - 1, 1.96) * se if len(diffs) > 1 else None)


def bootstrap(a, b, seed=0):
    # a, b: (seeds, items) score arrays with rows paired by seed. -> (mean difference, 2.5%, 97.5%) of a - b, resampling
    # the items and the seeds (as blocks: a seed's row of a and of b move together), in chunks of draws
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)  # (seeds, items)
    rng, draws = np.random.default_rng(seed), []
    for n in [500] * (DRAWS // 500):
        per_seed = d[:, rng.integers(0, d.shape[1], (n, d.shape[1]))].mean(axis=2)  # (seeds, n): items resampled
        pick = rng.integers(0, d.shape[0], (n, d.shape[0]))  # the seeds resampled, per draw
        draws.append(np.take_along_axis(per_seed.T, pick, axis=1).mean(axis=1))
    draws = np.concatenate(draws)
    return float(d.mean()), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def verdict(name, ref, what, diff, lo, hi, lower_is_better):
    if lo is None:
        return f"{name} vs {ref}, {what}: {diff:+.4f} (one seed: no interval)"
    if lo <= 0 <= hi:
        return f"{name} vs {ref}, {what}: no significant difference ({diff:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}])"
    better = (diff < 0) == lower_is_better
    return (f"{name} vs {ref}, {what}: {name} is {'better' if better else 'worse'} by {abs(diff):.4f} "
            f"(95% CI [{lo:+.4f}, {hi:+.4f}])")


def compare(sweep, baseline=None, pairs=None):
    # -> (the table's markdown lines, one verdict line per pair, the variants ranked by val bpb). The pairs: each
    # variant against the best by val bpb (or the baseline), or the (variant, reference) pairs given
    variants = list(sweep)
    bpb = {v: {s: final_bpb(r) for s, r in runs.items()} for v, runs in sweep.items()}
    items = {v: {s: item_scores(r) for s, r in runs.items()} for v, runs in sweep.items()}
    sources = sorted({src for v in bpb for s in bpb[v] for src in bpb[v][s]} - {"all"})
    metrics = sorted({m for v in items for s in items[v] for m in items[v][s]})
    mean_bpb = {v: sum(b["all"] for b in bpb[v].values()) / len(bpb[v]) for v in variants}
    ranked = sorted(variants, key=lambda v: mean_bpb[v])
    ref = baseline or ranked[0]
    pairs = pairs or [(v, ref) for v in ranked if v != ref]
    for name in {ref, *(v for pair in pairs for v in pair)}:
        if name not in sweep:
            fail(f"{name!r} is not a variant here ({', '.join(variants)})")

    def cell(values):  # mean ± stderr
        if not values:
            return "-"
        m, se = mean_stderr(values)
        return f"{m:.4f}" + (f" ± {se:.4f}" if len(values) > 1 else "")

    head = ["variant", "seeds", "val bpb", *(f"bpb {s}" for s in sources), *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in ranked:
        seeds = sorted(bpb[v])
        row = [v, str(len(seeds)), cell([bpb[v][s]["all"] for s in seeds])]
        row += [cell([bpb[v][s][src] for s in seeds]) for src in sources]
        for m in metrics:
            row.append(cell([x for s in seeds for x in items[v][s].get(m, [])]))  # over items and seeds
        lines.append("| " + " | ".join(row) + " |")
    verdicts = []
    for v, ref in pairs:
        seeds = sorted(set(bpb[v]) & set(bpb[ref]))
        if not seeds:
            verdicts.append(f"{v} vs {ref}: no seed in common, nothing to pair")
            continue
        for src in ["all"] + [s for s in sources if all(s in bpb[x][k] for x in (v, ref) for k in seeds)]:
            diff, half = t_interval([bpb[v][s][src] - bpb[ref][s][src] for s in seeds])  # overall, then per source
            verdicts.append(verdict(v, ref, "val bpb" if src == "all" else f"bpb {src}", diff,
                                    None if half is None else diff - half, None if half is None else diff + half,
                                    lower_is_better=True))
        for m in metrics:
            a = [items[v][s].get(m) for s in seeds]
            b = [items[ref][s].get(m) for s in seeds]
            if any(x is None for x in a + b) or len({len(x) for x in a + b}) != 1:
                continue
            diff, lo, hi = bootstrap(a, b)
            verdicts.append(verdict(v, ref, m, diff, lo, hi, lower_is_better=False))
    return lines, verdicts, ranked


def plot(sweep, ranked, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for v in ranked:
        for ax, kind, key in ((axes[0], "evals", "val_bpb"), (axes[1], "train", "loss")):
            curves = [series(r[kind], key) for r in sweep[v].values()]
            steps = sorted(set.intersection(*(set(x) for x, _ in curves)))
            if not steps:
                continue
            ys = np.array([[dict(zip(x, y))[s] for s in steps] for x, y in curves])
            line, = ax.plot(steps, ys.mean(0), label=f"{v} ({len(curves)} seeds)")
            ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    for ax, title in zip(axes, ("validation bits per byte", "training loss")):
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    paths = [a for a in argv if not a.startswith("--")]
    if len(paths) != 1 or set(opts) - {"baseline", "out", "pairs"} or any(a.startswith("--") and "=" not in a
                                                                           for a in argv):
        fail("usage: python compare.py SWEEP_OUT_DIR [--baseline=VARIANT | --pairs=A:B,C:D] [--out=DIR]")
    pairs = [tuple(p.split(":", 1)) for p in opts["pairs"].split(",")] if "pairs" in opts else None
    if pairs and not all(len(p) == 2 and all(p) for p in pairs):
        fail(f"--pairs={opts['pairs']}: variant:reference pairs, separated by commas (branch_550:cosine_550)")
    sweep = load_sweep_runs(paths[0])
    lines, verdicts, ranked = compare(sweep, opts.get("baseline"), pairs)
    out = opts.get("out", paths[0])
    os.makedirs(out, exist_ok=True)
    try:
        plot(sweep, ranked, os.path.join(out, "curves.png"))
        picture = ["", "![curves](curves.png)"]
    except ImportError:
        picture = ["", "(no curves.png: pip install matplotlib)"]
    text = ["# " + os.path.basename(os.path.normpath(paths[0])), "", *lines, "", *(f"- {v}" for v in verdicts),
            *picture]
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(lines + [""] + verdicts))
    print(f"wrote {os.path.join(out, 'compare.md')}")


if __name__ == "__main__":
    main(sys.argv[1:])
