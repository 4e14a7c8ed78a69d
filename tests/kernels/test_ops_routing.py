"""kernels.ops routes every op to its Triton function (INFOMAMBA_KERNELS=triton) or its reference (torch)."""
import importlib

import pytest
import torch

from kernels import ops

OPS = {
    "causal_conv1d": "causal_conv1d", "causal_conv1d_update": "causal_conv1d",
    "selective_scan": "selective_scan", "selective_state_update": "selective_state_update",
    "concept_filter": "concept_filter", "concept_filter_update": "concept_filter",
    "add_rms_norm": "add_rms_norm",
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
        "assert not hasattr(selective_scan, 'selective_scan') and hasattr(selective_scan, 'selective_scan_ref')\n"
        "assert not hasattr(concept_filter, 'concept_filter_update')\n"
        "out, res = ops.add_rms_norm(torch.ones(2, 4), None, torch.ones(4), 1e-5)\n"
        "assert torch.allclose(out, torch.ones(2, 4), atol=1e-4)\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, env={"PATH": "", "INFOMAMBA_KERNELS": "auto"})


def test_declared_bounds_are_used_only_for_the_declared_tensor():
    from kernels.packing import host_bounds, known_bounds

    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    other = torch.tensor([0, 3, 5], dtype=torch.int32)
    with known_bounds(cu, [0, 3, 5]):
        cu_declared = host_bounds(cu)
        cu[2] = 9  # a caller that breaks the promise is not detected, so only the declared tensor is trusted
        assert host_bounds(cu) is cu_declared
        assert host_bounds(other) == [0, 3, 5]
    assert host_bounds(cu) == [0, 3, 9]  # outside the block it is read again
