"""Sample text from a byte-level model directory through the serving path (prefill, then one step at a time).

    python -m model.training.sample model/default_model --prompt "def " --max-new 200 --temperature 0.8
"""
from __future__ import annotations

import argparse

import torch

from model.infomamba import InfoMamba
from model.tokenizer import ByteTokenizer
from model.weights import load_model


@torch.no_grad()
def generate(model: InfoMamba, prompt: str, max_new: int, temperature: float = 0.0, seed: int = 0) -> str:
    """temperature 0: greedy. Stops at the end-of-file token. Runs on the model's device (the GPU decodes through
    the kernels; the CPU through the reference ops, about 0.1 s a byte on a small CPU)."""
    tok = ByteTokenizer()
    gen = torch.Generator().manual_seed(seed)
    out, state = model(torch.tensor([tok.encode(prompt)], device=model.device))
    logits, new_ids = out.head[-1], []
    for _ in range(max_new):
        if temperature > 0:
            probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)  # the generator is on the CPU
            next_id = int(torch.multinomial(probs, 1, generator=gen))
        else:
            next_id = int(logits.argmax())
        if next_id == tok.eos_id:
            break
        new_ids.append(next_id)
        out, state = model(torch.tensor([[next_id]], device=model.device), state)
        logits = out.head[-1]
    return prompt + tok.decode(new_ids)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model = load_model(args.model_dir).eval()
    print(generate(model, args.prompt, args.max_new, args.temperature, args.seed))


if __name__ == "__main__":
    main()
