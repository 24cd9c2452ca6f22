"""The OpenAI-compatible HTTP executor against a loopback OpenAI-compatible server.

The server is started per test on 127.0.0.1:<free port>.  Each test loads a
fault script (a queue consumed one entry per request); with the queue empty
the server answers normally.  Normal answers are deterministic so tests can
check them exactly: content is "echo: <last message content>", prompt_tokens is
the number of whitespace-separated words over all messages, completion_tokens
the number of words in the content.
"""
import collections
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import bar
from bar import EndpointError, OpenAIClient

SECRET = "sk-test-DO-NOT-LEAK-7f3a9c1e"
PATH = "/v1/chat/completions"


def words(text):
    return len(text.split())


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code, payload, extra_headers=()):
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(code)
            for name, value in extra_headers:
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):  # client already timed out
            pass

    def do_POST(self):
        st = self.server.state
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with st.lock:
            st.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                "body": body})
            fault = st.faults.popleft() if st.faults else None
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
        try:
            if st.delay:
                time.sleep(st.delay)
            self._answer(fault, body)
        finally:
            with st.lock:
                st.inflight -= 1

    def _answer(self, fault, body):
        if self.path != PATH:
            return self._send(404, {"error": "not found"})
        if fault == "429":
            return self._send(429, {"error": "rate limited"}, [("Retry-After", "0")])
        if fault == "429_long":
            return self._send(429, {"error": "rate limited"}, [("Retry-After", "3600")])
        if fault in ("500", "503"):
            return self._send(int(fault), {"error": "server trouble"})
        if fault == "401":
            return self._send(401, {"error": "invalid key " + str(self.headers.get("Authorization"))})
        if fault == "400_echo":  # a careless server echoing the auth header in its error body
            return self._send(400, {"error": "bad request", "auth": self.headers.get("Authorization")})
        if fault == "302":  # a redirect to elsewhere: following it would carry the key along
            return self._send(302, {"error": "moved"}, [("Location", "/stolen")])
        if fault == "malformed":
            return self._send(200, b"not json{")
        if fault == "malformed_echo":
            return self._send(200, ("not json{ " + str(self.headers.get("Authorization"))).encode())
        if fault == "slow":
            self.server.state.stop.wait(2.0)  # far beyond the client timeout; ends at teardown
        st = self.server.state
        content = st.reply(body) if st.reply else "echo: " + body["messages"][-1]["content"]
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
        if fault != "no_usage":
            reply["usage"] = {"prompt_tokens": sum(words(m["content"]) for m in body["messages"]),
                              "completion_tokens": words(content)}
        return self._send(200, reply)


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.faults = collections.deque()
        self.requests = []
        self.inflight = self.max_inflight = 0
        self.delay = 0.0
        self.reply = None  # body -> content, to play a game


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = State()
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    # poll_interval 0.02 s: shutdown() otherwise waits up to 0.5 s per test.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield httpd
    httpd.state.stop.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def make(server, sleeps=None, **kw):
    """Client whose sleeps are recorded, not slept, so retry tests take milliseconds."""
    record = sleeps.append if sleeps is not None else (lambda s: None)
    return OpenAIClient("large", server.base_url + "/", "test-model", sleep=record, **kw)


def msgs(text):
    return [{"role": "system", "content": "you are terse"}, {"role": "user", "content": text}]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now: connections are refused
    return port


def test_success_returns_text_and_usage_without_auth(server):
    text, prompt, completion = make(server, max_tokens=7, temperature=0.5).chat(msgs("two plus two"))
    assert (text, prompt, completion) == ("echo: two plus two", 3 + 3, 4)
    (req,) = server.state.requests
    assert req["path"] == PATH  # trailing '/' on base_url was stripped
    assert req["auth"] is None
    assert req["body"] == {"model": "test-model", "messages": msgs("two plus two"),
                           "max_tokens": 7, "temperature": 0.5}


def test_authorization_header_sent_when_env_var_set(server, monkeypatch):
    monkeypatch.setenv("MY_KEY", SECRET)
    assert make(server, api_key_env="MY_KEY").chat(msgs("hi"))[0] == "echo: hi"
    assert server.state.requests[0]["auth"] == f"Bearer {SECRET}"


def test_api_key_env_none_sends_no_header(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    make(server, api_key_env=None).chat(msgs("hi"))
    assert server.state.requests[0]["auth"] is None


def test_429_then_500_then_success_follows_backoff(server):
    server.state.faults.extend(["429", "500"])
    sleeps = []
    result = make(server, sleeps, backoff=1.0).chat(msgs("retry me"))
    assert result == ("echo: retry me", 5, 3)
    assert len(server.state.requests) == 3
    assert len(sleeps) == 2
    assert sleeps[0] == 0.0  # Retry-After: 0 honoured instead of backoff
    assert 2.0 <= sleeps[1] <= 2.2  # backoff * 2**1 plus at most 10 % jitter


def test_backoff_is_exponential_and_retry_after_capped(server):
    server.state.faults.extend(["503", "503", "503", "429_long"])
    sleeps = []
    make(server, sleeps, backoff=0.5, retries=4).chat(msgs("x"))
    for got, base in zip(sleeps[:3], [0.5, 1.0, 2.0]):
        assert base <= got <= base * 1.1
    assert sleeps[3] == 60.0  # Retry-After: 3600 capped


def test_persistent_503_gives_up_after_retries_plus_one(server):
    server.state.faults.extend(["503"] * 10)
    sleeps = []
    with pytest.raises(EndpointError) as err:
        make(server, sleeps, retries=3).chat(msgs("x"))
    assert len(server.state.requests) == 4
    assert len(sleeps) == 3
    msg = str(err.value)
    assert "503" in msg and "gave up after 3 retries" in msg and "'large'" in msg
    assert "\n" not in msg


def test_401_not_retried_and_names_env_var_not_key(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server.state.faults.append("401")
    with pytest.raises(EndpointError) as err:
        make(server).chat(msgs("x"))
    assert len(server.state.requests) == 1
    msg = str(err.value)
    assert "HTTP 401" in msg and "$OPENAI_API_KEY" in msg
    assert SECRET not in msg and SECRET[:12] not in msg


def test_401_without_key_says_none_was_sent(server):
    server.state.faults.append("401")
    with pytest.raises(EndpointError, match=r"no API key was sent: set \$OPENAI_API_KEY"):
        make(server).chat(msgs("x"))


def test_404_points_at_base_url(server):
    client = OpenAIClient("small", server.base_url.removesuffix("/v1"), "m", sleep=lambda s: None)
    with pytest.raises(EndpointError, match=r"HTTP 404: check executors\.small\.base_url"):
        client.chat(msgs("x"))
    assert len(server.state.requests) == 1


def test_malformed_json_raises_at_once(server):
    server.state.faults.append("malformed")
    with pytest.raises(EndpointError, match="malformed JSON") as err:
        make(server).chat(msgs("x"))
    assert "not json{" in str(err.value)
    assert len(server.state.requests) == 1


def test_missing_usage_raises(server):
    server.state.faults.append("no_usage")
    with pytest.raises(EndpointError, match="usage") as err:
        make(server).chat(msgs("x"))
    assert "cost would be unknown" in str(err.value)
    assert len(server.state.requests) == 1


def test_timeout_is_retried_then_succeeds(server):
    server.state.faults.append("slow")
    sleeps = []
    t0 = time.monotonic()
    result = make(server, sleeps, timeout=0.2, retries=2).chat(msgs("patience"))
    assert result == ("echo: patience", 4, 2)
    assert len(server.state.requests) == 2 and len(sleeps) == 1
    assert time.monotonic() - t0 < 1.5  # did not wait for the slow answer


def test_persistent_timeout_reports_timeout(server):
    server.state.faults.extend(["slow", "slow"])
    with pytest.raises(EndpointError, match=r"gave up after 1 retries \(last: timed out after 0.2 s\)"):
        make(server, timeout=0.2, retries=1).chat(msgs("x"))


def test_unreachable_names_url_and_config_key():
    port = free_port()
    sleeps = []
    client = OpenAIClient("large", f"http://127.0.0.1:{port}/v1", "m", retries=2,
                          sleep=sleeps.append)
    t0 = time.monotonic()
    with pytest.raises(EndpointError) as err:
        client.chat(msgs("x"))
    assert time.monotonic() - t0 < 1.0
    assert len(sleeps) == 2  # refused connections are retried, boundedly
    msg = str(err.value)
    assert f"cannot reach http://127.0.0.1:{port}/v1/chat/completions" in msg
    assert "Connection refused" in msg and "executors.large.base_url" in msg


def test_bad_url_scheme_is_a_config_error():
    with pytest.raises(EndpointError, match=r"bad URL .*executors\.large\.base_url"):
        OpenAIClient("large", "localhost:8000/v1", "m", sleep=lambda s: None).chat(msgs("x"))


def test_chat_many_keeps_order_and_runs_concurrently(server):
    server.state.delay = 0.1
    batch = [msgs(f"episode {i} " + "w " * i) for i in range(12)]
    t0 = time.monotonic()
    results = make(server, concurrency=4).chat_many(batch)
    elapsed = time.monotonic() - t0
    assert [r[0] for r in results] == [f"echo: episode {i} " + "w " * i for i in range(12)]
    assert [r[1] for r in results] == [3 + 2 + i for i in range(12)]
    assert 2 <= server.state.max_inflight <= 4  # parallel, but never above `concurrency`
    assert elapsed < 12 * 0.1  # faster than serial


def test_chat_many_raises_endpoint_error(server):
    server.state.faults.append("401")
    with pytest.raises(EndpointError, match="HTTP 401"):
        make(server, concurrency=2).chat_many([msgs(f"e{i}") for i in range(5)])


def test_chat_many_empty_batch(server):
    assert make(server).chat_many([]) == []
    assert server.state.requests == []


def test_key_never_leaks(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    client = make(server, timeout=0.2, retries=1)
    messages = []
    for faults in (["401"], ["400_echo"], ["503", "503"], ["malformed"], ["malformed_echo"],
                   ["no_usage"], ["slow", "slow"]):
        server.state.faults.clear()
        server.state.faults.extend(faults)
        with pytest.raises(EndpointError) as err:
            client.chat(msgs("x"))
        messages += [str(err.value), repr(err.value)]
    dead = OpenAIClient("large", f"http://127.0.0.1:{free_port()}/v1", "m", retries=0)
    with pytest.raises(EndpointError) as err:
        dead.chat(msgs("x"))
    messages += [str(err.value), repr(err.value)]
    # The server did receive the key, so its absence below is meaningful.
    assert all(r["auth"] == f"Bearer {SECRET}" for r in server.state.requests)
    assert any("<redacted>" in m for m in messages)  # echoed key was scrubbed, not passed on
    for text in messages + [repr(client), repr(dead)] + [repr(v) for v in vars(client).values()]:
        assert SECRET not in text
    assert repr(client) == (f"OpenAIClient(role='large', base_url='{server.base_url}/', "
                            f"model='test-model')")


def test_openai_executor_plays_babyai_steps_under_a_dollar_cap(server, monkeypatch):
    """A real-executor rollout end to end: the served 'model' answers in sloppy case, which parses to a
    valid action; an unparsable answer becomes BabyAI's fallback and counts as invalid; cost comes from
    the reported usage; a dollar cap is never exceeded although the exact usage is unknown in advance."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    answers = iter(["  Turn LEFT.", "toggle", "I think I should dance", "go   forward"] * 50)
    server.state.reply = lambda body: next(answers)
    cfg = bar.load_config(bar.Path(bar.__file__).with_name("configs") / "smoke.yaml")
    ex = cfg["executors"]
    for m in bar.MODEL_NAMES:
        ex[m].update(backend="openai", model="served", base_url=server.base_url, retries=0, concurrency=2)
    res = bar.rollout([("goto", 0, 0)], bar.StaticPolicy("always_large"), ex, {})
    r = res[0]
    sent = [q["body"] for q in server.state.requests]
    assert r["steps"] == len(sent) == 64 and r["invalid"] == 16            # every 4th reply unparsable
    expect = sum(sum(words(m["content"]) for m in b["messages"]) * ex["large"]["price_in"]
                 + words(a) * ex["large"]["price_out"] for b, a in zip(sent, ["  Turn LEFT.", "toggle",
                 "I think I should dance", "go   forward"] * 16)) / 1e6
    assert r["cost"] == pytest.approx(expect)
    assert "Valid actions now: turn left; turn right" in sent[0]["messages"][0]["content"]
    cap = r["cost"] / 3
    capped = bar.rollout([("goto", 0, 0)], bar.StaticPolicy("always_large"), ex, {}, bar.Budget(dollars=cap))[0]
    assert 0 < capped["cost"] <= cap and capped["budget_exhausted"]


def test_redirects_are_not_followed_so_the_key_stays_home(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server.state.faults.append("302")
    client = OpenAIClient("large", server.base_url, "m", retries=2, sleep=lambda s: None)
    with pytest.raises(EndpointError, match="302") as e:
        client.chat([{"role": "user", "content": "hi"}])
    assert [q["path"] for q in server.state.requests] == [PATH] and SECRET not in str(e.value)
