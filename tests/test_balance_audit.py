"""The MoE balance-loss audit (issue 22, item 3): a correct Switch loss passes; a loss computed with the softmax
applied twice, one never added, and one scaled by E are flagged with their cause."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import routescope
from routescope import Recorder, TopKMoE
from routescope.analysis.balance_audit import balance_audit, recomputed_balance
from routescope.layers import aux_loss


class AuditedMoE(TopKMoE):
    """TopKMoE whose reported balance loss has a chosen bug (the routing itself is the same)."""

    def __init__(self, bug: str | None) -> None:
        super().__init__(16, 16, experts=4, k=2, balance_coef=0.01)
        self.bug = bug
        with torch.no_grad():
            self.router.weight.mul_(6.0)  # peaky, unbalanced router: the bugs become visible

    def _route(self, logits):  # noqa: ANN001, ANN202
        self._logits = logits
        return super()._route(logits)

    def aux_loss(self) -> torch.Tensor:
        if self.bug == "not added":
            return self.router.weight.new_zeros(())
        loss = super().aux_loss()
        if self.bug == "scaled":
            return loss * self.spec.experts
        if self.bug == "double softmax":
            probs = F.softmax(F.softmax(self._logits.float(), -1), -1)  # the bug: softmax over probabilities
            chosen = probs.topk(self.spec.k, -1).indices
            share = F.one_hot(chosen, self.spec.experts).sum(1).float().mean(0) / self.spec.k
            return self.spec.balance_coef * self.spec.experts * (share * probs.mean(0)).sum()
        return loss


def audit_of(tmp_path: Path, bug: str | None, log: bool = True) -> dict:
    torch.manual_seed(0)
    model = AuditedMoE(bug)
    path = tmp_path / f"{bug}.h5"
    with Recorder(model, path, every=2, sample_tokens=0, scalars=("balance_loss",)) as rec:
        for _ in range(20):
            toward_0 = model.router.weight[0].detach() / model.router.weight[0].norm()
            model(torch.randn(2048, 16) + 1.5 * toward_0)  # the tokens lean toward expert 0: an unbalanced load
            rec.step(**({"balance_loss": aux_loss(model).detach()} if log else {}))
    return balance_audit(routescope.open(path, group="moe"), routescope.open(path, group="run"))


def test_recomputed_loss_matches_the_layer_in_one_step_intervals(tmp_path: Path) -> None:
    """With one step per interval the recorded counts give back exactly the layer's own Switch loss."""
    torch.manual_seed(1)
    layer = TopKMoE(8, 8, experts=4, k=2, balance_coef=1.0)
    path = tmp_path / "one.h5"
    own = []
    with Recorder(layer, path, every=1, sample_tokens=0) as rec:
        for _ in range(3):
            layer(torch.randn(512, 8))
            own.append(float(layer.aux_loss().detach()))
            rec.step()
    got = recomputed_balance(routescope.open(path, group="moe"))[:, 0]
    assert got.tolist() == pytest.approx(own, rel=1e-6)


def test_a_correct_loss_passes(tmp_path: Path) -> None:
    audit = audit_of(tmp_path, None)
    assert audit["status"] == "ok" and abs(audit["ratio"] - 1) < 0.15, audit


@pytest.mark.parametrize("bug,cause", [("double softmax", "softmax applied twice"), ("not added", "not added"),
                                       ("scaled", "wrong scaling")])  # fmt: skip
def test_broken_losses_are_flagged_with_their_cause(tmp_path: Path, bug: str, cause: str) -> None:
    audit = audit_of(tmp_path, bug)
    assert audit["status"] == "flagged" and audit["cause"].startswith(cause), audit
    if bug == "scaled":
        assert "E = 4" in audit["cause"]


def test_an_unrecorded_loss_says_how_to_record_it(tmp_path: Path) -> None:
    audit = audit_of(tmp_path, None, log=False)
    assert audit["status"] == "not recorded" and "balance_loss" in audit["cause"]


def test_record_runs_are_audited_in_the_report(tmp_path: Path) -> None:
    """`routescope record` logs what its MoE layers add; `report` carries the audit (JSON and one line of text)."""
    from dataclasses import replace

    from routescope.analysis.report import build_report
    from routescope.trainers.presets import get_preset
    from routescope.trainers.train import train

    cfg = get_preset("debug-moe", steps=16, record_every=2)
    cfg = replace(cfg, model=replace(cfg.model, balance_coef=0.01), batch_size=32)
    train(cfg, out=tmp_path / "moe.h5", device="cpu", show_progress=False)
    audit = build_report(tmp_path / "moe.h5")["balance_audit"]
    assert audit["status"] == "ok", audit
    plain = get_preset("debug-moe", steps=4, record_every=2)  # balance_coef 0: nothing to audit
    train(plain, out=tmp_path / "plain.h5", device="cpu", show_progress=False)
    assert build_report(tmp_path / "plain.h5")["balance_audit"]["status"] == "off"
