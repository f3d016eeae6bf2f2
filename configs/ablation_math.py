# SmolLM2 (§4): upsampling math in the late stage raises the math score at little cost to the other sources. The
# quickstart's second half at 30% math (its default) against the first half's 10% kept to the end:
#   python sweep.py configs/ablation_math.py && python compare.py out/ablation_math --baseline=math_10
base = "configs/quickstart.py"
out_dir = "out/ablation_math"
seeds = [1, 2, 3]
common = {"max_steps": 1100}  # over the config's time_budget: equal tokens, not equal time
variants = {"math_30": {}, "math_10": {"stages": [{"start": 0, "weights": {"prose": 0.45, "code": 0.45, "math": 0.10}}]}}
