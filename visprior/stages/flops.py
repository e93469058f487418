"""Model FLOPs per step for MFU: 6·N per token for trained weights, plus the attention term (PaLM, appendix B).

A component's matmuls cost 2·N per token forward. Backward costs another 2·N for activation gradients when anything before
it trains (gradients must flow through it), and 2·N for weight gradients when it trains itself: 6·N trained, 4·N frozen
with gradients passing through, 2·N frozen at the input end. Attention scores and values add 12·L·d·T per token (T = the
row length actually computed; packed rows still compute the full T x T block mask). Embedding lookups are free.
"""

from __future__ import annotations

import functools

from torch import nn


@functools.cache  # by module identity: the shapes never change, and MFU asks every step
def matmul_params(module: nn.Module) -> int:
    """Parameters that take part in matmuls (embedding tables excluded; a tied LM head still counts once via `lm_head`)."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel()
        elif isinstance(m, nn.Conv2d):
            total += m.weight.numel()  # per output position; approximated per patch
    return total


def flops_factor(trains: bool, grad_flows_in: bool) -> int:
    """6 if the component trains, 4 if only gradients pass through it, 2 if it runs forward only."""
    return 6 if trains else (4 if grad_flows_in else 2)


def attention_flops_per_token(num_layers: int, hidden: int, seq_len: int, factor: int) -> float:
    """QK^T and AV: 2·2·L·d·T forward per token, times factor/2 for the backward passes that run."""
    return 2.0 * num_layers * hidden * seq_len * factor


def transformer_flops_per_token(module: nn.Module, num_layers: int, hidden: int, seq_len: int, factor: int) -> float:
    return factor * matmul_params(module) + attention_flops_per_token(num_layers, hidden, seq_len, factor)
