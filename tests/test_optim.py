"""The optimizer's CPU fast path: ``optim.use_foreach`` changes how torch's AdamW loops, never
what it computes."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_simpo.optim import use_foreach


def _adamw_run(foreach: bool | None, steps: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=g).requires_grad_() for n in (4097, 33, 256)]
    inner = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    if foreach:  # as Megatron wraps it: a ChainedOptimizer of optimizers holding .optimizer
        use_foreach(SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=inner)]))
        assert all(group["foreach"] is True for group in inner.param_groups)
    else:
        assert all(group["foreach"] is None for group in inner.param_groups)
    for _ in range(steps):
        for p in params:
            p.grad = (
                torch.randn(p.shape, generator=g)
                * 10.0 ** torch.randint(-6, 1, (1,), generator=g).item()
            )
        inner.step()
    return [p.detach() for p in params]


def test_foreach_adamw_is_bit_identical_to_the_loop_on_cpu():
    loop, fast = _adamw_run(False), _adamw_run(True)
    assert all(torch.equal(a, b) for a, b in zip(loop, fast))


def test_use_foreach_leaves_other_optimizers_alone():
    sgd = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    use_foreach(SimpleNamespace(optimizer=sgd))
    assert sgd.param_groups[0]["foreach"] is None
