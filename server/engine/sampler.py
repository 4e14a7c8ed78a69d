"""Next-token sampling for a batch of rows: greedy, temperature, top-k, top-p, per-request seeds."""
from __future__ import annotations

import torch

from server.engine.sequence import SamplingParams, Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Next token per row of logits (batch, vocab), all rows in one batched pass and one host transfer.

    Sampled rows draw by Gumbel-max over the tokens that temperature, top-k and top-p keep; their uniform noise
    comes from the request's own generator when it has a seed (so a seed reproduces whatever its batch
    neighbours), else from the global one in a single call."""
    logits = logits.float()
    chosen = torch.argmax(logits, dim=-1)
    rows = [i for i, seq in enumerate(seqs) if not seq.sampling.is_greedy]
    if not rows:
        return chosen.tolist()
    vocab, device = logits.shape[-1], logits.device
    noise = torch.empty(len(rows), vocab, device=device)
    unseeded = [j for j, i in enumerate(rows) if seqs[i].sampling.seed is None]
    if unseeded:
        noise[unseeded] = torch.rand(len(unseeded), vocab, device=device)
    for j, i in enumerate(rows):
        seq = seqs[i]
        if seq.sampling.seed is None:
            continue
        if seq.generator is None:
            seq.generator = torch.Generator(device=device)
            seq.generator.manual_seed(seq.sampling.seed)
        noise[j] = torch.rand(vocab, generator=seq.generator, device=device)
    index = torch.tensor(rows, device=device)
    chosen[index] = _sample_rows(logits[index], [seqs[i].sampling for i in rows], noise)
    return chosen.tolist()


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], uniform: torch.Tensor) -> torch.Tensor:
    """Temperature, then top-k, then top-p over what top-k kept, then a Gumbel-max draw with the given uniform
    noise: (rows, vocab) -> (rows,) token ids."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    sorted_logits, order = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    keep = torch.arange(vocab, device=device)[None, :] < top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    # drop a token once the tokens before it already reach top_p; the most likely always stays
    keep &= (probs.cumsum(-1) - probs) < top_p[:, None]
    gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(torch.float32).tiny)))
    picked = torch.argmax(sorted_logits.masked_fill(~keep, float("-inf")) + gumbel, dim=-1, keepdim=True)
    return order.gather(1, picked).squeeze(1)
