"""Train models of equal parameter count on an in-context task and report their accuracy (issue 11, the
MambaFormer comparison): a pure InfoMamba (k concepts), a pure Mamba (k = 0), and a MambaFormer-style hybrid (a
Mamba layer first, attention layers between Mamba layers, no positional encoding).

    python -m model.training.train_tasks --task mqar --out runs/tasks --steps 3000 --minutes 1
    python -m model.training.train_tasks --task parity --out runs/tasks --steps 3000 --minutes 1

The first arm (InfoMamba at --d-model) sets the parameter budget; the others take the d_model that comes closest
to it. Every arm trains on the same number of fresh batches (--steps; --minutes caps each arm's wall clock) with
AdamW and the cosine schedule of train.py, then is scored on --eval-batches batches it never saw, through the
serving forward (the Triton kernels on a GPU), by exact-match accuracy at the scored answers. Writes into --out:
one model directory per arm ({task}-{arm}: config.json, model.safetensors, metrics.json, README.md) and
{task}-results.md, the table.
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

from model.config import InfoMambaConfig
from model.infomamba import InfoMamba
from model.train_forward import train_forward
from model.training.corpus import IGNORE_INDEX
from model.training.tasks import MqarTask, SparseParityTask
from model.training.train import add_optimizer_args, build_optimizer, lr_at, redundancy_penalty
from model.weights import save_model

ARMS = ("infomamba", "mamba", "hybrid")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("mqar", "parity"), required=True)
    p.add_argument("--out", required=True, help="directory for the arms' model directories and the results table")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--d-model", type=int, default=64, help="the InfoMamba arm's width; the others match its size")
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-concepts", type=int, default=16, help="k of the InfoMamba arm")
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--heads", type=int, default=4, help="the hybrid's attention heads")
    p.add_argument("--attention-every", type=int, default=2,
                   help="the hybrid: layer i is attention when i %% this == this - 1 (a Mamba layer first)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap per arm")
    p.add_argument("--batch-size", type=int, default=64)
    add_optimizer_args(p, lr=3e-3, imf_pool=16)  # the IMF penalty applies to the InfoMamba arm only
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--log-every", type=int, default=200)
    # MQAR
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--keys", type=int, default=64)
    p.add_argument("--values", type=int, default=64)
    # sparse parity
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--sparsity", type=int, default=2)
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:
        p.error(f"--arms: unknown {unknown}, expected some of {', '.join(ARMS)}")
    return args


def make_task(args: argparse.Namespace):
    if args.task == "mqar":
        return MqarTask(args.pairs, args.queries, args.keys, args.values)
    return SparseParityTask(args.bits, args.sparsity, args.examples, args.examples // 2)


def arm_config(arm: str, d_model: int, task, args: argparse.Namespace) -> InfoMambaConfig:
    """The arm's model at width d_model: the hybrid's attention sees the whole sequence (window = its length)."""
    fields = dict(d_model=d_model, vocab_size=task.vocab_size, d_state=args.d_state, name=f"{args.task}-{arm}")
    if arm == "infomamba":
        return InfoMambaConfig(n_layers=args.n_layers, n_concepts=args.n_concepts, **fields)
    if arm == "mamba":
        return InfoMambaConfig(n_layers=args.n_layers, n_concepts=0, **fields)
    every = args.attention_every
    layers = [{"type": "attention", "n_heads": args.heads, "attention_window": task.seq_len}
              if i % every == every - 1 else {"type": "infomamba"} for i in range(args.n_layers)]
    return InfoMambaConfig(layers=layers, n_concepts=0, **fields)


def num_params(config: InfoMambaConfig) -> int:
    return sum(p.numel() for p in InfoMamba(config).parameters())


def matched_width(arm: str, budget: int, task, args: argparse.Namespace) -> int:
    """The d_model whose parameter count comes closest to the budget: a multiple of 4 (d_concept = d_model / 4), and
    for the hybrid of 8 and of its attention heads."""
    step = math.lcm(args.heads, 8) if arm == "hybrid" else 4
    widths = range(step * max(args.d_model // (2 * step), 1), 2 * args.d_model + step, step)
    return min(widths, key=lambda d: abs(num_params(arm_config(arm, d, task, args)) - budget))


def train_arm(arm: str, config: InfoMambaConfig, task, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    use_bf16 = device.type == "cuda"
    model = InfoMamba(config).to(device).train()
    optimizer = build_optimizer(model, args)
    data = torch.Generator().manual_seed(args.seed)  # every arm sees the same batches
    start, step, budget_s = time.time(), 0, args.minutes * 60 if args.minutes else None
    while step < args.steps and (budget_s is None or time.time() - start < budget_s):
        progress = max(step / args.steps, (time.time() - start) / budget_s if budget_s else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, progress, args)
        batch = task.sample(args.batch_size, data)
        inputs, targets = batch.inputs.to(device), batch.targets.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = train_forward(model, inputs)
            ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=IGNORE_INDEX)
            loss = ce + args.imf_weight * redundancy_penalty(out.branches, args.imf_pool).to(ce.device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        if step % args.log_every == 0 or step == 1:
            print(f"[{config.name}] step {step} ce {float(ce.detach()):.4f} t {time.time() - start:.0f}s", flush=True)
    seconds = time.time() - start
    accuracy = evaluate(model.eval(), task, args)
    print(f"[{config.name}] done: {step} steps, {seconds:.0f}s, accuracy {accuracy:.4f}", flush=True)
    metrics = {"task": args.task, "arm": arm, "name": config.name, "num_params": sum(p.numel() for p in model.parameters()),
               "d_model": config.d_model, "layer_types": list(config.layer_types), "n_concepts": config.n_concepts,
               "steps": step, "train_seconds": round(seconds, 1), "accuracy": accuracy, "seed": args.seed,
               "task_config": {name: getattr(task, name) for name in task.__slots__},
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "python": platform.python_version(), "args": vars(args),
               "command": "python -m model.training.train_tasks " + " ".join(sys.argv[1:])}
    directory = Path(args.out) / config.name
    save_model(model.cpu(), directory, metadata={"task": args.task, "accuracy": f"{accuracy:.4f}"})
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (directory / "README.md").write_text(model_card(metrics))
    return metrics


@torch.inference_mode()
def evaluate(model: InfoMamba, task, args: argparse.Namespace) -> float:
    """Exact-match accuracy at the scored answers of fresh batches, through the serving forward."""
    data = torch.Generator().manual_seed(args.seed + 1_000_003)  # batches no arm trained on
    correct = total = 0
    for _ in range(args.eval_batches):
        batch = task.sample(args.batch_size, data)
        out, _ = model(batch.inputs.to(model.device))
        predicted = out.head.view(*batch.inputs.shape, -1).argmax(-1).cpu()
        correct += int((predicted == batch.targets)[batch.scored].sum())
        total += int(batch.scored.sum())
    return correct / total


def model_card(m: dict) -> str:
    return f"""# {m['name']}

A {m['arm']} model ({', '.join(m['layer_types'])}; d_model {m['d_model']}, k = {m['n_concepts']}),
{m['num_params']:,} parameters, trained by `model/training/train_tasks.py` on `{m['task']}` ({m['task_config']}).

- {m['steps']} steps of {m['args']['batch_size']} fresh sequences, {m['train_seconds']:.0f} s on {m['device']}
  (torch {m['torch']}), seed {m['seed']}.
- Accuracy: **{m['accuracy']:.4f}** (exact match at the scored answers of {m['args']['eval_batches']} unseen
  batches, through the serving forward).
- Command: `{m['command']}`
"""


def results_table(rows: list[dict]) -> str:
    lines = ["| task | model | layers | d_model | params | steps | seconds | accuracy |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for m in rows:
        kinds = "+".join(sorted(set(m["layer_types"]))) if len(set(m["layer_types"])) > 1 else m["layer_types"][0]
        lines.append(f"| {m['task']} | {m['arm']} (k={m['n_concepts']}) | {len(m['layer_types'])} {kinds} | "
                     f"{m['d_model']} | {m['num_params']:,} | {m['steps']} | {m['train_seconds']:.0f} | "
                     f"{m['accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    task = make_task(args)
    arms = args.arms.split(",")
    budget = num_params(arm_config(arms[0], args.d_model, task, args))
    rows = []
    for arm in arms:
        d_model = args.d_model if arm == arms[0] else matched_width(arm, budget, task, args)
        rows.append(train_arm(arm, arm_config(arm, d_model, task, args), task, args))
    table = results_table(rows)
    Path(args.out, f"{args.task}-results.md").write_text(table)
    print(table, flush=True)
    return rows


if __name__ == "__main__":
    main()
