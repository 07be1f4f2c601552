"""MPMNCELoss: the multi-positive, margin contrastive loss R-Adapter trains with (DESIGN.md 7.4)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _validate as check
from . import ops

Tensor = torch.Tensor


class MPMNCELoss(nn.Module):
    """loss = 1/2 [mean_i sum_j q_ij (-log_softmax_j A_ij) + the same for B] with
    A = lambda I T^T + lambda delta (1 - P), B = lambda T I^T + lambda delta (1 - P),
    q_ij = (1 - eps) P_ij / n_i + eps (1 - P_ij) / (N - n_i), lambda = 1 / temperature.

    Positives P come from class labels (N,) (P_ij = [y_i = y_j]), from an (N, N) bool matrix, or
    default to the diagonal (plain CLIP InfoNCE). Features are L2-normalised first unless
    normalize=False. Normalising features that the model already normalised changes neither
    the loss nor the gradients of the model's parameters (the normalisation's projection is
    idempotent); the gradient with respect to the unit vectors themselves becomes its
    tangential part g - f <f, g>. Uses log-softmax: finite inputs never give NaN. Defaults are
    the ImageNet recipe (eps 0.02, delta 0.05)."""

    def __init__(self, temperature: float = 0.01, margin: float = 0.05,
                 label_smoothing: float = 0.02, normalize: bool = True):
        super().__init__()
        temperature = check.finite("temperature", temperature)
        if temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        self.temperature = temperature
        self.margin = check.finite("margin", margin)
        self.label_smoothing = check.probability("label_smoothing", label_smoothing)
        self.normalize = bool(normalize)

    def forward(self, image_features: Tensor, text_features: Tensor,
                positives: Optional[Tensor] = None) -> Tensor:
        check.tensor("image_features", image_features, ndim=2)
        check.tensor("text_features", text_features, ndim=2)
        check.shape("text_features", text_features, tuple(image_features.shape),
                    "the shape of image_features")
        check.same_dtype_device("text_features", text_features, "image_features", image_features)
        n = image_features.shape[0]
        if positives is None:
            positives = torch.eye(n, dtype=torch.bool, device=image_features.device)
        elif not isinstance(positives, torch.Tensor):
            raise TypeError(f"positives: expected labels (N,) or a bool (N, N) tensor, got "
                            f"{type(positives).__name__}")
        elif positives.dim() == 1:
            if positives.is_floating_point() or positives.dtype == torch.bool:
                raise TypeError(f"positives: expected integer class labels of shape (N,), got "
                                f"dtype {positives.dtype}")
            check.shape("positives", positives, (n,), "one label per row of image_features")
            positives = positives[:, None] == positives[None, :]
        img, txt = image_features, text_features
        if self.normalize:
            img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        return ops.mpm_nce(img, txt, positives, logit_scale=1.0 / self.temperature,
                           margin=self.margin, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, margin={self.margin}, "
                f"label_smoothing={self.label_smoothing}")
