# Hägele et al. 2024: WSD with a 20% cooldown matches cosine at equal tokens. The quickstart at a fixed length
# (1,100 steps: its 200 s on a 2-core CPU with bf16), 3 seeds each:
#   python sweep.py configs/ablation_schedule.py && python compare.py out/ablation_schedule
base = "configs/quickstart.py"
out_dir = "out/ablation_schedule"
seeds = [1, 2, 3]
common = {"max_steps": 1100}  # over the config's time_budget: equal tokens, not equal time
variants = {"wsd_20": {"decay_frac": 0.2, "decay_shape": "linear"}, "cosine": {"schedule": "cosine"}}
