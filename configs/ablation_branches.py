# Hägele et al. 2024: cooldown branches from one constant-LR run give the loss-vs-length curve of separate (cosine)
# runs, for a fraction of the compute. One WSD run of 1,100 steps (stable to step 880, checkpoints every 220),
# branches from its steps 440 and 660 that cool down over 20% of their length (550 and 825 steps in all), and cosine
# runs of 550, 825 and 1,100 steps. One data mixture throughout, so that every run sees the same data at each step.
# Compute: 1,100 + 110 + 165 steps for the WSD curve, 550 + 825 + 1,100 for the cosine one.
#   python sweep.py configs/ablation_branches.py        # in order: the stable runs first (the branches start from them)
#   python compare.py out/ablation_branches --pairs=branch_550:cosine_550,branch_825:cosine_825,stable:cosine_1100
base = "configs/quickstart.py"
out_dir = "out/ablation_branches"
seeds = [1, 2, 3]
common = {"stages": [{"start": 0, "weights": {"prose": 0.45, "code": 0.45, "math": 0.10}}], "keep_checkpoints": 10}
variants = {
    "stable": {"max_steps": 1100, "decay_frac": 0.2, "checkpoint_interval": 220},
    "branch_550": {"decay_from": "out/ablation_branches/stable/seed{seed}/ckpt_440.pt", "decay_steps": 110},
    "branch_825": {"decay_from": "out/ablation_branches/stable/seed{seed}/ckpt_660.pt", "decay_steps": 165},
    "cosine_550": {"max_steps": 550, "schedule": "cosine"},
    "cosine_825": {"max_steps": 825, "schedule": "cosine"},
    "cosine_1100": {"max_steps": 1100, "schedule": "cosine"},
}
