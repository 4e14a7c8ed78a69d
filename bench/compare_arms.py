"""A fair comparison of the concepts (issue 9, item 4): four arms, three seeds each, token-matched, stateful.

    python bench/compare_arms.py --out OUT/arms                  # the GPU run: 12 trainings at once on one GPU
    python bench/compare_arms.py --budget-check                  # estimate the wall time, launch nothing
    python bench/compare_arms.py --tiny --out /tmp/arms          # toy sizes, CPU: a smoke run (numbers mean nothing)

Arms (the default model's sizes: d_model 256, 6 layers, d_state 16):
- k0-matched: a plain Mamba (k = 0) made wider (--k0-match width, the default) or deeper (layers) until its
  parameter count is the closest to the k = 16 arms' (within 3%, or this script stops);
- k16-none: k = 16, concept_decay none (a running mean over the whole past);
- k16-learned: k = 16, concept_decay learned (a decay per concept that training chooses);
- k16-learned-imf0: as k16-learned with the IMF redundancy penalty off (--imf-weight 0).

Every run is `model/training/train.py --stateful` (whole documents in consecutive windows, the state carried and
detached) for the same fixed --steps, --batch-size and --seq-len; run s of every arm uses seed s, so the arms of one
seed read the same documents in the same order (the token counts match exactly). All runs start at once, one process
each, sharing the GPU; each process then streams its model through the serving path (model/training/evaluate.py
stream_bpb, whole documents from an empty state, bits per byte by position in the document) over
(a) the stdlib held-out split, its near-duplicates of training files (model/training/near_duplicates.py) apart from
    the clean files, and
(b) third-party Python code the model never saw: the .py files of installed packages (default fastapi, starlette,
    httpx, pydantic, found with importlib; --third-party DIR ... instead), up to --third-party-bytes of each: its
    longest files that fit in half of that, then others picked by a hash of the path; names, versions and licenses
    are recorded.
Writes three files into --out: compare_arms.json (every run, every number), compare_arms.md (the tables, also
printed) and logs.txt (every run's log); each run's directory --work-dir/<arm>-s<seed>/ (a temporary directory by
default) holds its model, metrics.json, eval.json and log.txt.

Time (--budget-check): training is memory-bound: train_forward materializes (batch, length, d_inner, d_state) fp32
tensors per layer. Model: seconds per step = bytes moved / bandwidth + aten ops x a per-op floor, where bytes and
ops are counted on the CPU (a TorchDispatchMode over one batch-1 step, scaled to the batch). Calibrated on the
bundled model's runs (two processes sharing one H100 80GB for 330 s: k = 16 861 steps, k = 0 900 steps, batch
32 x 512): about 2.4 TB/s effective and 2 us per op; the estimate for an H200 assumes 1.25x that bandwidth and
3 us per op (twelve processes time-slicing one GPU), which should err long. A GPU shared by processes runs one at a
time, so the twelve runs' step times add up. A --deadline-s safety net stops training early (train.py
--stop-after-minutes, recorded as stopped_early: not token-matched) and kills what is left at the deadline.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import InfoMambaConfig  # noqa: E402
from model.infomamba import InfoMamba  # noqa: E402
from model.tokenizer import ByteTokenizer  # noqa: E402
from model.training.corpus import is_held_out, list_files, load_corpus  # noqa: E402
from model.training.near_duplicates import NEAR_DUPLICATE_OVERLAP, line_overlap, split_near_duplicates  # noqa: E402

THIRD_PARTY_PACKAGES = ("fastapi", "starlette", "httpx", "pydantic")
CLEAN, NEAR, THIRD = "held_out_clean", "held_out_near_duplicates", "third_party"
WINDOWS_SUFFIX = "_windows"  # a group's files again in --seq-len windows, each from an empty state
CLEAN_WINDOWS = CLEAN + WINDOWS_SUFFIX
K0_ARM = "k0-matched"
PARAM_TOLERANCE = 0.03
# --budget-check's calibration (see the docstring): H100 effective bandwidth and per-op floor fitted to the bundled
# runs; the H200 guesses err long.
H200_BANDWIDTH = 1.25 * 2.4e12  # bytes/s
H200_OP_SECONDS = 3e-6
STARTUP_SECONDS = 30  # interpreter + torch import, CUDA context, corpus, per process (all start at once)
EVAL_RESERVE_SECONDS = 100  # Triton compiles plus ~0.6M streamed tokens per model, twelve models sharing the GPU

# window_evals: held-out windows of train.py's own (windowed, from an empty state) evaluation at the end;
# processes: 0 means one per run.
GPU = dict(d_model=256, n_layers=6, d_state=16, n_concepts=16, steps=450, batch_size=8, seq_len=512,
           third_party_bytes=128 * 1024, eval_max_tokens=None, log_every=25, deadline_s=480.0, window_evals=64,
           processes=0)
TINY = dict(d_model=16, n_layers=2, d_state=4, n_concepts=4, steps=3, batch_size=2, seq_len=32,
            third_party_bytes=3 * 1024, eval_max_tokens=200, log_every=1, deadline_s=0.0, window_evals=2,
            processes=2)


@dataclass
class Arm:
    name: str
    n_concepts: int
    concept_decay: str
    imf_weight: float
    d_model: int
    n_layers: int
    num_params: int = 0


def count_params(d_model: int, n_layers: int, d_state: int, n_concepts: int, concept_decay: str) -> int:
    config = InfoMambaConfig(d_model=d_model, n_layers=n_layers, vocab_size=ByteTokenizer.vocab_size, d_state=d_state,
                             n_concepts=n_concepts, concept_decay=concept_decay)
    with torch.device("meta"):
        return sum(p.numel() for p in InfoMamba(config).parameters())


def match_k0(target: int, d_model: int, n_layers: int, d_state: int, how: str) -> tuple[int, int, int]:
    """(d_model, n_layers, params) of the k = 0 model whose parameter count is the closest to `target`: wider
    (multiples of 8 from a multiple-of-8 width, else any width) or deeper."""
    if how == "layers":
        candidates = [(d_model, n) for n in range(n_layers, 4 * n_layers + 1)]
    else:
        step = 8 if d_model % 8 == 0 and d_model >= 64 else 1
        candidates = [(d, n_layers) for d in range(d_model, 2 * d_model + 1, step)]
    scored = [(abs(count_params(d, n, d_state, 0, "none") - target), d, n) for d, n in candidates]
    _, d, n = min(scored)
    params = count_params(d, n, d_state, 0, "none")
    if abs(params / target - 1) > PARAM_TOLERANCE:
        raise SystemExit(f"compare_arms: no k = 0 {how} within {PARAM_TOLERANCE:.0%} of {target:,} parameters "
                         f"(closest: d_model {d}, {n} layers, {params:,})")
    return d, n, params


def build_arms(args: argparse.Namespace) -> list[Arm]:
    k = args.n_concepts
    arms = [Arm(f"k{k}-none", k, "none", args.imf_weight, args.d_model, args.n_layers),
            Arm(f"k{k}-learned", k, "learned", args.imf_weight, args.d_model, args.n_layers),
            Arm(f"k{k}-learned-imf0", k, "learned", 0.0, args.d_model, args.n_layers)]
    for arm in arms:
        arm.num_params = count_params(arm.d_model, arm.n_layers, args.d_state, k, arm.concept_decay)
    d, n, params = match_k0(arms[0].num_params, args.d_model, args.n_layers, args.d_state, args.k0_match)
    return [Arm(K0_ARM, 0, "none", args.imf_weight, d, n, params)] + arms


# -- what the models are evaluated on ------------------------------------------------------------------------------


def held_out_groups(root: str | None, max_files: int | None) -> tuple[dict[str, list[str]], dict]:
    """The stdlib held-out split as file paths: clean files and near-duplicates of training files apart."""
    corpus = load_corpus(root, max_files)
    overlap = line_overlap(corpus.root, corpus.train_files, corpus.held_out_files)
    clean, near = split_near_duplicates(overlap)
    groups = {CLEAN: [str(corpus.root / f) for f in clean], NEAR: [str(corpus.root / f) for f in near]}
    info = {"root": str(corpus.root), "near_duplicate_threshold": NEAR_DUPLICATE_OVERLAP,
            "line_overlap": {name: round(share, 3) for name, share in overlap.items()}, "clean": clean, "near": near}
    return groups, info


def package_dir(name: str) -> Path | None:
    """An installed package's directory, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_license(name: str) -> dict:
    try:
        meta = importlib.metadata.metadata(name)
    except importlib.metadata.PackageNotFoundError:
        return {"version": None, "license": None}
    # License-Expression (PEP 639) where the package has it, else the License field's first line, else classifiers
    license_lines = (meta.get("License") or "").strip().splitlines()
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    license = meta.get("License-Expression") or (license_lines[0] if license_lines else "") or ", ".join(classifiers)
    return {"version": meta.get("Version"), "license": license or None}


def pick_files(root: Path, quota: int, min_bytes: int = 1024) -> list[Path]:
    """*.py files of at least min_bytes under root, whole (the position buckets need their lengths), within quota
    bytes: first the longest files that fit in half the quota (so the late buckets have tokens), then the rest in
    the order of sha256 of their relative path, each taken while the total stays within the quota."""
    files = [root / f for f in list_files(root)] if root.is_dir() else [root]
    sizes = {f: f.stat().st_size for f in files if f.stat().st_size >= min_bytes}
    picked, total = [], 0
    by_hash = sorted(sizes, key=lambda f: hashlib.sha256(f.relative_to(root).as_posix().encode()).hexdigest()
                     if root.is_dir() else "")
    for order, limit in ((sorted(sizes, key=lambda f: (-sizes[f], f)), quota // 2), (by_hash, quota)):
        for f in order:
            if f not in picked and total + sizes[f] <= limit:
                picked.append(f)
                total += sizes[f]
    return sorted(picked)


def third_party_group(paths: list[str], packages: list[str], quota: int) -> tuple[list[str], list[dict]]:
    """The third-party files and, per source, what it is (package, version, license, directory, files, bytes)."""
    sources = [(Path(p).name, Path(p)) for p in paths] if paths else [(n, package_dir(n)) for n in packages]
    files, info = [], []
    for name, root in sources:
        if root is None or not root.exists():
            print(f"compare_arms: third-party source {name}: not found, skipped", flush=True)
            continue
        picked = pick_files(root, quota)
        files += [str(f) for f in picked]
        info.append({"name": name, **package_license(name), "path": str(root),
                     "files": [f.relative_to(root).as_posix() if root.is_dir() else f.name for f in picked],
                     "bytes": sum(f.stat().st_size for f in picked)})
    return files, info


# -- one run: train, then stream the model over every group (a child process) ---------------------------------------


def run_one(plan_path: str) -> None:
    from model.training.evaluate import read_documents, stream_bpb
    from model.training.train import parse_args, train
    from model.weights import load_model

    plan = json.loads(Path(plan_path).read_text())
    torch.manual_seed(plan["seed"])  # train() seeds itself too; this is for runs that share a process
    metrics = train(parse_args(plan["train_argv"]))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the training's cached blocks, for the processes still training
    model = load_model(plan["out"], device=plan["device"])
    evals, errors = {}, {}
    passes = [(label, paths, None) for label, paths in plan["groups"].items()]
    if plan["windows"]:  # the same files again, the state emptied every window: the streaming gap
        passes += [(group + WINDOWS_SUFFIX, plan["groups"][group], plan["windows"])
                   for group in plan.get("window_groups", [CLEAN])]
    for label, paths, reset_every in passes:
        if not paths:
            continue
        docs, names = read_documents(paths)
        if plan["eval_max_tokens"]:  # smoke runs: the reference ops step one token at a time
            docs = [d[:plan["eval_max_tokens"]] for d in docs]
        start = time.time()
        try:
            evals[label] = stream_bpb(model, docs, names, plan["chunk_len"], plan["eval_batch_size"], reset_every)
        except Exception as exc:  # keep the training record and the other groups
            errors[label] = f"{type(exc).__name__}: {exc}"
            print(f"[{plan['run']}] {label}: evaluation failed: {errors[label]}", flush=True)
            continue
        evals[label]["seconds"] = round(time.time() - start, 1)
        print(f"[{plan['run']}] {label}: {evals[label]['bpb']:.4f} bpb over {evals[label]['tokens']:,} tokens "
              f"({evals[label]['seconds']:.0f}s)", flush=True)
    keep = ("num_params", "steps", "stopped_early", "tokens_seen", "train_seconds", "held_out_bpb", "history", "device")
    record = {"run": plan["run"], "arm": plan["arm"], "seed": plan["seed"],
              "train": {key: metrics[key] for key in keep}, "eval": evals, "eval_errors": errors}
    (Path(plan["out"]) / "eval.json").write_text(json.dumps(record, indent=2) + "\n")


# -- the parent: launch, watch, summarize -----------------------------------------------------------------------------


def train_argv(arm: Arm, seed: int, out: Path, args: argparse.Namespace, name: str | None = None) -> list[str]:
    """train.py's arguments for one run; name: the model's name in its config (default: the run's name)."""
    argv = ["--out", str(out), "--name", name or f"{arm.name}-s{seed}", "--d-model", str(arm.d_model),
            "--n-layers", str(arm.n_layers), "--n-concepts", str(arm.n_concepts), "--d-state", str(args.d_state),
            "--concept-decay", arm.concept_decay, "--imf-weight", str(arm.imf_weight), "--stateful",
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--seed", str(seed), "--eval-every", str(args.steps), "--eval-windows", str(args.window_evals),
            "--final-eval-windows", str(args.window_evals), "--log-every", str(args.log_every), "--device", args.device]
    if args.max_files:
        argv += ["--max-files", str(args.max_files)]
    if args.corpus_root:
        argv += ["--corpus-root", args.corpus_root]
    if args.warmup_steps is not None:
        argv += ["--warmup-steps", str(args.warmup_steps)]
    if args.stop_after_minutes:
        argv += ["--stop-after-minutes", f"{args.stop_after_minutes:.2f}"]
    return argv


STEP_RE = re.compile(r"step (\d+) .* t (\d+)s")


def progress_line(name: str, log: Path, steps: int) -> str:
    """The process's last training step (and when its training should end at its pace so far), else its last line."""
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    last = lines[-1] if lines else "(starting)"
    match = STEP_RE.search(last)
    if match and int(match[1]) > 0:
        step, seconds = int(match[1]), int(match[2])
        bpb = re.search(r"\(([\d.]+) bpb\)", last)
        return (f"  {name}: step {step}/{steps} at {seconds}s, train {bpb[1] if bpb else '?'} bpb, "
                f"training ends in ~{seconds / step * (steps - step):.0f}s")
    return f"  {name}: {last[-110:]}"


def launch(runs: list[dict], args: argparse.Namespace, t0: float) -> None:
    """Start every process at once (by default one per run; --processes N deals the runs out to N processes, which
    run theirs one after another), print each process's last log line every --progress-s, and kill what is still
    running at the deadline."""
    num = min(args.processes or len(runs), len(runs))
    shares = [runs[i::num] for i in range(num)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num)))
    procs = []
    for i, share in enumerate(shares):
        log_path = share[0]["log"] if len(share) == 1 else str(Path(args.work_dir) / f"process-{i}.log")
        log = open(log_path, "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", *(run["plan"] for run in share)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=Path(__file__).resolve().parents[1])
        procs.append(("+".join(run["run"] for run in share) if len(share) < 3 else f"process-{i}", proc, log))
    print(f"[{time.time() - t0:.0f}s] started {len(runs)} runs in {len(procs)} processes", flush=True)
    last_report = time.time()
    while any(proc.poll() is None for _, proc, _ in procs):
        time.sleep(0.2 if args.tiny else 2)
        if args.deadline_s and time.time() - t0 > args.deadline_s:
            for name, proc, _ in procs:
                if proc.poll() is None:
                    print(f"compare_arms: deadline {args.deadline_s:.0f}s passed: killing {name} (pid {proc.pid})",
                          flush=True)
                    proc.kill()
            break
        if time.time() - last_report >= args.progress_s:
            last_report = time.time()
            live = sum(proc.poll() is None for _, proc, _ in procs)
            print(f"[{time.time() - t0:.0f}s] {live} of {len(procs)} processes going", flush=True)
            for name, _, log in procs:
                print(progress_line(name, Path(log.name), args.steps), flush=True)
    for name, proc, log in procs:
        proc.wait()
        log.close()
        if proc.returncode and proc.returncode > 0:  # (a process killed at the deadline was reported above)
            tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-5:]
            print(f"compare_arms: {name} exited {proc.returncode}:\n    " + "\n    ".join(tail), flush=True)
    print(f"[{time.time() - t0:.0f}s] all runs ended", flush=True)


def mean_sd(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(arms: list[Arm], records: dict[str, list[dict]]) -> dict:
    """Per arm: mean ± sd (sample sd over seeds) of every group's bpb and of each position bucket's, the training
    figures, and the bpb difference to k0-matched paired by seed (same data order)."""
    baseline = {r["seed"]: r for r in records.get(K0_ARM, [])}
    summary = {}
    for arm in arms:
        runs = records.get(arm.name, [])
        row = {"params": arm.num_params, "seeds": [r["seed"] for r in runs],
               "steps": sorted({r["train"]["steps"] for r in runs}),
               "tokens_seen": mean_sd([r["train"]["tokens_seen"] for r in runs]),
               "train_seconds": mean_sd([r["train"]["train_seconds"] for r in runs]),
               "stopped_early": any(r["train"]["stopped_early"] for r in runs)}
        for group in (CLEAN, NEAR, THIRD, CLEAN_WINDOWS):
            scored = [r for r in runs if group in r["eval"]]
            if not scored:
                continue
            buckets = {}
            for r in scored:
                for b in r["eval"][group]["by_position"]:
                    buckets.setdefault((b["start"], b["end"]), []).append(b["bpb"])
            row[group] = {
                "bpb": mean_sd([r["eval"][group]["bpb"] for r in scored]),
                "tokens": scored[0]["eval"][group]["tokens"],
                "by_position": [{"start": s, "end": e, **mean_sd(v)} for (s, e), v in sorted(buckets.items())],
                "minus_k0_paired": mean_sd([r["eval"][group]["bpb"] - baseline[r["seed"]]["eval"][group]["bpb"]
                                            for r in scored if r["seed"] in baseline
                                            and group in baseline[r["seed"]]["eval"]]),
            }
        both = [r for r in runs if CLEAN in r["eval"] and CLEAN_WINDOWS in r["eval"]]
        row["clean_streamed_minus_windows"] = mean_sd([r["eval"][CLEAN]["bpb"] - r["eval"][CLEAN_WINDOWS]["bpb"]
                                                       for r in both])
        summary[arm.name] = row
    return summary


def fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat or stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def bucket_label(start: int, end: int | None) -> str:
    def short(n):
        return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)
    return f"{short(start)}-{short(end)}" if end is not None else f"{short(start)}+"


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def position_cells(row: dict, group: str, buckets: list[tuple]) -> list[str]:
    by_pos = {(b["start"], b["end"]): b for b in row.get(group, {}).get("by_position", [])}
    return [f"{by_pos[b]['mean']:.3f}" if b in by_pos else "n/a" for b in buckets]


def tables(arms: list[Arm], summary: dict) -> list[str]:
    """Markdown: the main table (the clean held-out files' bpb by position in the main columns), the third-party
    files by position, and the paired differences, the windowed score and the training figures."""
    buckets = {CLEAN: set(), THIRD: set()}
    for row in summary.values():
        for group in buckets:
            buckets[group].update((b["start"], b["end"]) for b in row.get(group, {}).get("by_position", []))
    clean_b, third_b = sorted(buckets[CLEAN]), sorted(buckets[THIRD])
    lines = [md_row(["arm", "params", "seeds", "held-out clean bpb", "third-party bpb"]
                    + [f"clean {bucket_label(*b)}" for b in clean_b] + ["training s"]),
             md_row(["---"] + ["---:"] * (5 + len(clean_b)))]
    for arm in arms:
        row = summary[arm.name]
        lines.append(md_row([arm.name, f"{arm.num_params:,}", str(len(row["seeds"])),
                             fmt(row.get(CLEAN, {}).get("bpb")), fmt(row.get(THIRD, {}).get("bpb"))]
                            + position_cells(row, CLEAN, clean_b) + [fmt(row["train_seconds"], 0)]))
    if third_b:
        lines += ["", md_row(["arm"] + [f"third-party {bucket_label(*b)}" for b in third_b]),
                  md_row(["---"] + ["---:"] * len(third_b))]
        lines += [md_row([arm.name] + position_cells(summary[arm.name], THIRD, third_b)) for arm in arms]
    lines += ["", md_row(["arm", "clean − k0 (paired by seed)", "third-party − k0 (paired)", "clean in windows",
                          "clean streamed − windows", "near-duplicates bpb", "steps", "tokens per run",
                          "stopped early"]),
              md_row(["---"] + ["---:"] * 7 + ["---"])]
    for arm in arms:
        row = summary[arm.name]
        lines.append(md_row([arm.name, fmt(row.get(CLEAN, {}).get("minus_k0_paired")),
                             fmt(row.get(THIRD, {}).get("minus_k0_paired")), fmt(row.get(CLEAN_WINDOWS, {}).get("bpb")),
                             fmt(row["clean_streamed_minus_windows"]), fmt(row.get(NEAR, {}).get("bpb")),
                             "/".join(map(str, row["steps"])) or "n/a", fmt(row["tokens_seen"], 0),
                             "YES: not token-matched" if row["stopped_early"] else "no"]))
    return lines


# -- --budget-check -------------------------------------------------------------------------------------------------


def step_cost(arm: Arm, args: argparse.Namespace) -> tuple[float, int]:
    """(bytes moved per token, aten ops per step) of one stateful training step, counted on the CPU at batch 1."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from model.train_forward import train_forward
    from model.training.train import redundancy_penalty

    views = {"view", "_unsafe_view", "reshape", "t", "transpose", "expand", "slice", "select", "as_strided",
             "permute", "unsqueeze", "squeeze", "detach", "alias", "split", "split_with_sizes", "unbind", "narrow",
             "_reshape_alias", "lift_fresh"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes, self.ops = 0, 0

        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
            out = func(*args_, **(kwargs or {}))
            if func._schema.name.split("::")[-1] not in views:
                self.ops += 1
                for t in torch.utils._pytree.tree_leaves((args_, kwargs, out)):
                    if isinstance(t, torch.Tensor):
                        self.bytes += min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
            return out

    torch.manual_seed(0)
    config = InfoMambaConfig(d_model=arm.d_model, n_layers=arm.n_layers, vocab_size=ByteTokenizer.vocab_size,
                             d_state=args.d_state, n_concepts=arm.n_concepts, concept_decay=arm.concept_decay)
    model = InfoMamba(config).train()
    tokens = torch.randint(0, 256, (1, args.seq_len + 1))
    count = Count()
    with count:
        out = train_forward(model, tokens[:, :-1], model.empty_state(1))
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), tokens[0, 1:])
        (loss + arm.imf_weight * redundancy_penalty(out.branches, 64)).backward()
    return count.bytes / args.seq_len, count.ops


def budget_check(arms: list[Arm], args: argparse.Namespace, eval_reserve_s: float = EVAL_RESERVE_SECONDS) -> dict:
    """Print and return the wall-time estimate of args.seeds runs of each arm, all sharing one GPU."""
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    tokens = args.batch_size * args.seq_len
    rows, train_s = [], 0.0
    for arm in arms:
        per_token, ops = step_cost(arm, args)
        step_s = per_token * tokens / H200_BANDWIDTH + ops * H200_OP_SECONDS
        train_s += step_s * args.steps * args.seeds
        rows.append({"arm": arm.name, "bytes_per_token": per_token, "ops_per_step": ops, "step_s": step_s})
        print(f"{arm.name}: {per_token / 1e6:.1f} MB moved per token, {ops} ops per step -> {1e3 * step_s:.1f} ms "
              f"per step of {tokens} tokens (all processes' steps add up)", flush=True)
    total = STARTUP_SECONDS + train_s + eval_reserve_s
    print(f"estimate on an H200: {args.seeds * len(arms)} runs x {args.steps} steps: training {train_s:.0f}s + "
          f"startup {STARTUP_SECONDS}s + evaluation reserve {eval_reserve_s:.0f}s = {total:.0f}s "
          f"({total / 60:.1f} min); deadline {args.deadline_s:.0f}s; per-process memory about "
          f"{1.3 * tokens / 1024:.1f} GB (fp32 scan tensors)", flush=True)
    return {"arms": rows, "train_s": train_s, "total_s": total}


# -- main -------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs"), "compare_arms"),
                   help="results: compare_arms.json, compare_arms.md (the tables) and logs.txt (three files)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--arms", default=None, help="comma-separated subset of the arm names (default: all four)")
    p.add_argument("--no-windows", action="store_true",
                   help="skip scoring the clean held-out files in --seq-len windows from an empty state")
    add_run_args(p, GPU, TINY)
    p.add_argument("--run-one", nargs="+", default=None, help=argparse.SUPPRESS)
    return finish_args(p.parse_args(argv), GPU, TINY)


def add_run_args(p: argparse.ArgumentParser, gpu: dict, tiny: dict) -> None:
    """The options of a plan of runs (sizes, training, evaluation sets, launch); `gpu` and `tiny` are the defaults
    of a GPU run and of --tiny, keyed as GPU and TINY (finish_args fills them in)."""
    p.add_argument("--work-dir", default=None,
                   help="the runs' directories (models, metrics, logs); default: a new temporary directory")
    p.add_argument("--tiny", action="store_true", help="toy sizes, few steps, the CPU: a smoke run")
    p.add_argument("--budget-check", action="store_true", help="print a wall-time estimate, launch nothing")
    p.add_argument("--k0-match", choices=("width", "layers"), default="width")
    p.add_argument("--imf-weight", type=float, default=0.01, help="the IMF penalty's weight where it is on")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--max-files", type=int, default=None, help="stdlib files for training (default all; --tiny: few)")
    p.add_argument("--corpus-root", default=None, help="train.py's corpus (default: this interpreter's stdlib; "
                                                       "--tiny: a copy of the first --max-files files)")
    p.add_argument("--third-party", nargs="*", default=None,
                   help="directories (or files) of third-party Python code; default: the installed packages named "
                        "by --third-party-packages, found with importlib")
    p.add_argument("--third-party-packages", default=",".join(THIRD_PARTY_PACKAGES))
    p.add_argument("--chunk-len", type=int, default=4096, help="streaming chunk of the evaluation")
    p.add_argument("--eval-batch-size", type=int, default=8, help="documents streamed side by side")
    p.add_argument("--progress-s", type=float, default=30.0)
    p.add_argument("--device", default=None)
    for key, value in gpu.items():
        if key != "eval_max_tokens":
            p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                           help=f"default {value} (--tiny: {tiny[key]})")
    p.add_argument("--eval-max-tokens", type=int, default=None, help="score only each document's first tokens")


def finish_args(args: argparse.Namespace, gpu: dict, tiny: dict) -> argparse.Namespace:
    for key, value in (tiny if args.tiny else gpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if args.tiny and args.warmup_steps is None:
        args.warmup_steps = 1
    return args


def tiny_corpus(root: Path, max_files: int | None) -> tuple[str, int]:
    """A copy of the stdlib's first max_files files (default: the shortest prefix that holds two held-out files),
    at the same relative paths, so the same split: each tiny run then lists a small tree, not the whole stdlib."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = list_files(stdlib)
    if max_files is None:
        held = [i for i, f in enumerate(files) if is_held_out(f)]
        max_files = held[1] + 1 if len(held) > 1 else len(files)
    for name in files[:max_files]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stdlib / name, root / name)
    return str(root), max_files


SETTINGS = ("work_dir", "steps", "batch_size", "seq_len", "seeds", "d_state", "k0_match", "imf_weight", "device",
            "max_files", "corpus_root", "eval_max_tokens", "chunk_len", "eval_batch_size", "no_windows", "deadline_s",
            "stop_after_minutes", "tiny")


def print_arms(arms: list[Arm]) -> None:
    reference = next((a for a in arms if a.n_concepts), arms[0])  # the first arm with concepts
    for arm in arms:
        print(f"{arm.name}: d_model {arm.d_model}, {arm.n_layers} layers, k {arm.n_concepts}, decay "
              f"{arm.concept_decay}, imf {arm.imf_weight}: {arm.num_params:,} params "
              f"({arm.num_params / reference.num_params - 1:+.1%} vs {reference.name})", flush=True)


def eval_groups(args: argparse.Namespace) -> tuple[dict[str, list[str]], dict, list[dict]]:
    """(groups: label -> file paths, the held-out split's description, the third-party sources' descriptions);
    with --tiny and no --corpus-root, first a copy of a few stdlib files in the work directory."""
    if args.tiny and args.corpus_root is None:
        args.corpus_root, args.max_files = tiny_corpus(Path(args.work_dir) / "tiny_corpus", args.max_files)
    groups, held_info = held_out_groups(args.corpus_root, args.max_files)
    packages = [n for n in args.third_party_packages.split(",") if n]
    groups[THIRD], third_info = third_party_group(args.third_party, packages, args.third_party_bytes)
    sources = ", ".join(f"{s['name']} {s['version']} ({s['license']}): {len(s['files'])} files, {s['bytes']:,} bytes"
                        for s in third_info)
    held_bytes = {label: sum(Path(f).stat().st_size for f in files) for label, files in groups.items()}
    print(f"held out: {len(groups[CLEAN])} clean files ({held_bytes[CLEAN]:,} bytes), {len(groups[NEAR])} "
          f"near-duplicates ({held_bytes[NEAR]:,} bytes); third party: {sources}", flush=True)
    return groups, held_info, third_info


def set_stop_after(args: argparse.Namespace, t0: float, eval_reserve_s: float = EVAL_RESERVE_SECONDS) -> None:
    """train.py's --stop-after-minutes from --deadline-s: training stops in time for the evaluations."""
    if args.deadline_s:
        elapsed = time.time() - t0
        args.stop_after_minutes = max(1.0, (args.deadline_s - elapsed - STARTUP_SECONDS - eval_reserve_s) / 60)
    else:
        args.stop_after_minutes = None


def write_plans(arms: list[Arm], seeds: list[int], groups: dict[str, list[str]], args: argparse.Namespace,
                window_groups: tuple[str, ...] = (CLEAN,), name: str | None = None) -> list[dict]:
    """One directory and plan.json per arm x seed under --work-dir (run_one reads it); window_groups: the groups
    also scored in --seq-len windows (none with --no-windows); name: every model's config name."""
    runs = []
    for seed in seeds:
        for arm in arms:
            run = f"{arm.name}-s{seed}"
            run_dir = Path(args.work_dir) / run
            run_dir.mkdir(parents=True, exist_ok=True)
            plan = {"run": run, "arm": arm.name, "seed": seed, "out": str(run_dir), "device": args.device,
                    "train_argv": train_argv(arm, seed, run_dir, args, name), "groups": groups,
                    "eval_max_tokens": args.eval_max_tokens, "chunk_len": args.chunk_len,
                    "windows": None if getattr(args, "no_windows", False) else args.seq_len,
                    "window_groups": list(window_groups), "eval_batch_size": args.eval_batch_size}
            (run_dir / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
            runs.append({"run": run, "plan": str(run_dir / "plan.json"), "log": str(run_dir / "log.txt")})
    return runs


def collect_records(runs: list[dict]) -> dict[str, list[dict]]:
    """arm -> the eval.json records of its runs that finished."""
    records = {}
    for run in runs:
        path = Path(run["plan"]).parent / "eval.json"
        if path.exists():
            record = json.loads(path.read_text())
            records.setdefault(record["arm"], []).append(record)
    return records


def write_logs(path: Path, runs: list[dict], work: Path) -> None:
    """Every run's log (and every shared process's) into one file."""
    logs = sorted({run["log"] for run in runs} | {str(p) for p in work.glob("process-*.log")})
    path.write_text("".join(f"== {log}\n{Path(log).read_text(errors='replace')}\n"
                            for log in logs if Path(log).exists()))


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.run_one:
        for plan in args.run_one:
            run_one(plan)
        return None
    t0 = time.time()
    arms = build_arms(args)
    print_arms(arms)
    if args.arms:
        arms = [a for a in arms if a.name in args.arms.split(",")]
    if args.work_dir is None:
        args.work_dir = tempfile.mkdtemp(prefix="compare_arms-")
    groups, held_info, third_info = eval_groups(args)
    if args.budget_check:
        return budget_check(arms, args)
    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_stop_after(args, t0)
    runs = write_plans(arms, list(range(args.seeds)), groups, args)
    launch(runs, args, t0)
    records = collect_records(runs)
    summary = summarize(arms, records)
    lines = tables(arms, summary)
    result = {"arms": [asdict(a) for a in arms], "summary": summary, "runs": records,
              "settings": {key: getattr(args, key) for key in SETTINGS},
              "held_out": held_info, "third_party": third_info, "table": lines,
              "python": sys.version.split()[0], "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "wall_seconds": round(time.time() - t0, 1),
              "command": "python bench/compare_arms.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    (out / "compare_arms.json").write_text(json.dumps(result, indent=2) + "\n")
    write_logs(out / "logs.txt", runs, work)
    title = (f"# {args.seeds} seeds x {len(arms)} arms, {args.steps} steps of {args.batch_size} x {args.seq_len} "
             f"(stateful), on {result['device']}; wall {result['wall_seconds']:.0f}s")
    (out / "compare_arms.md").write_text(title + "\n\n" + "\n".join(lines) + "\n")
    print(f"\n{title}; {out}/compare_arms.json, compare_arms.md, logs.txt; models in {work}\n")
    print("\n".join(lines), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
