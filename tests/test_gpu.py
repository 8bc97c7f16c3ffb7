"""On a CUDA device: the layer and the recorder's asynchronous copies agree with the CPU. Skipped without one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import routescope
from routescope import Recorder, TreeFFN

from conftest import check_tree_invariants

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")]


def test_layer_on_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    cpu = TreeFFN(64, 32, 6, trees=3).double()
    gpu = TreeFFN(64, 32, 6, trees=3).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    for layer in (cpu, gpu):
        layer.recording = True
    x = torch.randn(4096, 64, dtype=torch.float64)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x))
    for name, value in cpu.routing_stats().items():
        torch.testing.assert_close(gpu.routing_stats()[name].cpu(), value, msg=name)


def test_bf16_autocast_forward_and_backward() -> None:
    torch.manual_seed(1)
    layer = TreeFFN(256, 256, 8, trees=2).cuda()
    layer.recording = True
    x = torch.randn(8, 512, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.float().pow(2).mean().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    stats = layer.routing_stats()
    assert int(stats["tokens"]) == 4096 and torch.equal(stats["node_visits"][:, 0], torch.full((2,), 4096, device="cuda"))


def test_recorder_on_cuda(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = torch.nn.Sequential(TreeFFN(32, 32, 5, trees=2), TreeFFN(32, 32, 4)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    path = tmp_path / "cuda.h5"
    with Recorder(model, path, every=4, sample_tokens=16) as rec:
        for _ in range(20):
            ids = torch.randint(0, 256, (8, 64), device="cuda")
            loss = model(torch.randn(8, 64, 32, device="cuda")).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss, token_ids=ids)
    assert check_tree_invariants(path) == 5
    ds = routescope.open(path)
    assert np.all(ds["tokens"].values == 4 * 512)
    assert routescope.open(path, group="traces").sizes["sample"] == 5 * 16
