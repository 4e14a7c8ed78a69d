"""kernels.ops routes every op to its Triton function (INFOMAMBA_KERNELS=triton) or its reference (torch)."""
import importlib

import pytest
import torch

from kernels import ops

OPS = {
    "causal_conv1d": "causal_conv1d", "causal_conv1d_update": "causal_conv1d",
    "selective_scan": "selective_scan", "selective_state_update": "selective_state_update",
    "concept_filter": "concept_filter", "concept_filter_update": "concept_filter",
    "add_rms_norm": "add_rms_norm", "concept_readout": "concept_readout", "concept_step": "concept_step",
    "mamba_step": "mamba_step",
    "window_attention": "window_attention", "window_attention_update": "window_attention_update",
}


@pytest.mark.parametrize("name,module", sorted(OPS.items()))
@pytest.mark.parametrize("choice", ["triton", "torch"])
def test_every_op_has_a_kernel_and_is_routed(monkeypatch, name, module, choice):
    mod = importlib.import_module(f"kernels.{module}")
    assert callable(getattr(mod, name)), f"kernels.{module}.{name} is missing"
    monkeypatch.setattr(mod, name, lambda *a, **k: "fast")
    monkeypatch.setattr(mod, name + "_ref", lambda *a, **k: "ref")
    monkeypatch.setattr(ops, name, ops._routed(mod, name))
    monkeypatch.setenv("INFOMAMBA_KERNELS", choice)
    assert getattr(ops, name)(torch.zeros(1)) == ("fast" if choice == "triton" else "ref")


def test_modules_import_without_triton():
    """Where `import triton` fails the modules still import, without their fast functions; refs work."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('no triton')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from kernels import add_rms_norm, causal_conv1d, concept_filter, ops, selective_scan, selective_state_update\n"
        "from kernels import concept_readout, concept_step, mamba_step, window_attention, window_attention_update\n"
        "assert not hasattr(selective_scan, 'selective_scan') and hasattr(selective_scan, 'selective_scan_ref')\n"
        "assert not hasattr(mamba_step, 'mamba_step') and hasattr(concept_step, 'concept_step_ref')\n"
        "assert not hasattr(window_attention, 'window_attention') and hasattr(window_attention, 'window_attention_ref')\n"
        "assert not hasattr(window_attention_update, 'window_attention_update')\n"
        "assert not hasattr(concept_filter, 'concept_filter_update')\n"
        "from kernels import small_linear\n"
        "assert not hasattr(small_linear, 'linear') and hasattr(small_linear, 'add_rms_norm_linear_ref')\n"
        "out, res = ops.add_rms_norm(torch.ones(2, 4), None, torch.ones(4), 1e-5)\n"
        "assert torch.allclose(out, torch.ones(2, 4), atol=1e-4)\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, env={"PATH": "", "INFOMAMBA_KERNELS": "auto"})


def test_a_layout_is_trusted_only_for_its_own_cu_seqlens_and_caches_its_chunk_tables():
    from kernels.packing import PackedLayout, layout_of

    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    other = torch.tensor([0, 3, 9], dtype=torch.int32)
    layout = PackedLayout(cu, [0, 3, 5])
    assert layout_of(cu, layout) is layout
    assert layout_of(other, layout).bounds == [0, 3, 9]  # another tensor is read, never assumed
    assert layout_of(cu, None).bounds == [0, 3, 5]
    tables = layout.chunk_tables(2)
    assert layout.chunk_tables(2) is tables  # every layer of the pass reuses them
    chunk_seq, chunk_pos, chunk_cu = tables
    assert chunk_seq.tolist() == [0, 0, 1] and chunk_pos.tolist() == [0, 1, 0] and chunk_cu.tolist() == [0, 2, 3]


HYBRID_LAYERS = [{"type": "infomamba"}, {"type": "attention", "n_heads": 2, "attention_window": 2, "rope": True}]


@pytest.mark.parametrize("layers", [None, HYBRID_LAYERS], ids=["infomamba", "hybrid"])
def test_the_runner_hands_the_layout_down_so_no_kernel_reads_cu_seqlens(monkeypatch, layers):
    """The model is given cu_seqlens's host values: a host read of it during the pass would be a sync (a hybrid's
    attention kernels and rotary positions included)."""
    from model.config import InfoMambaConfig
    from model.infomamba import InfoMamba

    monkeypatch.setenv("INFOMAMBA_KERNELS", "triton")  # the kernels (interpreted on the CPU), not the references
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels run interpreted on the CPU
    torch.manual_seed(0)
    model = InfoMamba(InfoMambaConfig(d_model=16, n_layers=0 if layers else 2, vocab_size=260, n_concepts=4,
                                      d_state=4, layers=layers)).to(device)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    reads = []
    real_tolist = torch.Tensor.tolist
    def tolist(t):
        values = real_tolist(t)
        reads.append(values == [0, 3, 7])  # cu_seqlens, or a copy of it, read back
        return values

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    model(torch.arange(7, device=device), model.empty_state(2), cu_seqlens=cu, bounds=[0, 3, 7])
    assert not any(reads)
    reads.clear()
    model(torch.arange(7, device=device), model.empty_state(2), cu_seqlens=cu)
    assert sum(reads) == 1  # without the bounds: exactly one read, by the model, shared by every layer


@pytest.mark.parametrize("choice", ["triton", "torch"])
def test_resolve_picks_what_each_op_routes_to(monkeypatch, choice):
    """The model resolves the ops once per pass (ops.resolve): the same functions the per-call routing picks."""
    monkeypatch.setenv("INFOMAMBA_KERNELS", choice)
    resolved = ops.resolve(torch.zeros(1))
    for name, module in OPS.items():
        mod = importlib.import_module(f"kernels.{module}")
        expected = getattr(mod, name) if choice == "triton" else getattr(mod, name + "_ref")
        assert getattr(resolved, name) is expected, name
