"""OpenAI's logprobs objects from the engine's numbers: completions' {tokens, token_logprobs, top_logprobs,
text_offset} and chat's {content: [{token, logprob, bytes, top_logprobs}]}. A token that is not UTF-8 on its own
(one byte of a longer character) is shown as OpenAI shows it, "bytes:\\xe2"."""
from __future__ import annotations

from server.api.requests import TokenLogprob
from server.detokenizer import Detokenizer
from server.engine.protocol import Logprobs


def token_text(tokenizer, token_id: int) -> str:
    raw = tokenizer.token_bytes(token_id) if tokenizer is not None else b""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def prompt_entries(prompt_logprobs: Logprobs | None, num_prompt: int) -> list[TokenLogprob | None]:
    """Per prompt token: None for the first (nothing predicts it), then what the engine measured."""
    found = prompt_logprobs or Logprobs([], [], [])
    return [None] + list(zip(found.chosen, found.top_ids, found.top_logprobs))[:num_prompt - 1]


def text_offsets(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """The text of ids and where each token's text starts in it."""
    detok = Detokenizer(tokenizer, ())
    offsets = []
    for token in ids:
        offsets.append(len(detok.text))
        detok.add(token)
    return detok.flush(), offsets


def completion_logprobs(tokenizer, ids: list[int], logprobs: list[TokenLogprob | None], offsets: list[int],
                        start: int = 0) -> dict:
    """The completions `logprobs` object; the chosen token is always among its position's top_logprobs (so there
    may be logprobs + 1 of them, as OpenAI does)."""
    tokens, chosen, tops = [], [], []
    for token, found in zip(ids, logprobs):
        text = token_text(tokenizer, token)
        tokens.append(text)
        if found is None:
            chosen.append(None)
            tops.append(None)
            continue
        logprob, top_ids, top_logprobs = found
        chosen.append(logprob)
        top = {token_text(tokenizer, i): lp for i, lp in zip(top_ids, top_logprobs)}
        top.setdefault(text, logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops,
            "text_offset": [start + o for o in offsets]}


def chat_logprobs(tokenizer, ids: list[int], logprobs: list[TokenLogprob]) -> dict:
    """The chat `logprobs` object: {"content": [...]} with top_logprobs many alternatives per token."""
    def entry(token: int, logprob: float) -> dict:
        raw = tokenizer.token_bytes(token) if tokenizer is not None else b""
        return {"token": token_text(tokenizer, token), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(token, logprob), "top_logprobs": [entry(i, lp) for i, lp in zip(ids_, lps)]}
                        for token, (logprob, ids_, lps) in zip(ids, logprobs)]}
