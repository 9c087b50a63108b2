"""The built-in simulator, spoken to over real loopback sockets by the official OpenAI SDK."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tokengateway.simulator import SimOptions, create_server, parse_sim_args

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ALIAS = "llama"
TUTORIAL_ARGS = ["--model", MODEL, "--port", "8000"]


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class _Running:
    """A simulator served by uvicorn in a background thread on a socket bound here."""

    def __init__(self, opts: SimOptions) -> None:
        self.sock = _listening_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = create_server(opts, fd=self.sock.fileno())
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 5
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("simulator did not start")
            time.sleep(0.005)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def start() -> Iterator[Callable[..., _Running]]:
    """Start simulators with given options; every one is stopped when the module ends."""
    running: list[_Running] = []

    def _start(**kwargs: Any) -> _Running:
        kwargs.setdefault("model", MODEL)
        sim = _Running(SimOptions(**kwargs))
        running.append(sim)
        return sim

    yield _start
    for sim in running:
        sim.stop()


@pytest.fixture(scope="module")
def echo(start: Callable[..., _Running]) -> _Running:
    return start(mode="echo", served_model_names=[ALIAS], max_model_len=128)


@pytest.fixture(scope="module")
def rand(start: Callable[..., _Running]) -> _Running:
    return start(mode="random", seed=7)


def _post(sim: _Running, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{sim.url}{path}", timeout=5, **kwargs)


# --- /v1/models ---------------------------------------------------------------------------------


def test_models_lists_model_and_served_names(echo: _Running) -> None:
    models = echo.client().models.list()
    assert [m.id for m in models.data] == [MODEL, ALIAS]
    assert all(m.object == "model" and m.owned_by == "tokengateway-sim" for m in models.data)
    raw = httpx.get(f"{echo.url}/v1/models").json()
    assert raw["object"] == "list"
    assert [m["root"] for m in raw["data"]] == [MODEL, MODEL]
    assert echo.client().models.retrieve(ALIAS).id == ALIAS


# --- chat completions, echo mode: exact words and usage -----------------------------------------


def test_tutorial_request_is_answered_with_word_usage(echo: _Running) -> None:
    # The tutorial's body, including its non-OpenAI "usage": true, which must be ignored.
    resp = _post(
        echo,
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is Kubernetes?"}],
            "max_tokens": 100,
            "stream": False,
            "usage": True,
        },
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "What is Kubernetes?"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_chat_echo_counts_all_messages_and_echoes_last_user(echo: _Running) -> None:
    completion = echo.client().chat.completions.create(
        model=ALIAS,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "first question here"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": [{"type": "text", "text": "Explain cloud native"}]},
        ],
    )
    assert completion.model == ALIAS
    assert completion.choices[0].message.content == "Explain cloud native"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 3)
    assert completion.usage.total_tokens == 14


@pytest.mark.parametrize(
    ("limits", "content", "finish"),
    [
        ({"max_tokens": 2}, "one two", "length"),
        ({"max_tokens": 4}, "one two three four", "length"),  # all of max_tokens used
        ({"max_tokens": 5}, "one two three four", "stop"),
        ({"max_tokens": 5, "max_completion_tokens": 1}, "one", "length"),  # the newer name wins
    ],
)
def test_chat_echo_honours_max_tokens(
    echo: _Running, limits: dict[str, int], content: str, finish: str
) -> None:
    completion = echo.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "one two three four"}], **limits
    )
    assert completion.choices[0].message.content == content
    assert completion.choices[0].finish_reason == finish
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(content.split())


# --- text completions -----------------------------------------------------------------------------


def test_completions_echo_string_and_list_prompt(echo: _Running) -> None:
    client = echo.client()
    one = client.completions.create(model=MODEL, prompt="say this back please", max_tokens=3)
    assert one.object == "text_completion"
    assert one.id.startswith("cmpl-")
    assert one.choices[0].text == "say this back"
    assert one.choices[0].finish_reason == "length"
    assert one.usage is not None
    assert (one.usage.prompt_tokens, one.usage.completion_tokens, one.usage.total_tokens) == (
        4,
        3,
        7,
    )
    many = client.completions.create(model=MODEL, prompt=["alpha beta", "gamma"])
    assert many.choices[0].text == "alpha beta gamma"
    assert many.usage is not None
    assert (many.usage.prompt_tokens, many.usage.completion_tokens) == (3, 3)


# --- random mode ----------------------------------------------------------------------------------


def test_random_chat_respects_max_tokens(rand: _Running) -> None:
    client = rand.client()
    seen = set()
    for _ in range(25):
        completion = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=6
        )
        text = completion.choices[0].message.content or ""
        usage = completion.usage
        assert usage is not None
        assert usage.prompt_tokens == 4
        assert usage.completion_tokens == len(text.split())
        assert 1 <= usage.completion_tokens <= 6
        assert usage.total_tokens == 4 + usage.completion_tokens
        expected = "length" if usage.completion_tokens == 6 else "stop"
        assert completion.choices[0].finish_reason == expected
        seen.add(expected)
    assert seen == {"stop", "length"}


def test_random_without_max_tokens_fits_the_context_window(start: Callable[..., _Running]) -> None:
    sim = start(mode="random", seed=3, max_model_len=12)
    client = sim.client()
    for _ in range(20):
        completion = client.completions.create(model=MODEL, prompt="four words of prompt")
        usage = completion.usage
        assert usage is not None
        assert usage.completion_tokens == len(completion.choices[0].text.split())
        assert 1 <= usage.completion_tokens <= 12 - 4


# --- streaming ------------------------------------------------------------------------------------


def test_chat_stream_with_include_usage(echo: _Running) -> None:
    stream = echo.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream these five words please"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == "stream these five words"
    assert [d for d in deltas if d] == ["stream", " these", " five", " words"]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish == [None] * (len(finish) - 1) + ["length"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 4)
    assert last.usage.total_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_raw_events_end_with_done_and_no_usage_unless_asked(echo: _Running) -> None:
    body = {"model": MODEL, "prompt": "a b c", "stream": True}
    with httpx.stream("POST", f"{echo.url}/v1/completions", json=body, timeout=5) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream"
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert "usage" not in raw
    assert len(events) == 3 + 1 + 1  # one per word, the finish chunk, [DONE]


def test_completions_stream_with_usage_via_sdk(echo: _Running) -> None:
    stream = echo.client().completions.create(
        model=MODEL, prompt="x y", stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "x y"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 4


# --- latency --------------------------------------------------------------------------------------


def test_time_to_first_token_and_inter_token_latency(start: Callable[..., _Running]) -> None:
    sim = start(mode="echo", time_to_first_token_ms=60, inter_token_latency_ms=20)
    client = sim.client()
    began = time.monotonic()
    client.completions.create(model=MODEL, prompt="one two three four five six")
    assert time.monotonic() - began >= 0.06 + 5 * 0.02 - 0.005

    began = time.monotonic()
    stream = client.completions.create(model=MODEL, prompt="one two", stream=True)
    first = next(iter(stream))
    assert first.choices[0].text == "one"
    assert time.monotonic() - began >= 0.06 - 0.005
    rest = list(stream)
    assert time.monotonic() - began >= 0.06 + 0.02 - 0.005
    assert rest[-1].choices[0].finish_reason == "stop"


def test_inherited_socket_has_no_delayed_ack_stall(echo: _Running) -> None:
    # Headers and body are two writes: without TCP_NODELAY each response waits ~40 ms.
    body = {"model": MODEL, "prompt": "ping"}
    with httpx.Client(base_url=echo.url) as client:
        client.post("/v1/completions", json=body)
        times = []
        for _ in range(9):
            began = time.perf_counter()
            client.post("/v1/completions", json=body)
            times.append(time.perf_counter() - began)
    assert sorted(times)[4] < 0.02


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_model_is_404_with_llm_d_envelope(echo: _Running) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        echo.client().chat.completions.create(
            model="gpt-nope", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.status_code == 404
    assert info.value.body == {
        "message": "The model `gpt-nope` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    with pytest.raises(openai.NotFoundError):
        echo.client().completions.create(model="gpt-nope", prompt="hi")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": MODEL}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [1]}, "messages"),
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": 5}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "5"}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 1.5}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "stream": "yes"}, "stream"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": True},
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "a"}],
                "max_completion_tokens": -1,
            },
            "max_completion_tokens",
        ),
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(
    echo: _Running, path: str, body: dict[str, Any], param: str
) -> None:
    resp = _post(echo, path, json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "BadRequestError"
    assert error["code"] == 400
    assert error["param"] == param
    assert param in error["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'"text"', b""])
def test_body_that_is_not_a_json_object_is_400(echo: _Running, content: bytes) -> None:
    resp = _post(echo, "/v1/chat/completions", content=content)
    assert resp.status_code == 400
    assert resp.json()["error"]["message"].startswith("Failed to read and parse request body")


def test_context_window_overflow_is_400(echo: _Running) -> None:
    client = echo.client()
    prompt = " ".join(["w"] * 124)  # max_model_len is 128
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
    assert info.value.status_code == 400
    assert isinstance(info.value.body, dict)
    assert info.value.body["param"] == "max_tokens"
    assert info.value.body["message"].startswith(
        "This model's maximum context length is 128 tokens. However, you requested 129 tokens "
        "(124 in the prompt, 5 in the completion)."
    )
    ok = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    assert ok.usage is not None
    assert ok.usage.total_tokens == 128
    with pytest.raises(openai.BadRequestError):  # without max_tokens one completion token is due
        client.completions.create(model=MODEL, prompt=" ".join(["w"] * 128))


def test_unknown_path_and_wrong_method(echo: _Running) -> None:
    missing = httpx.get(f"{echo.url}/v1/embeddings")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "NotFoundError"
    wrong = httpx.get(f"{echo.url}/v1/chat/completions")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["code"] == 405


# --- parse_sim_args -------------------------------------------------------------------------------


def test_parse_tutorial_args() -> None:
    opts, warnings = parse_sim_args(TUTORIAL_ARGS)
    assert opts == SimOptions(model=MODEL, port=8000)
    assert (opts.mode, opts.max_model_len, opts.seed) == ("random", 1024, None)
    assert warnings == []


def test_parse_equals_form_durations_and_served_names() -> None:
    opts, warnings = parse_sim_args(
        [
            f"--model={MODEL}",
            "--port=9000",
            "--mode=echo",
            "--time-to-first-token=1.5s",
            "--inter-token-latency",
            "20",
            "--max-model-len=2048",
            "--seed=-4",
            "--served-model-name",
            "a",
            "b",
            "--served-model-name=c",
        ]
    )
    assert opts == SimOptions(
        model=MODEL,
        served_model_names=["a", "b", "c"],
        port=9000,
        mode="echo",
        time_to_first_token_ms=1500,
        inter_token_latency_ms=20,
        max_model_len=2048,
        seed=-4,
    )
    assert opts.model_names == [MODEL, "a", "b", "c"]
    assert warnings == []


def test_parse_ignores_unknown_flags_with_a_warning() -> None:
    opts, warnings = parse_sim_args(
        ["--max-loras", "2", "--enforce-eager", "--lora-modules", "{}", "{}", "--model", "m"]
    )
    assert opts.model == "m"
    assert warnings == [
        "ignoring unsupported simulator flag --max-loras",
        "ignoring unsupported simulator flag --enforce-eager",
        "ignoring unsupported simulator flag --lora-modules",
    ]


def test_parse_accepts_yaml_numbers() -> None:
    opts, _ = parse_sim_args(["--model", "m", "--port", 8001, "--seed", 5])
    assert (opts.port, opts.seed) == (8001, 5)


def test_parse_takes_model_from_sim_model_env_only_when_flag_absent() -> None:
    assert parse_sim_args([], env={"SIM_MODEL": "from-env"})[0].model == "from-env"
    assert parse_sim_args(["--model", "flag"], env={"SIM_MODEL": "env"})[0].model == "flag"


@pytest.mark.parametrize(
    ("argv", "flag", "problem"),
    [
        (["--port", "8000"], "--model", "required"),
        (["--model="], "--model", "empty"),
        (["--model", "m", "--port", "abc"], "--port", "integer"),
        (["--model", "m", "--port", "70000"], "--port", "at most"),
        (["--model", "m", "--port"], "--port", "value"),
        (["--model", "m", "--mode", "foo"], "--mode", "'foo'"),
        (["--model", "m", "--time-to-first-token", "-5"], "--time-to-first-token", "negative"),
        (["--model", "m", "--inter-token-latency", "10 parsecs"], "--inter-token-latency", "dur"),
        (["--model", "m", "--max-model-len", "0"], "--max-model-len", "at least 1"),
        (["--model", "m", "--seed", "x"], "--seed", "integer"),
        (["--model", "m", "--served-model-name"], "--served-model-name", "name"),
    ],
)
def test_parse_rejects_bad_values_naming_the_flag(argv: list[str], flag: str, problem: str) -> None:
    with pytest.raises(ValueError, match=flag) as info:
        parse_sim_args(argv)
    assert problem in str(info.value)


# --- run_simulator: a real process stopped by a signal ------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_simulator_stops_cleanly_on_signal(sig: signal.Signals) -> None:
    sock = _listening_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    code = textwrap.dedent(
        """
        import sys
        from tokengateway.simulator import SimOptions, run_simulator
        run_simulator(SimOptions(model="m"), fd=int(sys.argv[1]))
        print("stopped")
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(sock.fileno())],
        pass_fds=[sock.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "simulator did not come up"
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    assert proc.returncode == 0, err
    assert out.decode().strip() == "stopped"
    assert b"Traceback" not in err
