"""scikit-learn's bundled digits as 4-channel "latents", and class prompts for a tiny vocabulary.

Each 8x8 digit (values 0..16) is scaled to [-1, 1], upsampled bilinearly to 2S x 2S and folded
2x2 -> 4 channels (pixel unshuffle), so a latent is [4, S, S] and every channel carries real
image content, as a VAE latent does. The split is fixed: a seeded permutation of the 1797 images,
the first `HELD_OUT` held out for measurement. Nothing is downloaded (the digits ship with
scikit-learn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

HELD_OUT = 297
SPLIT_SEED = 0

# Tiny vocabulary: token ids 0..9 are the digits, 10 is "digit"; BOS and EOS are the last two ids
# (the CLIP convention: EOS is the largest id, where transformers' pooling looks).
VOCAB = 16
WORD_DIGIT = 10
BOS, EOS = VOCAB - 2, VOCAB - 1
PROMPT_LEN = 4


@dataclass(frozen=True)
class Digits:
    """Latents [N, 4, S, S] (float32, about unit scale) and class labels [N] (int64)."""

    latents: torch.Tensor
    labels: torch.Tensor

    def subset(self, classes: tuple[int, ...]) -> Digits:
        """Only the images of the given classes."""
        keep = torch.isin(self.labels, torch.tensor(classes))
        return Digits(self.latents[keep], self.labels[keep])

    def __len__(self) -> int:
        return len(self.labels)


def load_digits_split(size: int = 16) -> tuple[Digits, Digits]:
    """(train, held_out) digits as latents of spatial size `size` (images 2*size pixels wide).

    Raises ImportError if scikit-learn is missing (install the `bench` extra).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)) / 8.0 - 1.0  # [N, 8, 8] in [-1, 1]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    up = F.interpolate(images[:, None], size=(2 * size, 2 * size), mode="bilinear", align_corners=False)
    latents = F.pixel_unshuffle(up, 2).contiguous()  # [N, 4, size, size]
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(labels)))
    held, train = order[:HELD_OUT], order[HELD_OUT:]
    return Digits(latents[train], labels[train]), Digits(latents[held], labels[held])


def class_prompts() -> torch.Tensor:
    """Token ids [10, PROMPT_LEN] of the prompts "digit 0" .. "digit 9": BOS, digit, d, EOS."""
    ids = torch.empty((10, PROMPT_LEN), dtype=torch.long)
    ids[:, 0] = BOS
    ids[:, 1] = WORD_DIGIT
    ids[:, 2] = torch.arange(10)
    ids[:, 3] = EOS
    return ids
