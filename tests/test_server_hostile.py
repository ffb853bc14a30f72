"""Bad input to `edge-adapt serve`: each is a clean 4xx in OpenAI's error shape, the server keeps serving and
no sequence leaks. A real server process (with an API key) and the embedded model."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import httpx
import pytest

from serving import ServerProcess, running_server

KEY = "hostile-key"
OK_BODY = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server("--parallel", "4", "--ctx", "256", key=KEY) as s:
        yield s
        # After everything below: still serving, nothing live.
        r = s.http.post("/v1/chat/completions", json=OK_BODY)
        assert r.status_code == 200, r.text
        s.wait_idle()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _post(server: ServerProcess, body: object, path: str = "/v1/chat/completions", **kwargs: object) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return server.http.post(path, content=body, headers={"Content-Type": "application/json"}, **kwargs)  # type: ignore[arg-type]
    return server.http.post(path, json=body, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [b"{", b"", b"[1, 2]", b'"text"', b"{'model': 1}", b'{"a": NaN}',
                                 b"[" * 100000 + b"]" * 100000])
def test_malformed_json_is_400(server: ServerProcess, raw: bytes) -> None:
    err = _error(_post(server, raw), 400)
    assert err["type"] == "invalid_request_error"


def test_non_utf8_bytes_are_400(server: ServerProcess) -> None:
    raw = b'{"messages": [{"role": "user", "content": "caf\xe9 \xff"}], "max_tokens": 2}'
    assert "UTF-8" in _error(_post(server, raw), 400)["message"]
    # JSON can also spell a lone surrogate, which no text encoding holds.
    lone = '{"messages": [{"role": "user", "content": "a \\ud800 b"}], "max_tokens": 2}'
    assert "UTF-8" in _error(_post(server, lone), 400)["message"]


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "8"), ("max_tokens", 8.5), ("n", True), ("temperature", "hot"), ("stream", "yes"),
    ("messages", "hello"), ("stop", 5), ("seed", 1.5), ("top_logprobs", "3"), ("edge_adapt", "best-of-n"),
])
def test_wrong_types_are_400_naming_the_field(server: ServerProcess, field: str, value: object) -> None:
    err = _error(_post(server, {**OK_BODY, field: value}), 400)
    assert err["param"] is not None and err["param"].startswith(field)


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "wizard", "content": "hi"}],
    [{"role": "tool", "content": "hi", "tool_call_id": "x"}],
    [{"role": "user", "content": None}],
    [{"role": "user"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
    [{"content": "hi"}],
])
def test_bad_messages_are_400(server: ServerProcess, messages: list) -> None:
    err = _error(_post(server, {**OK_BODY, "messages": messages}), 400)
    assert err["param"] is not None and err["param"].startswith("messages")


def test_empty_content_and_null_options_are_accepted_as_openai_reads_them(server: ServerProcess) -> None:
    """An empty system turn, and an empty reply sent back as history, are messages OpenAI accepts; null for
    an optional field is its default."""
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": ""}, {"role": "user", "content": "Hi again"}]
    assert _post(server, {**OK_BODY, "messages": messages}).status_code == 200
    nulls = {"n": None, "stream": None, "logprobs": None, "stream_options": None, "edge_adapt": None, "stop": None}
    plain = _post(server, {**OK_BODY, "seed": 3}).json()
    nulled = _post(server, {**OK_BODY, "seed": 3, **nulls}).json()
    assert nulled["choices"] == plain["choices"] and len(nulled["choices"]) == 1
    completion = {"prompt": "Hi", "max_tokens": 2, "seed": 3}
    assert _post(server, {**completion, "n": None, "stream": None, "logprobs": None,
                          "return_tokens_as_token_ids": None}, "/v1/completions").json()["choices"] \
        == _post(server, completion, "/v1/completions").json()["choices"]
    for required in ({"messages": None}, {"edge_adapt": {"strategy": None}}):
        assert _post(server, {**OK_BODY, **required}).status_code == 400


def test_text_parts_are_accepted(server: ServerProcess) -> None:
    body = {**OK_BODY, "messages": [{"role": "developer", "content": "Be brief."},
                                    {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                 {"type": "text", "text": "there"}]}]}
    assert _post(server, body).status_code == 200


@pytest.mark.parametrize("part, param", [
    ({"type": "text", "text": "b", "extra": 1}, "messages.1.content.1.extra"),
    ({"type": "text", "text": 3}, "messages.1.content.1.text"),
    ({"type": "text"}, "messages.1.content.1.text"),
])
def test_a_refused_content_part_is_named_by_its_index(server: ServerProcess, part: dict, param: str) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, part]}]
    err = _error(_post(server, {**OK_BODY, "messages": messages}), 400)
    assert err["param"] == param and param in err["message"], err


@pytest.mark.parametrize("field, value", [
    ("n", 10**9), ("n", 0), ("max_tokens", -5), ("max_tokens", 0), ("temperature", -1), ("temperature", 1e308),
    ("temperature", 1e-300), ("repeat_penalty", 1e300), ("repeat_penalty", 0.0), ("top_p", 0),
    ("top_p", 1.5), ("min_p", 1), ("top_k", -1), ("seed", -7), ("top_logprobs", 50),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("unknown_field", 1), ("tools", [{"type": "function"}]),
    ("max_completion_tokens", 3),  # disagrees with max_tokens 2
    ("logit_bias", [1, 2]), ("logit_bias", {"abc": 1}), ("logit_bias", {"-3": 1}), ("logit_bias", {"5": 101}),
    ("logit_bias", {"5": "1"}), ("logit_bias", {str(i): 1 for i in range(301)}),
])
def test_out_of_range_values_are_400(server: ServerProcess, field: str, value: object) -> None:
    err = _error(_post(server, {**OK_BODY, field: value}), 400)
    assert err["param"] == field or err["param"] == f"{field}.0", err


def test_logit_bias_outside_the_vocabulary_is_400(server: ServerProcess) -> None:
    err = _error(_post(server, {**OK_BODY, "logit_bias": {str(10**7): 5}}), 400)
    assert "vocabulary" in err["message"] and err["param"] == "logit_bias"


def test_completion_prompt_faults_are_400(server: ServerProcess) -> None:
    for prompt in [["a", "b"], [[1, 2], [3]], [], [1, -2], [1, 2.5], [True, 2], [1, 10**9], 7, ""]:
        err = _error(_post(server, {"prompt": prompt, "max_tokens": 2}, "/v1/completions"), 400)
        assert err["param"] == "prompt", prompt


@pytest.mark.parametrize("prompt, item", [([1, 2.5], "item 1 is 2.5"), ([1, True], "item 1 is true"),
                                          ([1, None], "item 1 is null"), ([[1, 2.5]], "item 1 is 2.5")])
def test_a_token_id_prompt_with_a_non_integer_names_the_item(server: ServerProcess, prompt: list, item: str) -> None:
    """One prompt with a bad token id is not a batch: the refusal names the item, not batching."""
    err = _error(_post(server, {"prompt": prompt, "max_tokens": 2}, "/v1/completions"), 400)
    assert err["param"] == "prompt" and "token ids must be integers" in err["message"] and item in err["message"], err


def test_a_logit_bias_key_too_long_for_a_token_id_is_not_a_token_id(server: ServerProcess) -> None:
    err = _error(_post(server, {**OK_BODY, "logit_bias": {"1" * 5000: 1}}), 400)
    assert err["param"] == "logit_bias" and "is not a token id" in err["message"], err
    assert "sys." not in err["message"] and len(err["message"]) < 200, err


def test_a_compressed_body_is_415_naming_content_encoding(server: ServerProcess) -> None:
    """A body the server would read as if uncompressed is refused by its Content-Encoding, not as bad UTF-8."""
    import gzip

    r = server.http.post("/v1/chat/completions", content=gzip.compress(json.dumps(OK_BODY).encode()),
                         headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    err = _error(r, 415)
    assert "Content-Encoding" in err["message"] and "gzip" in err["message"], err
    identity = server.http.post("/v1/chat/completions", json=OK_BODY, headers={"Content-Encoding": "identity"})
    assert identity.status_code == 200, identity.text
    for field, value in [("echo", True), ("suffix", "x"), ("best_of", 3)]:
        err = _error(_post(server, {"prompt": "hi", "max_tokens": 2, field: value}, "/v1/completions"), 400)
        assert err["param"] == field


def test_prompt_over_the_context_is_400(server: ServerProcess) -> None:
    body = {**OK_BODY, "messages": [{"role": "user", "content": "word " * 600}]}  # the context holds 256 tokens
    err = _error(_post(server, body), 400)
    assert err["code"] == "exceed_context_size_error"
    # max_tokens that cannot fit beside the prompt is the same refusal.
    err = _error(_post(server, {**OK_BODY, "max_tokens": 1000}), 400)
    assert err["code"] == "exceed_context_size_error"


def test_a_strategy_over_the_context_is_told_what_the_client_can_change(server: ServerProcess) -> None:
    """The server's --ctx is not the client's to raise: the refusal names what the request can lower."""
    body = {**OK_BODY, "max_tokens": 1000, "edge_adapt": {"strategy": "best-of-n", "budget": 2}}
    err = _error(_post(server, body), 400)
    assert err["code"] == "exceed_context_size_error" and err["param"] == "messages", err
    assert "--ctx" not in err["message"] and "shorter prompt or a lower max_tokens" in err["message"], err


def test_prompt_dense_in_special_tokens_is_refused_before_it_is_all_tokenized(server: ServerProcess) -> None:
    """Tokenizing is linear (pieces cut between special tokens), and stops at the first piece past the context."""
    prompt = "<|im_end|>" * 300_000  # 3 MB: about 3 minutes for llama.cpp's own quadratic split
    err = _error(_post(server, {"prompt": prompt, "max_tokens": 1}, "/v1/completions", timeout=60), 400)
    assert err["code"] == "exceed_context_size_error"
    m = re.search(r"in its first (\d+) of (\d+) bytes", err["message"])
    assert m and int(m.group(1)) < int(m.group(2)) == len(prompt), err["message"]


def test_ten_megabyte_body_is_refused_without_reading_it_all(server: ServerProcess) -> None:
    big = json.dumps({**OK_BODY, "messages": [{"role": "user", "content": "x" * (10 << 20)}]}).encode()
    err = _error(_post(server, big), 413)
    assert err["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as the body arrives
        for i in range(0, len(big), 1 << 16):
            yield big[i: i + 1 << 16]

    r = server.http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    _error(r, 413)
    # A client that asks first ("Expect: 100-continue") is told at once, and is not invited to send it.
    host, port = server.base.removeprefix("http://").rsplit(":", 1)
    for key, status in ((f"Authorization: Bearer {KEY}\r\n", 413), ("", 401)):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      f"{key}Content-Length: {len(big)}\r\nExpect: 100-continue\r\n\r\n".encode())
            line = s.makefile("rb").readline().decode()
        assert line.startswith(f"HTTP/1.1 {status}"), line


@pytest.mark.parametrize("raw", [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n",
                                 b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40)])  # the last: TLS
def test_bytes_that_are_not_http_get_a_400_in_openais_shape(server: ServerProcess, raw: bytes) -> None:
    host, port = server.base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(raw)
        head, _, body = s.makefile("rb").read().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), head
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_http_request", err


def test_paths_are_not_redirected_and_health_answers_head(server: ServerProcess) -> None:
    _error(server.http.post("/v1/chat/completions/", json=OK_BODY), 404)
    assert server.http.head("/health").status_code == 200


def test_wrong_or_missing_key_is_401(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base) as bare:
        for headers in [{}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}]:
            err = _error(bare.post("/v1/chat/completions", json=OK_BODY, headers=headers), 401)
            assert err["code"] == "invalid_api_key"
        assert bare.get("/health").status_code == 200


def test_unknown_model_is_404(server: ServerProcess) -> None:
    assert _error(_post(server, {**OK_BODY, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    assert _error(server.http.get("/v1/models/gpt-4"), 404)["code"] == "model_not_found"


def test_strategy_needing_more_sequences_than_the_server_has_is_400(server: ServerProcess) -> None:
    body = {**OK_BODY, "edge_adapt": {"strategy": "best-of-n", "budget": 16}}
    err = _error(_post(server, body), 400)
    assert err["code"] == "budget_exceeded" and err["param"] == "edge_adapt.budget", err
    err = _error(_post(server, {**OK_BODY, "logprobs": True, "edge_adapt": {"strategy": "best-of-n", "budget": 2}}), 400)
    assert err["param"] == "logprobs"


def test_nothing_leaks_after_bad_input(server: ServerProcess) -> None:
    server.wait_idle()
    assert server.metrics()["requests_queued"] == 0


def _fingerprint(server: ServerProcess) -> str:
    return server.http.get("/v1/models").json()["data"][0]["edge_adapt"]["fingerprint"]


def _policy(model: str, choice: str = '{"strategy":"probe"}') -> str:
    """An inline auto policy as raw JSON text (so that it can spell lone surrogates): `choice` in bin 1."""
    return '{"model":"%s","bin_edges":[0.1,0.2,0.3,0.4],"budgets":{"2":[%s%s]}}' % (
        model, choice, ',{"strategy":"probe"}' * 4)


@pytest.mark.parametrize("case", ["chat model", "completions model", "policy model", "policy option name",
                                  "policy option value", "key"])
def test_lone_surrogates_quoted_back_in_errors_are_4xx_not_500(server: ServerProcess, case: str) -> None:
    # "\ud800" is valid JSON; such a string quoted into an error message must not make the error unanswerable.
    m = '[{"role":"user","content":"hi"}]'
    fp = _fingerprint(server)
    auto = '{"messages":%s,"max_tokens":8,"edge_adapt":{"strategy":"auto","budget":4,"policy":%s}}'
    path, body, status, param = {
        "chat model": ("/v1/chat/completions", '{"model":"\\ud800","messages":%s,"max_tokens":2}' % m, 404, "model"),
        "completions model": ("/v1/completions", '{"model":"x\\udfff","prompt":"hi","max_tokens":2}', 404, "model"),
        "policy model": ("/v1/chat/completions", auto % (m, _policy("\\ud800")), 400, "edge_adapt.policy"),
        "policy option name": ("/v1/chat/completions",
                               auto % (m, _policy(fp, '{"strategy":"best-of-n","options":{"\\ud800":1}}')),
                               400, "edge_adapt.policy.budgets.2.0.options"),
        "policy option value": ("/v1/chat/completions",
                                auto % (m, _policy(fp, '{"strategy":"best-of-n","options":{"budget":"\\ud800"}}')),
                                400, "edge_adapt.policy"),
        "key": ("/v1/chat/completions", '{"\\ud800x":1,"messages":%s}' % m, 400, None),
    }[case]
    r = _post(server, body, path)
    err = _error(r, status)
    assert err["param"] == param and "internal error" not in err["message"], err
    if case in ("key", "policy option name"):  # refused as such (pydantic cannot quote it)
        assert "lone surrogate" in err["message"]
    else:  # quoted as it was sent, escaped in the JSON
        assert "\ud800" in err["message"] or "\udfff" in err["message"]
    assert "Exception in ASGI" not in server.stderr()


def test_auto_refusals_name_the_field(server: ServerProcess) -> None:
    auto = {"strategy": "auto", "budget": 1}
    err = _error(_post(server, {**OK_BODY, "edge_adapt": auto}), 400)
    assert err["param"] == "edge_adapt.budget" and "budget 1" in err["message"], err
    other = json.loads(_policy("llama:1:2:Q4_1:deadbeef"))
    err = _error(_post(server, {**OK_BODY, "edge_adapt": {**auto, "budget": 4, "policy": other}}), 400)
    assert err["param"] == "edge_adapt.policy" and "tuned for model" in err["message"], err
    # Tuned with another self-evaluation: a 400 when the request comes (was an error event mid-stream, after the
    # prompt's decode).
    mine = {**json.loads(_policy(_fingerprint(server))), "self_eval": 'edge_adapt.selfeval.evaluator.SelfEvaluator:'
            '{"format":"chat","question":"Sure?","suffix":null,"yes":"Yes","no":"No","adapter":null,"adapter_scale":1.0}'}
    err = _error(_post(server, {**OK_BODY, "stream": True, "edge_adapt": {**auto, "budget": 4, "policy": mine}}), 400)
    assert err["param"] == "edge_adapt.policy" and "tuned with self-evaluation" in err["message"], err


def test_bodies_and_stream_chunks_holding_a_lone_surrogate_still_encode() -> None:
    # A model id from a file name with bytes that are not UTF-8 holds one (Python's surrogateescape): every JSON
    # body and SSE chunk that names the model must still be written, with the string escaped.
    from edge_adapt.server.app import _sse
    from edge_adapt.server.openai_errors import APIError, JSONBody
    from edge_adapt.server.responses import Assembler, Shape

    shape = Shape.new("chat", "model-\udcff", 1)
    chunk = Assembler(shape, lambda t: b"").opening()[0]
    event = _sse(chunk)
    raw = event if isinstance(event, bytes) else event.encode("utf-8")
    assert json.loads(raw.decode("utf-8").removeprefix("data: "))["model"] == "model-\udcff"
    assert json.loads(JSONBody({"model": "model-\udcff", "text": "é"}).body) == {"model": "model-\udcff", "text": "é"}
    assert JSONBody({"text": "é"}).body == '{"text":"é"}'.encode()  # UTF-8 as before when it can be
    err = APIError(404, "no model \ud800", param="model").response()
    assert json.loads(err.body)["error"]["message"] == "no model \ud800"
