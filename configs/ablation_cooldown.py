# Hägele et al. 2024: a 1-sqrt cooldown beats a linear one (both 20% of the run, WSD, equal tokens):
#   python sweep.py configs/ablation_cooldown.py && python compare.py out/ablation_cooldown
base = "configs/quickstart.py"
out_dir = "out/ablation_cooldown"
seeds = [1, 2, 3]
common = {"max_steps": 1100, "decay_frac": 0.2}  # max_steps over the config's time_budget
variants = {"linear": {"decay_shape": "linear"}, "1-sqrt": {"decay_shape": "1-sqrt"}}
