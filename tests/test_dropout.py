"""The CPU dropout (trainers/dropout.py): the same distribution as nn.Dropout, reproducible from the seed, and
swapped into every dropout of a wrapped model, the adapters' included."""
import math

import pytest
import torch

from trainers import dropout
from trainers.config import TrialConfig, trial_config_from_dict, trial_config_to_dict


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_each_element_is_dropped_with_probability_p_and_the_expectation_is_kept(p):
    torch.manual_seed(0)
    n = 16_000_000  # 5 sigma of the drop rate is ~3e-4 at p=0.05: a threshold off by 20 of 65536 fails
    keep, scale = dropout.keep_mask(torch.Size([n]), p)
    dropped = 1.0 - keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped - p) < 5 * sigma + 1 / 65536, (dropped, p)
    assert abs(scale * (1 - round(p * 65536) / 65536) - 1.0) < 1e-12  # survivors scaled by the exact rate
    # each 16-bit lane of a 64-bit draw drops at the same rate (no lane is biased, e.g. by a sign bit)
    lanes = keep[: n - n % 4].view(-1, 4).float().mean(0)
    assert torch.all((1 - lanes - p).abs() < 5 * math.sqrt(p * (1 - p) / (n / 4)) + 1 / 65536), lanes
    # neighbouring elements are independent: P(both dropped) = p^2
    pairs = (~keep[:-1] & ~keep[1:]).float().mean().item()
    assert abs(pairs - p * p) < 5 * math.sqrt(p * p / n) + 1e-4, (pairs, p * p)


def test_the_seed_reproduces_the_mask_and_another_seed_does_not():
    torch.manual_seed(3)
    first, _ = dropout.keep_mask(torch.Size([64, 33]), 0.1)
    torch.manual_seed(3)
    again, _ = dropout.keep_mask(torch.Size([64, 33]), 0.1)
    torch.manual_seed(4)
    other, _ = dropout.keep_mask(torch.Size([64, 33]), 0.1)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_forward_and_backward_match_a_dropout_with_that_mask():
    layer = dropout.CpuDropout(0.25)
    x = torch.randn(8, 5, 7, requires_grad=True)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    keep, scale = dropout.keep_mask(x.shape, 0.25)
    assert torch.equal(y, x.detach() * keep * scale)
    y.sum().backward()
    assert torch.equal(x.grad, keep.float() * scale)  # gradient flows through survivors only, scaled
    layer.eval()
    assert layer(x) is x  # evaluation: identity, no draw


def test_cases_it_does_not_handle_go_to_torchs_own_dropout():
    x = torch.randn(4, 4)
    assert dropout.CpuDropout(0.0)(x) is x
    torch.manual_seed(0)
    ours = dropout.CpuDropout(1.0)(x)
    assert torch.equal(ours, torch.zeros_like(x))  # p=1 drops everything, as nn.Dropout does
    torch.manual_seed(0)
    inplace = dropout.CpuDropout(0.5, inplace=True)(x.clone())
    torch.manual_seed(0)
    assert torch.equal(inplace, torch.nn.Dropout(0.5)(x))  # in place: torch's kernel, torch's stream


def test_every_dropout_of_a_lora_model_is_swapped_and_outputs_in_eval_are_unchanged(tiny_bert):
    from trainers.methods import apply_method
    from trainers.model import load_model, load_tokenizer
    from trainers.modules import resolve_target_modules

    data = trial_config_to_dict(TrialConfig())
    data["model"].update(path=tiny_bert, name="tiny-bert")
    cfg = trial_config_from_dict(data)
    tok = load_tokenizer(cfg)
    net = load_model(cfg, 2, tok, "cpu")
    net = apply_method(net, cfg.method, resolve_target_modules(net, "attention_qv"), "classification")
    plain = [n for n, m in net.named_modules() if type(m) is torch.nn.Dropout]
    assert any("lora_dropout" in n for n in plain) and any("lora" not in n for n in plain)
    batch = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    net.eval()
    before = net(**batch).logits

    assert dropout.use_cpu_dropout(net) == len(plain)
    swapped = {n for n, m in net.named_modules() if isinstance(m, dropout.CpuDropout)}
    assert swapped == set(plain) and not any(type(m) is torch.nn.Dropout for m in net.modules())
    assert torch.equal(net(**batch).logits, before)
    net.train()
    torch.manual_seed(0)
    first = net(**batch).logits
    torch.manual_seed(0)
    assert torch.equal(net(**batch).logits, first) and not torch.equal(first, before)
