# sweep.py: a grid of train.py runs x seeds, each in its own out_dir; finished runs skipped, interrupted ones resumed,
# one run per Slurm array task; bad sweep files are one-line errors. compare.py on the sweep: the table, the paired
# intervals and verdicts, the curves; its statistics on numbers whose answer is known.
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import compare
import sweep
from conftest import ROOT, records, run

SWEEP = """
base = {base!r}
out_dir = {out!r}
seeds = [1, 2]
common = {{"max_steps": 4, "warmup_steps": 1, "eval_interval": 2, "checkpoint_interval": 2, "swa": False,
          "sample_prompt": ""}}
variants = {{"base": {{}}, "low_lr": {{"learning_rate": 1e-3}}}}
"""


def sweep_cmd(path, *args, env=None):
    return subprocess.run([sys.executable, "sweep.py", str(path), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow
def test_a_sweep_runs_each_variant_and_seed_once_and_resumes(tiny_config, tmp_path):
    out = tmp_path / "sweep"
    path = tmp_path / "s.py"
    path.write_text(SWEEP.format(base=tiny_config, out=str(out)))
    listed = sweep_cmd(path, "--list").stdout.splitlines()
    assert [line.split()[1] for line in listed] == ["new"] * 4
    assert [line.split()[2] for line in listed] == ["base", "base", "low_lr", "low_lr"]
    # an interrupted run: two of its four steps done, a checkpoint left (as a preempted job leaves it)
    first = str(out / "base" / "seed1")
    run([tiny_config, f"--out_dir={first}", "--max_steps=4", "--warmup_steps=1", "--eval_interval=2",
         "--checkpoint_interval=2", "--swa=False", "--sample_prompt=''", "--seed=1"])
    os.remove(os.path.join(first, "ckpt_4.pt"))
    with open(os.path.join(first, "metrics.jsonl")) as f:
        kept = [line for line in f if json.loads(line)["step"] <= 2]
    with open(os.path.join(first, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
    assert sweep.state(first) == "started"
    # one array task, then the whole sweep: the started run resumes, the finished one is skipped
    p = sweep_cmd(path, env={**os.environ, "SLURM_ARRAY_TASK_ID": "3"})
    assert p.returncode == 0 and "low_lr seed 2: starting" in p.stdout, p.stderr[-2000:]
    p = sweep_cmd(path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "base seed 1: resuming" in p.stdout and "low_lr seed 2: done already" in p.stdout
    assert [line.split()[1] for line in sweep_cmd(path, "--list").stdout.splitlines()] == ["done"] * 4
    for variant, lr in (("base", 3e-3), ("low_lr", 1e-3)):
        for seed in (1, 2):
            d = out / variant / f"seed{seed}"
            cfg = json.loads((d / "config.json").read_text())
            assert (cfg["seed"], cfg["learning_rate"], cfg["max_steps"]) == (seed, lr, 4)
            assert [r["step"] for r in records(str(d)) if "val_loss" in r][-1] == 4
    # the seeds differ, the variants differ, and a run of the sweep equals the same run by hand
    loss = lambda v, s: [r["loss"] for r in records(str(out / v / f"seed{s}")) if "loss" in r]  # noqa: E731
    assert loss("base", 1) != loss("base", 2) and loss("base", 2) != loss("low_lr", 2)
    again = sweep_cmd(path)
    assert again.stdout.count("done already") == 4

    # compare.py: every variant's numbers over its seeds, the pairs' intervals, a verdict each, the curves
    p = subprocess.run([sys.executable, "compare.py", str(out), f"--out={tmp_path / 'cmp'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| variant | seeds | val bpb | bpb code | bpb math | bpb prose |" in md and "sums/acc" in md
    assert md.count("| 2 |") == 2  # two variants, two seeds each
    verdicts = [line for line in md.splitlines() if line.startswith("- ")]
    assert len(verdicts) == 5 and all(" vs " in v and "95% CI" in v for v in verdicts), verdicts  # bpb, 3 sources, acc
    assert [v.split(", ")[1].split(":")[0] for v in verdicts] == ["val bpb", "bpb code", "bpb math", "bpb prose",
                                                                   "sums/acc"]
    pytest.importorskip("matplotlib")
    import matplotlib.image
    img = matplotlib.image.imread(str(tmp_path / "cmp" / "curves.png"))
    assert img.shape[0] > 300 and img[..., :3].std() > 0.05
    for args, message in (([str(tmp_path / "nope")], "no such directory"), ([str(out / "base")], "needs two"),
                          ([str(out), "--baseline=nope"], "not a variant")):
        p = subprocess.run([sys.executable, "compare.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 1 and message in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def test_the_statistics_on_known_answers():
    rng = np.random.default_rng(0)
    same = (rng.random((3, 300)) < 0.5).astype(float)
    diff, lo, hi = compare.bootstrap(same, same)
    assert diff == lo == hi == 0.0
    better = np.minimum(same + (rng.random((3, 300)) < 0.3), 1.0)  # ~15 points more on every seed
    diff, lo, hi = compare.bootstrap(better, same)
    assert 0.1 < lo < diff < hi < 0.22
    noisy = (rng.random((3, 300)) < 0.5).astype(float)  # another draw of the same coin
    diff, lo, hi = compare.bootstrap(noisy, same)
    assert lo < 0 < hi and "no significant difference" in compare.verdict("a", "b", "acc", diff, lo, hi, False)
    mean, half = compare.t_interval([1.0, 2.0, 3.0])  # sd 1, n 3: 4.303 / sqrt(3)
    assert mean == 2.0 and half == pytest.approx(4.303 / 3 ** 0.5)
    assert "a is better by 0.0200" in compare.verdict("a", "b", "val bpb", -0.02, -0.03, -0.01, True)
    assert "a is worse by 0.0200" in compare.verdict("a", "b", "acc", -0.02, -0.03, -0.01, False)


def test_grid_names_and_the_errors_a_user_can_make(tmp_path):
    path = tmp_path / "g.py"
    path.write_text(f'base = "configs/quickstart.py"\nout_dir = {str(tmp_path / "o")!r}\n'
                    'grid = {"decay_shape": ["linear", "1-sqrt"], "decay_frac": [0.1, 0.2]}\nseeds = [1, 2, 3]\n')
    runs = sweep.runs(sweep.load_sweep(str(path)))
    assert len(runs) == 12 and runs[0][0] == "decay_shape=linear,decay_frac=0.1"
    assert runs[0][3][:3] == ["configs/quickstart.py", "--decay_shape='linear'", "--decay_frac=0.1"]
    assert runs[-1][2].endswith(os.path.join("decay_shape=1-sqrt,decay_frac=0.2", "seed3"))
    path.write_text('base = "configs/quickstart.py"\nout_dir = "o"\nseeds = [4, 5]\n'
                    'variants = {"branch": {"decay_from": "o/stable/seed{seed}/ckpt_600.pt", "decay_steps": 150}}\n')
    assert [r[3][1] for r in sweep.runs(sweep.load_sweep(str(path)))] == [
        "--decay_from='o/stable/seed4/ckpt_600.pt'", "--decay_from='o/stable/seed5/ckpt_600.pt'"]
    bad = {
        'base = "configs/quickstart.py"\nout_dir = "o"\n': "give either variants",
        'out_dir = "o"\nvariants = {"a": {}}\n': "no base",
        'base = "configs/nope.py"\nout_dir = "o"\nvariants = {"a": {}}\n': "is not a file",
        'base = "configs/quickstart.py"\nout_dir = "o"\nvariants = {"a": {}}\nlr = 3\n': "unknown key 'lr'",
        'base = "configs/quickstart.py"\nout_dir = "o"\nvariants = {"a": {"seed": 3}}\n': "seed and out_dir",
        'base = "configs/quickstart.py"\nout_dir = "o"\nvariants = {"a": {}}\nseeds = []\n': "non-empty list",
        'import os\n': "only assignments",
    }
    for text, message in bad.items():
        path.write_text(text)
        p = sweep_cmd(path, "--list")
        assert p.returncode == 1 and message in p.stderr and "Traceback" not in p.stderr, (text, p.stderr)
    path.write_text('base = "configs/quickstart.py"\nout_dir = "o"\nvariants = {"a": {}}\n')
    p = sweep_cmd(path, "--task=5")
    assert p.returncode == 1 and "runs 0-0" in p.stderr
    p = sweep_cmd(path, "--colour")
    assert p.returncode == 1 and "usage" in p.stderr


@pytest.mark.parametrize("name", ["ablation_schedule", "ablation_cooldown", "ablation_math", "ablation_branches"])
def test_the_shipped_ablations_are_valid_train_configs(name):
    # each run's arguments pass train.py's own configurator (its keys, types and exclusive options)
    from plan import train_config
    spec = sweep.load_sweep(os.path.join(ROOT, "configs", f"{name}.py"))
    todo = sweep.runs(spec)
    assert len({d for _, _, d, _ in todo}) == len(todo) == 3 * len(spec["variants"])  # 3 seeds, each its own out_dir
    for variant, seed, _, args in todo:
        cfg = train_config(args)
        assert cfg["seed"] == seed
        if cfg["decay_from"]:  # a cooldown branch of the same seed's stable run: its length comes from there
            assert f"/stable/seed{seed}/ckpt_" in cfg["decay_from"] and cfg["decay_steps"] > 0
        else:
            assert cfg["max_steps"] <= 1100 and cfg["time_budget"] == 0


def test_compare_pairs_chosen_variants():
    # runs as report.load_run gives them, without checkpoints (no eval_tasks): the bpb table and the chosen pairs only
    def fake(bpb, code):
        return dict(path="x", name="x", config={}, log="", train=[],
                    evals=[{"step": 10, "val_bpb": bpb, "val_bpb/code": code}])
    sweep_runs = {"branch": {1: fake(1.30, 1.5), 2: fake(1.31, 1.6), 3: fake(1.315, 1.7)},
                  "separate": {1: fake(1.30, 1.4), 2: fake(1.32, 1.5), 3: fake(1.31, 1.6)},
                  "long": {1: fake(1.10, 1.2), 2: fake(1.11, 1.3), 3: fake(1.12, 1.4)}}
    lines, verdicts, ranked = compare.compare(sweep_runs, pairs=[("branch", "separate")])
    assert ranked == ["long", "branch", "separate"] and len(lines) == 5
    assert len(verdicts) == 2 and verdicts[0].startswith("branch vs separate, val bpb: no significant difference")
    assert verdicts[1].startswith("branch vs separate, bpb code: branch is worse by 0.1000")  # the same 0.1 per seed
    lines, verdicts, _ = compare.compare(sweep_runs)  # each against the best
    assert [v.split(",")[0] for v in verdicts] == ["branch vs long"] * 2 + ["separate vs long"] * 2
    assert all("is worse by" in v for v in verdicts)
