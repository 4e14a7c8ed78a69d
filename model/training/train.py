"""Train a byte-level InfoMamba on the Python standard library's source (see corpus.py).

    python -m model.training.train --out runs/k16 --n-concepts 16 --minutes 6

Loss = next-byte cross-entropy + imf_weight * the IMF redundancy penalty (DESIGN.md §1, training only).

Windows: random --seq-len windows from an empty state (the default), or with --stateful whole documents read in
consecutive --seq-len windows with the state carried and detached between them (truncated backpropagation through
time), which is how a long-stream model must be trained (DESIGN.md §1); --seq-len may then be long (2048+): the
training forward's memory grows linearly with it.
Writes into --out: config.json + model.safetensors (save_model), metrics.json, README.md (a model card), and
prints progress lines. Needs only torch and safetensors (no tqdm, no tokenizers).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.config import CONCEPT_DECAYS, InfoMambaConfig
from model.infomamba import InfoMamba
from model.state import StreamState
from model.tokenizer import ByteTokenizer
from model.train_forward import train_forward
from model.training.corpus import (IGNORE_INDEX, DocumentStreams, eval_windows, load_corpus, random_windows,
                                   split_documents)
from model.training.evaluate import stream_bpb
from model.weights import save_model

DEFAULT_NAME = "infomamba-pystdlib-byte"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-concepts", type=int, default=16, help="k; 0 trains a plain Mamba of the same size")
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--concept-decay", choices=CONCEPT_DECAYS, default="none", help="the concepts' memory γ")
    p.add_argument("--stateful", action="store_true",
                   help="stream whole documents in consecutive windows, state carried (truncated BPTT)")
    p.add_argument("--steps", type=int, default=100_000, help="step limit (the time budget usually ends first)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget for the training loop")
    p.add_argument("--stop-after-minutes", type=float, default=None,
                   help="a safety net for fixed-step runs: stop the loop after this wall time without letting it "
                        "shape the learning-rate schedule (--minutes does); metrics then say stopped_early")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    add_optimizer_args(p, lr=2e-3, imf_pool=64)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per periodic evaluation")
    p.add_argument("--final-eval-windows", type=int, default=4096)
    p.add_argument("--stream-eval", action="store_true",
                   help="also stream each held-out file whole through the serving path: bpb by position, and the "
                        "same files in --seq-len windows from an empty state (model/training/evaluate.py)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--max-files", type=int, default=None, help="use only the first files (smoke tests)")
    p.add_argument("--corpus-root", default=None, help="default: this interpreter's stdlib")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def add_optimizer_args(p: argparse.ArgumentParser, lr: float, imf_pool: int) -> None:
    """AdamW, the schedule and the IMF penalty's options (build_optimizer, lr_at, redundancy_penalty read them)."""
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--imf-weight", type=float, default=0.01, help="weight of the IMF redundancy penalty")
    p.add_argument("--imf-pool", type=int, default=imf_pool, help="tokens pooled into one sample for the penalty")


def redundancy_penalty(branches: list[tuple[torch.Tensor, torch.Tensor]], pool: int) -> torch.Tensor:
    """Mean over layers of the mean squared cross-correlation between the pooled mixer output and the pooled
    W_o (g_o ⊙ r): each (B, L, D) branch is averaged over segments of `pool` tokens, each feature is
    standardized over the segments, and the (D, D) correlation matrix's entries are squared and averaged."""
    if not branches:
        return torch.zeros(())
    terms = []
    for mixed, extra in branches:
        pooled = []
        for x in (mixed, extra):
            batch, length, d = x.shape
            seg = min(pool, length)
            x = x[:, :length - length % seg].float().reshape(batch, -1, seg, d).mean(2).reshape(-1, d)
            pooled.append((x - x.mean(0)) / (x.std(0, unbiased=False) + 1e-5))
        corr = pooled[0].t() @ pooled[1] / pooled[0].shape[0]  # (D, D)
        terms.append(corr.pow(2).mean())
    return torch.stack(terms).mean()


def build_optimizer(model: InfoMamba, args: argparse.Namespace) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Weight decay on the projection matrices only: not on norms, biases, A_log, D, M or the embedding.
        is_matrix = p.ndim == 2 and not name.endswith(("A_log", "mix")) and "embedding" not in name
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = args.device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused)


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine to min_lr_ratio * lr over `progress` in [0, 1] (steps or time, whichever is
    further along)."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


@torch.no_grad()
def evaluate(model: InfoMamba, windows: torch.Tensor, batch_size: int, autocast: bool) -> float:
    """Held-out bits per token (bytes, plus one end-of-file token per file) over the given windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        chunk = windows[i:i + batch_size]
        with torch.autocast(windows.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = train_forward(model, chunk[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                               reduction="sum")
        total += float(loss)
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1) / math.log(2)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    use_bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    corpus = load_corpus(args.corpus_root, args.max_files)
    if corpus.held_out.numel() <= args.seq_len or corpus.train.numel() <= args.seq_len + 1:
        raise SystemExit(f"corpus at {corpus.root}: too little text for {args.seq_len}-byte windows "
                         f"({json.dumps(corpus.describe())})")
    train_tokens, held_out = corpus.train.to(device), corpus.held_out.to(device)
    config = InfoMambaConfig(d_model=args.d_model, n_layers=args.n_layers, vocab_size=ByteTokenizer.vocab_size,
                             d_state=args.d_state, n_concepts=args.n_concepts, concept_decay=args.concept_decay,
                             name=args.name)
    model = InfoMamba(config).to(device).train()
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, args)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    streams, state = None, None
    if args.stateful:
        documents = split_documents(corpus.train)
        streams = DocumentStreams(documents, args.batch_size, args.seq_len, torch.Generator().manual_seed(args.seed))
        state = model.empty_state(args.batch_size)
    periodic_windows = eval_windows(held_out, args.seq_len, args.eval_windows)
    print(f"[{args.name}] k={args.n_concepts} params={num_params:,} corpus={json.dumps(corpus.describe())} "
          f"device={device}", flush=True)

    history, start, step, tokens_seen, stopped_early = [], time.time(), 0, 0, False
    budget_s = args.minutes * 60 if args.minutes else None
    while step < args.steps:
        elapsed = time.time() - start
        if budget_s is not None and elapsed >= budget_s:
            break
        if args.stop_after_minutes is not None and elapsed >= args.stop_after_minutes * 60:
            stopped_early = True
            print(f"[{args.name}] stopped early at step {step}: --stop-after-minutes {args.stop_after_minutes}",
                  flush=True)
            break
        progress = max(step / args.steps, elapsed / budget_s if budget_s else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, progress, args)
        inputs, targets, state = next_batch(args, train_tokens, generator, streams, state)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = train_forward(model, inputs, state)
            ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=IGNORE_INDEX)
            penalty = redundancy_penalty(out.branches, args.imf_pool).to(ce.device)
            loss = ce + args.imf_weight * penalty
        state = out.state  # detached by train_forward: the next window's gradient stops here
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        tokens_seen += int((targets != IGNORE_INDEX).sum())
        if step % args.log_every == 0 or step == 1:
            ce_v, pen_v = float(ce.detach()), float(penalty.detach())
            elapsed = time.time() - start
            print(f"[{args.name}] step {step} ce {ce_v:.4f} ({ce_v / math.log(2):.3f} bpb) imf {pen_v:.4f} "
                  f"gnorm {float(grad_norm):.2f} lr {optimizer.param_groups[0]['lr']:.2e} "
                  f"tok/s {tokens_seen / elapsed:,.0f} t {elapsed:.0f}s", flush=True)
        if step % args.eval_every == 0:
            bpb = evaluate(model, periodic_windows, args.batch_size, use_bf16)
            history.append({"step": step, "tokens_seen": tokens_seen, "seconds": round(time.time() - start, 1),
                            "train_ce": float(ce.detach()), "imf_penalty": float(penalty.detach()), "held_out_bpb": bpb})
            print(f"[{args.name}] eval step {step}: held-out {bpb:.4f} bpb", flush=True)
    train_seconds = time.time() - start

    final_windows = eval_windows(held_out, args.seq_len, args.final_eval_windows)
    final_bpb = evaluate(model, final_windows, args.batch_size, use_bf16)
    print(f"[{args.name}] done: {step} steps, {tokens_seen:,} tokens, {train_seconds:.0f}s, "
          f"held-out {final_bpb:.4f} bpb over {final_windows[:, 1:].numel():,} tokens", flush=True)
    metrics = {
        "name": args.name, "n_concepts": args.n_concepts, "concept_decay": args.concept_decay,
        "stateful": args.stateful, "num_params": num_params, "steps": step,
        "stopped_early": stopped_early,
        "tokens_seen": tokens_seen, "train_seconds": round(train_seconds, 1), "held_out_bpb": final_bpb,
        "held_out_eval_tokens": int(final_windows[:, 1:].numel()), "history": history,
        "corpus": corpus.describe(), "python": platform.python_version(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "args": vars(args), "command": "python -m model.training.train " + " ".join(sys.argv[1:]),
    }
    if args.stream_eval:
        metrics["held_out_streamed"] = streamed_eval(model, corpus, args.seq_len)
        print(f"[{args.name}] held-out streamed {metrics['held_out_streamed']['streamed']['bpb']:.4f} bpb, "
              f"in {args.seq_len}-byte windows {metrics['held_out_streamed']['windows']['bpb']:.4f}", flush=True)
    out = Path(args.out)
    model.cpu().eval()
    save_model(model, out, metadata={"name": args.name, "steps": str(step), "tokens_seen": str(tokens_seen),
                                     "held_out_bpb": f"{final_bpb:.4f}"})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(model_card(metrics))
    return metrics


def streamed_eval(model: InfoMamba, corpus, window: int) -> dict:
    """The held-out files streamed whole, and in `window`-token windows from an empty state, through the serving
    path (bits per token by position and per file; see evaluate.py)."""
    documents = split_documents(corpus.held_out, min_tokens=1)  # one per file, so the names line up
    return {"streamed": stream_bpb(model, documents, corpus.held_out_files),
            "windows": stream_bpb(model, documents, corpus.held_out_files, reset_every=window)}


def next_batch(args: argparse.Namespace, tokens: torch.Tensor, generator: torch.Generator,
               streams: DocumentStreams | None, state: StreamState | None,
               ) -> tuple[torch.Tensor, torch.Tensor, StreamState | None]:
    """(inputs (B, L), targets (B, L), state): random windows from an empty state (state None), or each lane's next
    window of its document with the state carried from its last window, reset where a document starts."""
    if streams is None:
        batch = random_windows(tokens, args.batch_size, args.seq_len, generator)
        return batch[:, :-1], batch[:, 1:], None
    windows = streams.next_windows()
    state.reset(torch.nonzero(windows.fresh).flatten().to(state.steps.device))
    return windows.inputs.to(tokens.device), windows.targets.to(tokens.device), state


def model_card(m: dict) -> str:
    c = m["corpus"]
    return f"""# {m['name']}

A byte-level causal InfoMamba (k = {m['n_concepts']} concepts{' — a plain Mamba' if m['n_concepts'] == 0 else ''},
concept_decay {m['concept_decay']}),
{m['num_params']:,} parameters, trained by `model/training/train.py`.

- Corpus: the `.py` files of the Python {m['python']} standard library at `{c['root']}` (site-packages skipped),
  sorted by relative path; a file is held out when `int(sha256(relative_path)[:8], 16) % 1000 < 20`.
  Train: {c['num_train_files']} files, {c['num_train_tokens']:,} tokens; held out: {c['num_held_out_files']} files,
  {c['num_held_out_tokens']:,} tokens (bytes, plus one end-of-file token after each file).
- Training: {m['steps']} steps, {m['tokens_seen']:,} tokens seen, {m['train_seconds']:.0f} s on {m['device']}
  (torch {m['torch']}); {_windows_text(m)}, batch {m['args']['batch_size']}, AdamW
  (lr {m['args']['lr']}, cosine), bf16 autocast on GPU, IMF redundancy weight {m['args']['imf_weight']}.
- Held-out: **{m['held_out_bpb']:.4f} bits per byte** over {m['held_out_eval_tokens']:,} tokens (non-overlapping
  {m['args']['seq_len']}-byte windows, each from an empty state).
- Command: `{m['command']}`
"""


def _windows_text(m: dict) -> str:
    if m["stateful"]:
        return (f"whole files in consecutive {m['args']['seq_len']}-byte windows, the state carried and detached "
                "between them (truncated BPTT)")
    return f"random {m['args']['seq_len']}-byte windows from an empty state"


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
