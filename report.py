"""
See a training run as pictures and one page of numbers: train.py's out_dir in, PNG plots and report.md out.

    python report.py out/quickstart                      # out/quickstart/report.png + out/quickstart/report.md
    python report.py out/run_a out/run_b out/run_c       # each run's report, plus compare.png / compare.md overlaid
    python report.py out/run_a out/run_b --out=reports/ablation   # where the comparison goes (default: report_compare)

The plots: train loss with validation loss, validation bits per byte per source, learning rate, gradient norm,
throughput, downstream evaluation scores (train.py's eval_tasks), and DPO's rewards when the run has them. report.md
holds the run's config, its data mixture per stage, tokens seen, wall time, tokens/s and MFU, the final validation and
evaluation numbers, and the samples it printed at the end. Needs matplotlib (pip install matplotlib).
"""
import ast
import json
import math
import os
import re
import statistics
import sys
import time


def fail(msg):
    sys.exit(f"error: {msg}")


def load_run(path):
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isdir(path):
        fail(f"{path}: no such directory (pass train.py out_dirs)")
    if not os.path.isfile(metrics):
        fail(f"{path}: no metrics.jsonl; is it a train.py out_dir? (it writes metrics.jsonl, log.txt, config.json)")
    records = []
    with open(metrics) as f:
        for i, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if line.strip():  # a run killed mid-write leaves a torn last line: use what came before
                    print(f"warning: {metrics}:{i}: not JSON, skipped", file=sys.stderr)
    config = {}
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    log = ""
    if os.path.isfile(os.path.join(path, "log.txt")):
        with open(os.path.join(path, "log.txt"), errors="replace") as f:
            log = f.read()
    train = [r for r in records if "loss" in r and r.get("loss") is not None]
    evals = [r for r in records if "val_loss" in r]
    return dict(path=path, name=os.path.basename(os.path.normpath(path)), config=config, log=log, train=train,
                evals=evals, mtime=os.path.getmtime(metrics))


def series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def draw(ax, rows, key, *fmt, **kw):
    # one line of one metric, only when the run has it (no empty legend entries)
    x, y = series(rows, key)
    if x:
        ax.plot(x, y, *fmt, **kw)


def stage_starts(run):
    return [int(m) for m in re.findall(r"^stage \d+ begins at step (\d+)", run["log"], re.M)]


def eval_keys(run):
    # downstream scores: eval/<task>/<metric>, without their stderr
    keys = {k for r in run["evals"] for k in r if k.startswith("eval/") and not k.endswith("_stderr")}
    return sorted(keys)


# ------------------------------------------------------------------------------------------------------------ plots
PANELS = ["loss", "bpb", "lr", "grad_norm", "throughput", "evals", "dpo"]


def panels_for(runs):
    has = {"loss": True, "lr": True, "grad_norm": True,
           "bpb": any("val_bpb" in r for run in runs for r in run["evals"]),
           "throughput": any(r.get("tokens_per_s") for run in runs for r in run["train"]),
           "evals": any(eval_keys(run) for run in runs),
           "dpo": any("rewards/margins" in r for run in runs for r in run["train"])}
    return [p for p in PANELS if has[p]]


def plot(runs, out_png):
    try:
        import matplotlib
    except ImportError:
        fail("report.py draws with matplotlib, which is not installed: pip install matplotlib")
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    panels = panels_for(runs)
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    multi = len(runs) > 1
    for ax, panel in zip(axes.flat, panels):
        for i, run in enumerate(runs):
            c, label = colors[i % len(colors)], run["name"]
            if panel == "loss":
                draw(ax, run["train"], "loss", color=c, alpha=0.5 if not multi else 0.8, lw=1,
                     label=f"{label} train" if multi else "train")
                draw(ax, run["evals"], "val_loss", "o-", color=c if multi else "black", ms=3, lw=1.5,
                     label=f"{label} val" if multi else "val")
                ax.set_title("loss (dotted: a new data stage)")
            elif panel == "bpb":
                sources = sorted({k.split("/", 1)[1] for r in run["evals"] for k in r if k.startswith("val_bpb/")})
                draw(ax, run["evals"], "val_bpb", "o-", color=c, ms=3, lw=2, label=f"{label} all" if multi else "all")
                for j, src in enumerate(sources):
                    draw(ax, run["evals"], f"val_bpb/{src}", ["--", ":", "-."][j % 3], lw=1,
                         color=c if multi else colors[(j + 1) % len(colors)], label=f"{label} {src}" if multi else src)
                ax.set_title("validation bits per byte")
            elif panel in ("lr", "grad_norm", "throughput"):
                draw(ax, run["train"], {"throughput": "tokens_per_s"}.get(panel, panel), color=c, lw=1, label=label)
                ax.set_title({"lr": "learning rate", "grad_norm": "gradient norm (before clipping)",
                              "throughput": "tokens / s"}[panel])
            elif panel == "evals":
                for j, k in enumerate(eval_keys(run)):
                    draw(ax, run["evals"], k, "o" + ["-", "--", ":", "-."][j % 4] if multi else "o-", ms=3, lw=1,
                         color=c if multi else colors[j % len(colors)], label=f"{label} {k[5:]}" if multi else k[5:])
                ax.set_title("downstream evaluation")
            elif panel == "dpo":
                for j, k in enumerate(("rewards/margins", "rewards/accuracies")):
                    draw(ax, run["train"], k, ["-", "--"][j], color=c, lw=1, label=f"{label} {k[8:]}" if multi else k[8:])
                ax.set_title("DPO rewards (train batches)")
            if panel in ("loss", "bpb"):
                for step in stage_starts(run):
                    ax.axvline(step, color=c if multi else "gray", ls=":", lw=1)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if multi or panel not in ("lr", "grad_norm", "throughput"):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(", ".join(run["name"] for run in runs))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- numbers
def summary(run):
    cfg, train, evals = run["config"], run["train"], run["evals"]
    # steps done: the last train record is step N-1, the final evaluation is at step N
    out = {"steps": max([r["step"] + 1 for r in train[-1:]] + [r["step"] for r in evals[-1:]], default=None),
           "tokens": (train[-1].get("tokens") or None) if train else None}  # DPO counts pairs, not tokens: None
    start = re.match(r"=== (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", run["log"])
    if start:  # from the log's first line to the last metrics record written
        out["wall_s"] = run["mtime"] - time.mktime(time.strptime(start.group(1), "%Y-%m-%d %H:%M:%S"))
    tps = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    mfu = [r["mfu"] for r in train if r.get("mfu")]
    out["tokens_per_s"] = statistics.median(tps) if tps else None
    out["mfu"] = statistics.median(mfu) if mfu else None
    out["final"] = evals[-1] if evals else {}
    device = re.search(r"world_size (\d+), device (\S+)", run["log"])
    # the resolved dtype: "dtype auto -> bfloat16: ..." or "dtype float32 (set in the config)", not the code's line
    dtype = re.search(r"^dtype (?:auto -> )?([a-z]\w+)", run["log"], re.M)
    out["device"] = f"{device.group(2)} x {device.group(1)}" if device else cfg.get("device")
    out["dtype"] = dtype.group(1) if dtype else cfg.get("dtype")
    params = re.search(r"^model: ([\d,]+) parameters", run["log"], re.M)
    out["params"] = params.group(1) if params else None
    n_prompts = len(cfg.get("end_prompts") or [])
    samples = re.findall(r"^sample: (.*)$", run["log"], re.M)
    out["samples"] = samples[-n_prompts:] if n_prompts else []
    return out


def fmt(x, nd=4):
    return "-" if x is None else f"{x:,.{nd}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def run_markdown(run, png_name):
    cfg, s = run["config"], summary(run)
    lines = [f"# {run['name']}", "", f"![plots]({png_name})", "", "## Run", "", "| | |", "|---|---|"]
    model = cfg.get("model", "?") + (f" with {cfg['model_overrides']}" if cfg.get("model_overrides") else "")
    rows = [("objective", cfg.get("objective", "pretrain")), ("model", model), ("parameters", s["params"]),
            ("init_from", cfg.get("init_from") or "scratch"), ("data_dir", cfg.get("data_dir")),
            ("steps", s["steps"]), ("tokens per step", cfg.get("total_batch_tokens")), ("tokens seen", s["tokens"]),
            ("schedule", f"{cfg.get('schedule', '?')}, peak lr {cfg.get('learning_rate')}, warmup "
                         f"{cfg.get('warmup_steps')} steps, decay {cfg.get('decay_frac')} ({cfg.get('decay_shape')})"),
            ("wall time", f"{s['wall_s'] / 60:.1f} min" if s.get("wall_s") else "-"),
            ("tokens/s (median of logged steps)", fmt(s["tokens_per_s"], 0)),
            ("MFU (median)", f"{100 * s['mfu']:.1f}%" if s["mfu"] else "-"),
            ("dtype / device", f"{s['dtype']} / {s['device']}")]
    lines += [f"| {k} | {fmt(v) if not isinstance(v, str) else v} |" for k, v in rows]
    lines += ["", "## Data mixture per stage", ""]
    stages = cfg.get("stages")
    if not stages:
        lines.append("One stage: every source of data_dir at its share of tokens.")
    else:
        lines += ["| stage | starts at token | mixture |", "|---|---|---|"]
        for i, st in enumerate(stages):
            mix = ", ".join(f"{k} {v:.0%}" for k, v in st.get("weights", {}).items())
            extra = {k: v for k, v in st.items() if k not in ("start", "weights")}
            lines.append(f"| {i} | {st.get('start', 0):,} | {mix}{' ' + str(extra) if extra else ''} |")
    final = s["final"]
    lines += ["", f"## Final evaluation (step {final.get('step', '-')})", ""]
    if final:
        lines += ["| metric | value | stderr |", "|---|---|---|"]
        for k, v in final.items():
            if k != "step" and not k.endswith("_stderr") and isinstance(v, (int, float)):
                lines.append(f"| {k} | {v:.4f} | {fmt(final.get(k + '_stderr'))} |")
    else:
        lines.append("No evaluation recorded.")
    if s["samples"]:
        lines += ["", "## Samples at the end", ""]
        for smp in s["samples"]:
            try:  # train.py logs each sample as a Python string literal (prompt + continuation)
                text = ast.literal_eval(smp)
            except (ValueError, SyntaxError):
                text = smp
            lines += ["```", text, "```", ""]
    return "\n".join(lines) + "\n"


def compare_markdown(runs, png_name):
    keys = ["val_loss", "val_bpb"] + sorted({k for run in runs for k in (run["evals"][-1] if run["evals"] else {})
                                            if k.startswith("eval/") and not k.endswith("_stderr")})
    lines = ["# Comparison", "", f"![plots]({png_name})", "",
             "| run | steps | tokens | wall min | tokens/s | " + " | ".join(keys) + " |",
             "|---|---|---|---|---|" + "---|" * len(keys)]
    for run in runs:
        s = summary(run)
        vals = [fmt(s["final"].get(k)) for k in keys]
        wall = f"{s['wall_s'] / 60:.1f}" if s.get("wall_s") else "-"
        lines.append(f"| {run['name']} | {fmt(s['steps'])} | {fmt(s['tokens'])} | {wall} | {fmt(s['tokens_per_s'], 0)} | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def main(argv):
    paths = [a for a in argv if not a.startswith("--")]
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    unknown = [a for a in argv if a.startswith("--") and ("=" not in a or a[2:].split("=")[0] not in ("out",))]
    if unknown:
        fail(f"unknown option(s) {unknown}; usage: python report.py RUN_DIR [RUN_DIR ...] [--out=DIR]")
    if not paths:
        fail("usage: python report.py RUN_DIR [RUN_DIR ...] [--out=DIR] (train.py out_dirs)")
    runs = [load_run(p) for p in paths]
    for run in runs:
        if not run["train"] and not run["evals"]:
            fail(f"{run['path']}: metrics.jsonl has no records yet")
        plot([run], os.path.join(run["path"], "report.png"))
        with open(os.path.join(run["path"], "report.md"), "w") as f:
            f.write(run_markdown(run, "report.png"))
        print(f"wrote {os.path.join(run['path'], 'report.md')} and report.png")
    if len(runs) > 1:
        out = opts.get("out", "report_compare")
        os.makedirs(out, exist_ok=True)
        plot(runs, os.path.join(out, "compare.png"))
        with open(os.path.join(out, "compare.md"), "w") as f:
            f.write(compare_markdown(runs, "compare.png"))
        print(f"wrote {os.path.join(out, 'compare.md')} and compare.png")


if __name__ == "__main__":
    main(sys.argv[1:])
