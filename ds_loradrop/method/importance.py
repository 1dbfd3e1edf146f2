"""LoRA-drop importance: the mean squared norm of each adapter's output over the data's tokens.

``g[t][i] = (1 / N) * sum over non-padding tokens x of ||s B_i A_i x||^2`` for target ``t``, layer ``i``,
with N the number of non-padding tokens. Per token, with ``z = A x`` (already computed by the
adapter), ``||s B z||^2 = s^2 z^T (B^T B) z``: an r x r Gram matrix and no extra
``out_features``-wide tensor. Then ``y[t] = g[t] / sum(g[t])``.

The recorder only accumulates local sums and token counts; summing them over ranks is the caller's job
(``distributed.all_reduce_sum``), so this module knows nothing of ranks.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from ds_loradrop.method.lora import AdapterLayout


def squared_output_norm_per_token(z: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||scaling * B z||^2`` for every token.

    Args:
        z: rank activations ``A x``, shape (..., r).
        lora_B: (out_features, r).
        scaling: alpha / r.

    Returns:
        shape (...), float32.
    """
    z = z.float()
    gram = lora_B.float().T @ lora_B.float()  # (r, r)
    return (scaling**2) * ((z @ gram) * z).sum(dim=-1)


class ImportanceRecorder:
    """Accumulates per-(target, layer) sums of ``||s B A x||^2`` over masked tokens.

    Args:
        layout: the wrapped layers; every one of them must have an adapter while recording.
        training_forwards_only: record only forwards of layers in training mode (so that evaluations and
            validation losses between training steps, in eval mode, are not recorded).

    Usage: ``with recorder.recording(): for batch: recorder.set_token_mask(mask); model(batch)``.
    """

    def __init__(self, layout: AdapterLayout, *, training_forwards_only: bool = False):
        self.layout = layout
        self.training_forwards_only = training_forwards_only
        self.targets = list(layout)
        num_layers = max(len(wrappers) for wrappers in layout.values())
        self.sums = torch.zeros(len(self.targets), num_layers, dtype=torch.float64)
        self.num_tokens = torch.zeros((), dtype=torch.float64)
        self._token_mask: torch.Tensor | None = None
        self._is_paused = False

    def pause(self) -> None:
        """Ignore the following forwards (until the next :meth:`set_token_mask`) at no cost."""
        self._is_paused = True

    def set_token_mask(self, token_mask: torch.Tensor) -> None:
        """Args: token_mask (batch, seq), 1 for tokens that count, 0 for padding."""
        self._is_paused = False
        self._token_mask = token_mask
        # Sums stay on the tokens' device: no host sync per forward (it also runs inside training steps).
        self.sums = self.sums.to(token_mask.device)
        self.num_tokens = self.num_tokens.to(token_mask.device) + token_mask.sum().double()

    def _record(self, target_index: int, wrapper, z: torch.Tensor, lora_B: torch.Tensor, scaling: float):
        if self._is_paused or (self.training_forwards_only and not wrapper.training):
            return
        if self._token_mask is None:
            raise RuntimeError("ImportanceRecorder.set_token_mask must be called before each forward")
        with torch.no_grad():  # also called from training forwards: never part of the graph
            per_token = squared_output_norm_per_token(z.detach(), lora_B.detach(), scaling)
            mask = self._token_mask.to(device=per_token.device, dtype=per_token.dtype)
            self.sums[target_index, wrapper.layer] += (per_token * mask).sum().double().to(self.sums.device)

    @contextmanager
    def recording(self):
        for target_index, target in enumerate(self.targets):
            for wrapper in self.layout[target]:
                wrapper.rank_activation_sink = partial(self._record, target_index, wrapper)
        try:
            yield self
        finally:
            for wrappers in self.layout.values():
                for wrapper in wrappers:
                    wrapper.rank_activation_sink = None


def mean_importance(sums: list[float], num_tokens: float) -> list[float]:
    """g = sums / N. Raises ValueError if no token was seen."""
    if num_tokens <= 0:
        raise ValueError("importance was measured over zero tokens")
    return [s / num_tokens for s in sums]


def normalize_importance(importance: list[float]) -> list[float]:
    """y = g / sum(g). All-zero importance (adapters never trained) gives a uniform profile."""
    total = sum(importance)
    if total <= 0:
        return [1.0 / len(importance)] * len(importance)
    return [g / total for g in importance]
