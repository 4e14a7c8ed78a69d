"""Next-token sampling for a batch of rows: greedy, temperature, top-k, top-p, per-request seeds; for the rows that
ask, logit_bias, penalties, min_tokens and logprobs (one batched pass over just those rows)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.packing import to_device_nowait
from server.engine.protocol import Logprobs
from server.engine.sequence import SamplingParams, Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], dict[int, Logprobs]]:
    """Next token per row of logits (batch, vocab), all rows in one batched pass and one host transfer; and, by
    row, the logprobs of the rows whose request asked for them.

    Sampled rows draw by Gumbel-max over the tokens that temperature, top-k and top-p keep; their uniform noise
    comes from the request's own generator when it has a seed (so a seed reproduces whatever its batch
    neighbours), else from the global one in a single call. Rows of requests that use none of logit_bias,
    penalties, min_tokens and logprobs take no other work than that."""
    chosen, logprobs = sample_on_device(logits, seqs)
    return chosen.tolist(), logprobs or {}


def sample_on_device(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, dict[int, Logprobs] | None]:
    """As sample(), the (batch,) token ids left on the logits' device, unread (the engine may feed them to its
    next step before it reads them); the logprobs by row if any row asked for them (read back now), else None."""
    chosen, raw, asked = _choose(logits, seqs)
    if not asked:
        return chosen, None
    found = _logprobs(raw, chosen[asked], [seqs[i].sampling.logprobs for i in asked])
    return chosen, {i: found.row(j) for j, i in enumerate(asked)}


def _choose(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """(token ids on the device, the raw log-softmax of the rows asking for logprobs, those rows)."""
    special = [i for i, seq in enumerate(seqs) if not seq.sampling.is_plain_greedy]  # one look per row, as ever
    if not special:  # in the logits' own dtype: widening is exact, so the argmax is the same, one launch fewer
        return torch.argmax(logits, dim=-1), None, []
    logits = logits.float()
    processed = [i for i in special if seqs[i].sampling.is_processed]
    asked = [i for i in processed if seqs[i].sampling.logprobs is not None]
    raw = None
    if processed:
        raw = torch.log_softmax(logits[asked], dim=-1) if asked else None
        logits = process_logits(logits, seqs, processed)
    chosen = torch.argmax(logits, dim=-1)
    rows = [i for i in special if not seqs[i].sampling.is_greedy]
    if len(rows) == len(seqs):  # all sampled: no indexed write (a list index is a copy from the host)
        chosen = _sample_rows(logits, [seq.sampling for seq in seqs], _noise(seqs, rows, logits))
    elif rows:
        index = to_device_nowait(rows, logits.device)
        chosen[index] = _sample_rows(logits[index], [seqs[i].sampling for i in rows], _noise(seqs, rows, logits))
    return chosen, raw, asked


def _noise(seqs: list[Sequence], rows: list[int], logits: torch.Tensor) -> torch.Tensor:
    vocab, device = logits.shape[-1], logits.device
    unseeded = [j for j, i in enumerate(rows) if seqs[i].sampling.seed is None]
    if len(unseeded) == len(rows):
        return torch.rand(len(rows), vocab, device=device)
    noise = torch.empty(len(rows), vocab, device=device)
    if unseeded:
        noise[to_device_nowait(unseeded, device)] = torch.rand(len(unseeded), vocab, device=device)
    for j, i in enumerate(rows):
        seq = seqs[i]
        if seq.sampling.seed is None:
            continue
        if seq.generator is None:
            seq.generator = torch.Generator(device=device)
            seq.generator.manual_seed(seq.sampling.seed)
        noise[j] = torch.rand(vocab, generator=seq.generator, device=device)
    return noise


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], uniform: torch.Tensor) -> torch.Tensor:
    """Temperature, then top-k, then top-p over what top-k kept, then a Gumbel-max draw with the given uniform
    noise: (rows, vocab) -> (rows,) token ids."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = to_device_nowait([p.temperature for p in params], device, torch.float32)
    top_k = to_device_nowait([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device)
    top_p = to_device_nowait([p.top_p for p in params], device, torch.float32)
    sorted_logits, order = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    keep = torch.arange(vocab, device=device)[None, :] < top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    # drop a token once the tokens before it already reach top_p; the most likely always stays
    keep &= (probs.cumsum(-1) - probs) < top_p[:, None]
    gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(torch.float32).tiny)))
    picked = torch.argmax(sorted_logits.masked_fill(~keep, float("-inf")) + gumbel, dim=-1, keepdim=True)
    return order.gather(1, picked).squeeze(1)


class TokenHistory:
    """One request's sampler state on the logits' device, built at its first sampled step: its logit_bias and
    the ids min_tokens masks as index tensors, and for penalties how often each token was generated (counted as
    tokens arrive) and which tokens its prompt holds."""

    def __init__(self, seq: Sequence, vocab: int, device: torch.device):
        p = seq.sampling
        self.bias_ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=device)
        self.bias_values = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=device)
        self.end_ids = torch.tensor(p.end_ids, dtype=torch.long, device=device)
        self.counts = torch.zeros(vocab, device=device) if p.has_penalties else None
        self.in_prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
        prompt = seq.fork_of.inputs if seq.fork_of is not None else seq.inputs  # a fork shares its prompt
        if p.repetition_penalty != 1 and prompt.dtype == torch.int64 and prompt.numel():
            self.in_prompt[prompt.to(device)] = True
        self.num_counted = 0

    def count(self, output_ids: list[int]) -> None:
        """Add the tokens generated since the last call to the counts."""
        if self.counts is not None and len(output_ids) > self.num_counted:
            new = torch.tensor(output_ids[self.num_counted:], dtype=torch.long, device=self.counts.device)
            self.counts.index_add_(0, new, torch.ones(new.shape[0], device=self.counts.device))
        self.num_counted = len(output_ids)


def process_logits(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> torch.Tensor:
    """A copy of logits (batch, vocab) with, on the given rows: min_tokens (eos and stop ids at -inf until enough
    tokens are out), then logit_bias added, then the repetition penalty (Hugging Face's: a seen token's logit
    divided by it when positive, multiplied when negative, over prompt and generated tokens) and the presence and
    frequency penalties (OpenAI's: minus presence if generated at all, minus frequency times its count)."""
    logits = logits.clone()  # the caller's rows may be a session's kept logits
    vocab, device = logits.shape[-1], logits.device
    mask_rows, mask_ids, bias_rows, bias_ids, bias_values, penalised = [], [], [], [], [], []
    for i in rows:
        seq = seqs[i]
        p = seq.sampling
        if seq.history is None:
            seq.history = TokenHistory(seq, vocab, device)
        history = seq.history
        if len(seq.output_ids) < p.min_tokens and history.end_ids.numel():
            mask_rows.append(torch.full_like(history.end_ids, i))
            mask_ids.append(history.end_ids)
        if history.bias_ids.numel():
            bias_rows.append(torch.full_like(history.bias_ids, i))
            bias_ids.append(history.bias_ids)
            bias_values.append(history.bias_values)
        if history.counts is not None:
            history.count(seq.output_ids)
            penalised.append(i)
    if mask_rows:
        logits[torch.cat(mask_rows), torch.cat(mask_ids)] = float("-inf")
    if bias_rows:
        logits.index_put_((torch.cat(bias_rows), torch.cat(bias_ids)), torch.cat(bias_values), accumulate=True)
    if penalised:
        histories = [seqs[i].history for i in penalised]
        params = [seqs[i].sampling for i in penalised]
        counts = torch.stack([h.counts for h in histories])  # (rows, vocab)
        in_prompt = torch.stack([h.in_prompt for h in histories])
        repetition = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
        part = logits[penalised]
        generated = counts > 0
        repeated = torch.where(part > 0, part / repetition, part * repetition)
        part = torch.where(generated | in_prompt, repeated, part)
        logits[penalised] = part - frequency * counts - presence * generated.float()
    return logits


def _logprobs(raw: torch.Tensor, chosen: torch.Tensor, num_top: list[int | None]) -> "_Found":
    """raw: (rows, vocab) log-softmax; chosen: (rows,) token ids; one host transfer for all rows."""
    k = max(n or 0 for n in num_top)
    chosen_lp = raw.gather(1, chosen[:, None]).squeeze(1)
    top_lp, top_ids = torch.topk(raw, k, dim=-1) if k else (raw[:, :0], chosen[:, None][:, :0])
    return _Found(chosen_lp.tolist(), top_ids.tolist(), top_lp.tolist(), num_top)


@dataclass(slots=True)
class _Found:
    chosen: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    num_top: list[int | None]

    def row(self, j: int) -> Logprobs:
        k = self.num_top[j] or 0
        return Logprobs([self.chosen[j]], [self.top_ids[j][:k]], [self.top_logprobs[j][:k]])


INPUT_BLOCK = 1024  # rows of a long prompt scored at a time: a float32 copy of (rows, vocab) each


def input_logprobs(logits: torch.Tensor, targets: torch.Tensor, num_top: int) -> Logprobs:
    """Each position's logprob of the token that came next in the input: logits (n, vocab) and targets (n,)."""
    found = Logprobs([], [], [])
    targets = targets.to(logits.device)
    for lo in range(0, logits.shape[0], INPUT_BLOCK):
        block = _logprobs(torch.log_softmax(logits[lo:lo + INPUT_BLOCK].float(), dim=-1),
                          targets[lo:lo + INPUT_BLOCK], [num_top])
        found.extend(Logprobs(block.chosen, block.top_ids, block.top_logprobs))
    return found
