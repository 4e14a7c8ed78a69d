"""Chat completions through the real server: the model directory's chat template renders the messages, and the
answer is what completions give for the rendered prompt; streamed and not; the openai client; clear errors."""
import json

import httpx
import openai
import pytest

from model.tokenizer import ByteTokenizer
from server.api.chat_template import ChatTemplate
from tests.server.conftest import running, tiny_lm
from tests.server.test_engine_api import wait_all_slots_free

TEMPLATE = ("{% for message in messages %}"
            "{% if message['role'] == 'system' and not loop.first %}"
            "{{ raise_exception('the system message must come first') }}{% endif %}"
            "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}\n"
            "{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <there> & you"}]
RENDERED = "<|system|>Be brief.</s>\n<|user|>Hi <there> & you</s>\n<|assistant|>"


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """The tiny model served from a directory whose tokenizer_config.json has a chat template (the bundled byte
    model has none)."""
    model_dir = tmp_path_factory.mktemp("chat-model")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>",
                                                                 "eos_token": {"content": "</s>"}}))
    with running(tiny_lm(), ByteTokenizer(), model_dir=str(model_dir), max_num_streams=8,
                 max_num_batched_tokens=64) as srv:
        yield srv


def chat(srv, **body):
    return httpx.post(srv.url + "/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0, **body},
                      timeout=60)


def test_chat_is_the_completion_of_the_rendered_prompt(chat_server):
    r = chat(chat_server, max_tokens=12)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["object"] == "chat.completion" and got["id"].startswith("chatcmpl-")
    choice = got["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["logprobs"] is None
    want = httpx.post(chat_server.url + "/v1/completions",
                      json={"prompt": RENDERED, "max_tokens": 12, "temperature": 0}).json()
    assert choice["message"]["content"] == want["choices"][0]["text"]
    assert choice["finish_reason"] == want["choices"][0]["finish_reason"]
    assert got["usage"] == want["usage"] and got["usage"]["prompt_tokens"] == len(RENDERED)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi <there> "}, {"type": "text", "text": "& you"}]}]
    as_parts = chat(chat_server, max_tokens=12, messages=[MESSAGES[0]] + parts).json()
    assert as_parts["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_chat_streamed_equals_plain(chat_server):
    plain = chat(chat_server, max_tokens=10, n=2, seed=4, temperature=0.9).json()
    chunks = []
    with httpx.stream("POST", chat_server.url + "/v1/chat/completions",
                      json={"messages": MESSAGES, "max_tokens": 10, "n": 2, "seed": 4, "temperature": 0.9,
                            "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == plain["choices"][index]["message"]["content"]
        assert mine[-1]["finish_reason"] == plain["choices"][index]["finish_reason"]
    assert chunks[-1]["usage"] == plain["usage"]


def test_one_choice_streamed_equals_plain_and_a_hang_up_frees_its_slot(chat_server):
    plain = chat(chat_server, max_tokens=12).json()["choices"][0]
    with httpx.stream("POST", chat_server.url + "/v1/chat/completions",
                      json={"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]
    with httpx.stream("POST", chat_server.url + "/v1/chat/completions",
                      json={"messages": MESSAGES, "max_tokens": 2000, "stream": True, "ignore_eos": True}) as r:
        next(r.iter_lines())
    wait_all_slots_free(chat_server)


def test_openai_client_chat_with_logprobs(chat_server):
    client = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused")
    out = client.chat.completions.create(model="tiny-lm", messages=MESSAGES, max_completion_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=2, n=2)
    assert [c.index for c in out.choices] == [0, 1] and out.choices[0].message.content == out.choices[1].message.content
    content = out.choices[0].logprobs.content
    assert len(content) == 6 and out.usage.completion_tokens == 12  # usage counts every choice
    scored = httpx.post(chat_server.url + "/v1/completions", json={"prompt": RENDERED, "max_tokens": 6,
                                                                 "temperature": 0, "logprobs": 2}).json()
    want = scored["choices"][0]["logprobs"]
    assert [c.logprob for c in content] == pytest.approx(want["token_logprobs"], abs=1e-5)
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert [c.top_logprobs[0].logprob for c in content] == pytest.approx(
        [max(top.values()) for top in want["top_logprobs"]], abs=1e-5)
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="tiny-lm", messages=MESSAGES, max_tokens=6, temperature=0, stream=True) if chunk.choices]
    assert "".join(pieces) == out.choices[0].message.content


def test_chat_errors_are_clear(chat_server, lm_server):
    client = openai.OpenAI(base_url=lm_server.url + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as err:  # the plain test model has no template
        client.chat.completions.create(model="tiny-lm", messages=MESSAGES)
    assert err.value.code == "no_chat_template" and err.value.param == "messages"
    assert "chat template" in err.value.message
    r = chat(chat_server, messages=[MESSAGES[1], MESSAGES[0]])  # the template's own raise_exception
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_messages"
    assert "the system message must come first" in r.json()["error"]["message"]
    r = chat(chat_server, top_logprobs=2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = chat(chat_server, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert r.status_code == 422 and r.json()["error"]["field"].startswith("messages[0].content")
    r = chat(chat_server, messages=[])
    assert r.status_code == 422 and r.json()["error"]["field"] == "messages"
    r = chat(chat_server, tools=[])
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_field"
    assert chat(chat_server, max_tokens=2).status_code == 200  # and it still serves


def test_templates_load_from_either_place_and_a_broken_one_is_named(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content | tojson }}]{% endfor %}")
    assert ChatTemplate.load(tmp_path).render([{"role": "user", "content": "<é>"}]) == '["<é>"]'
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert ChatTemplate.load(tmp_path).render([]) == "D"  # the config wins over the file
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate.load(tmp_path)
    assert ChatTemplate.load(tmp_path / "absent") is None
