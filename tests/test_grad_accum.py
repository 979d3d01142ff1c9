"""Gradient accumulation: an optimizer step sums the micro-batches of one epoch only, its gradient is their
mean (the epoch's last, short step too), and the loop takes exactly the steps total_steps promises. An OOM
retry keeps the effective batch exact."""
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.test_trial import _cfg
from trainers import loop, record
from trainers.config import TrainConfig

MICRO_BATCHES = 5  # an epoch of 5 micro-batches at grad_accum 2: steps of 2, 2 and a short one of 1


class _Probe(torch.nn.Module):
    """A linear regression whose forward notes which micro-batch (epoch, index) it was given."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 1)
        self.seen: list[tuple[int, int]] = []

    def loss(self, x, y):
        return torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y)

    def forward(self, x, y, tag, attention_mask):
        self.seen.append(tuple(tag.tolist()))
        return SimpleNamespace(loss=self.loss(x, y))


class _Epochs:
    """The same micro-batches every epoch, each tagged (epoch, index); a new epoch on every pass."""

    def __init__(self):
        gen = torch.Generator().manual_seed(1)
        self.data = [(torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)) for _ in range(MICRO_BATCHES)]
        self.epoch = -1

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        self.epoch += 1
        for i, (x, y) in enumerate(self.data):
            yield {"x": x, "y": y, "tag": torch.tensor([self.epoch, i]), "attention_mask": torch.ones(4, 3)}


@pytest.mark.parametrize("epochs,max_steps,steps", [(2.0, None, 6), (1.5, None, 5), (2.0, 4, 4)])
def test_each_step_is_the_mean_of_one_epochs_micro_batches(epochs, max_steps, steps):
    cfg = TrainConfig(lr=1e-2, grad_accum=2, epochs=epochs, max_steps=max_steps, warmup_ratio=0.0,
                      max_grad_norm=1e9, device="cpu")  # no clipping: the gradient is the step's own
    model, loader = _Probe(), _Epochs()
    groups, checked = [], []

    def before_step(optimizer, args, kwargs):
        group = model.seen[sum(len(g) for g in groups):]
        groups.append(group)
        params = list(model.lin.parameters())
        # what each of the step's micro-batches contributes at these weights (unchanged since their backward)
        per_micro = [torch.autograd.grad(model.loss(*loader.data[i]), params) for _, i in group]
        for p, *grads in zip(params, *per_micro):
            checked.append(torch.allclose(p.grad, torch.stack(grads).mean(0), atol=1e-6))

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        stats = loop.train(model, loader, cfg, "cpu")
    finally:
        handle.remove()
    expected = [[(epoch, i) for i in step] for epoch in range(3) for step in ([0, 1], [2, 3], [4])][:steps]
    assert groups == expected  # no step mixes two epochs' micro-batches
    assert all(checked)  # every step's gradient is the mean of its own micro-batches, the short one's too
    assert stats["steps"] == loop.total_steps(MICRO_BATCHES, cfg) == steps


def test_an_oom_retry_with_an_odd_micro_batch_keeps_the_effective_batch_exact(tiny_bert, store):
    from trainers.trial import run_trial_with_oom_retries

    cfg = _cfg(tiny_bert, store)
    cfg.train.batch_size = 15  # effective batch 15: halving (7 x 2 = 14) would change it
    cfg.train.inject_fault = "oom@1:bs>7"  # out of memory at 15, fits at half or less
    out = run_trial_with_oom_retries(cfg)
    assert out["status"] == "ok"
    c = MlflowClient(store["uri"])
    runs = sorted(c.search_runs([c.get_experiment_by_name("peftsweep").experiment_id]),
                  key=lambda r: r.info.start_time)
    assert [r.data.tags[record.STATUS] for r in runs] == ["oom", "ok"]
    shapes = [(int(r.data.params["batch_size"]), int(r.data.params["grad_accum"])) for r in runs]
    # the largest micro-batch that divides 15 and at least halves the activation memory
    assert shapes == [(15, 1), (5, 3)]
    retry = runs[1]
    assert retry.data.tags[record.OOM_RETRY] == "1"
    assert retry.data.tags[record.OOM_RETRY + "_from"] == "15x1"
