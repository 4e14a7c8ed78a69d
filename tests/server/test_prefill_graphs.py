"""Mixed steps under CUDA graphs (server/engine/prefill_graphs.py) and the engine's kernel warm-up, on a GPU
(INFOMAMBA_TEST_DEVICE=cuda; tests/model/test_padded_layout.py checks the padded layout itself on the CPU):

- a bucket's graph, replayed for several real layouts in turn, gives the rows and states of the eager pass;
- an engine serving staggered prompts beside decodes replays them and answers what the eager engine answers;
- after the engine's warm-up, no layout makes a Triton kernel compile mid-serving.

    INFOMAMBA_TEST_DEVICE=cuda python -m pytest -q tests/server/test_prefill_graphs.py
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kernels._triton import compiled_variants
from server.config import ServerConfig
from server.engine.core import EngineCore
from server.engine.prefill_graphs import CudaGraphPrefill
from server.engine.process import warm_up
from server.engine.protocol import Add, Array, Sampling
from tests.server.conftest import TEST_DEVICE, tiny_lm

pytestmark = pytest.mark.skipif(not TEST_DEVICE.startswith("cuda"), reason="needs INFOMAMBA_TEST_DEVICE=cuda")
TOL = dict(atol=2e-4, rtol=2e-4)


def test_a_replayed_bucket_equals_the_eager_pass_for_each_layout():
    model = tiny_lm()
    pool = model.empty_state(32)
    graphs = CudaGraphPrefill(model, pool, max_seqs=32, max_tokens=512)
    rng = random.Random(0)
    for trial in range(6):
        lengths = [1] * rng.randint(0, 12) + [rng.randint(2, 64) for _ in range(rng.randint(1, 4))]
        slots = rng.sample(range(32), len(lengths))
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        tokens = torch.randint(0, 260, (starts[-1],), device=model.device)
        bucket = graphs.bucket_for(starts, max(lengths))
        assert bucket is not None, lengths
        with torch.inference_mode():
            eager_pool = pool.clone()
            expected, _ = model(tokens, eager_pool, cu_seqlens=torch.tensor(starts, dtype=torch.int32),
                                state_indices=torch.tensor(slots, dtype=torch.int32), bounds=starts)
            got = graphs(bucket, tokens, starts, slots)
        torch.testing.assert_close(got.head, expected.head, **TOL, msg=f"trial {trial}: {lengths}")
        for name, tensor in eager_pool.tensors().items():
            torch.testing.assert_close(pool.tensors()[name], tensor, **TOL, msg=f"trial {trial}: {name}")
    assert graphs.num_replays == 6


def test_a_long_bucket_carries_a_stream_as_the_eager_passes_do():
    model = tiny_lm()
    pool = model.empty_state(8)
    graphs = CudaGraphPrefill(model, pool, max_seqs=8, max_tokens=512)
    assert graphs.long == {256, 512}
    eager_pool = pool.clone()
    for length in (512, 256, 512):  # one stream in slot 5, its state carried from chunk to chunk
        tokens = torch.randint(0, 260, (length,), device=model.device)
        bucket = graphs.bucket_for([0, length], length)
        assert bucket == (1, length)
        with torch.inference_mode():
            expected, _ = model(tokens, eager_pool, cu_seqlens=torch.tensor([0, length], dtype=torch.int32),
                                state_indices=torch.tensor([5], dtype=torch.int32), bounds=[0, length])
            got = graphs(bucket, tokens, [0, length], [5])
        torch.testing.assert_close(got.head, expected.head, **TOL, msg=f"{length} tokens")
        for name, tensor in eager_pool.tensors().items():
            torch.testing.assert_close(pool.tensors()[name], tensor, **TOL, msg=f"{length} tokens: {name}")
    assert graphs.num_long_replays == 3


def serve(prefill_graphs: bool, tmp_path, prompts, budget: int = 256) -> tuple[dict, int]:
    """Greedy completions of `prompts`, one new prompt every other step beside the running ones."""
    config = ServerConfig(max_num_streams=16, max_num_batched_tokens=budget, prefill_graphs=prefill_graphs)
    core = EngineCore(tiny_lm(), None, config, str(tmp_path / f"sessions-{prefill_graphs}"))
    core.store.start()
    warm_up(core)
    tokens: dict[str, list[int]] = {}
    try:
        for step in range(400):
            if step % 2 == 0 and step // 2 < len(prompts):
                rid = f"r{step // 2}"
                core.handle(Add("c", rid, Array.of(prompts[step // 2]),
                                sampling=Sampling(max_tokens=12, temperature=0, ignore_eos=True)))
            for batch in core.run_once(timeout=0.001).values():
                for out in batch.request_outputs():
                    assert out.error is None, out.error
                    tokens.setdefault(out.rid, []).extend(out.token_ids or [])
            if step > 2 * len(prompts) and not core.has_work():
                break
        graphs = core.runner.prefill_graphs
        return tokens, (graphs.num_replays, graphs.num_long_replays) if graphs else (0, 0)
    finally:
        core.shutdown()


def test_an_engine_replays_mixed_steps_and_answers_as_the_eager_one(tmp_path):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 260, int(n)) for n in rng.integers(3, 60, 10)]
    graphed, (replays, _) = serve(True, tmp_path, prompts)
    eager, none = serve(False, tmp_path, prompts)
    assert replays > 0 and none == (0, 0)
    assert sorted(graphed) == sorted(eager) == [f"r{i}" for i in range(10)]
    assert graphed == eager


def test_an_engine_feeds_long_prompts_in_long_buckets_and_answers_as_the_eager_one(tmp_path):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 260, int(n)) for n in (20, 2600, 35, 1500, 9)]  # the long ones beside decodes
    graphed, (_, long_replays) = serve(True, tmp_path, prompts, budget=1024)
    eager, _ = serve(False, tmp_path, prompts, budget=1024)
    assert long_replays >= 3  # 2600: 768 + 768 + 768 beside decodes (then 296 eager); 1500: 768 at least
    assert sorted(graphed) == sorted(eager) == [f"r{i}" for i in range(5)]
    assert graphed == eager


def test_no_kernel_compiles_after_the_warm_up(tmp_path):
    config = ServerConfig(max_num_streams=64, max_num_batched_tokens=512, max_num_prefill_tokens=8192)
    core = EngineCore(tiny_lm(), None, config, str(tmp_path / "sessions"))
    try:
        warm_up(core)
        before = compiled_variants()
        assert sum(before.values()) > 0
        rng = random.Random(1)
        model = core.model
        with torch.inference_mode():
            for _ in range(40):
                lengths = [1] * rng.randint(0, 40) + [rng.choice([rng.randint(1, 300), rng.randint(1, 8192 // 4)])
                                                      for _ in range(rng.randint(1, 3))]
                starts = [0]
                for n in lengths:
                    starts.append(starts[-1] + n)
                # packed by the runner, as a step is: Triton specializes on the tensors' alignment too
                inputs, cu_seqlens, slots = core.runner._to_device([torch.zeros(starts[-1], dtype=torch.long)],
                                                                   starts, [-1] * len(lengths))
                model(inputs, core.pool.state, cu_seqlens=cu_seqlens, state_indices=slots, bounds=starts)
        torch.cuda.synchronize()
        after = compiled_variants()
        grew = {name: (before.get(name, 0), n) for name, n in after.items() if n != before.get(name, 0)}
        assert not grew, f"compiled after the warm-up (before, after): {grew}"
    finally:
        core.shutdown()
