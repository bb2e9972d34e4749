"""Numerical checks that a bundled model learned what it was trained on (and that random weights do not pass).

* dit-digits: an SVM trained on the real 8x8 digits classifies samples downsampled to 8x8; the score is the
  fraction that agrees with the conditioning class (real digits through the same path: about 0.9).
* flux-shapes: the mean colour in a disc at the prompted position must be nearest to the prompted colour among
  the four colours and the background level; the score is the fraction of samples where it is.
* wan-motion: :func:`motion_samples` draws 20 clips of distinct prompts; :func:`invardiff.models.motion.agreement`
  reads colour, direction and speed back from them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import motion, shapes


def digit_agreement(images: torch.Tensor, labels: list[int]) -> float:
    """``images``: (N, 1, 16, 16) in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    classifier = SVC(gamma=0.001, C=10.0).fit(digits.data, digits.target)
    small = F.adaptive_avg_pool2d(images.float(), 8).reshape(len(images), 64).numpy() * 16.0
    return float((classifier.predict(small) == np.asarray(labels)).mean())


def shape_colour_accuracy(images: torch.Tensor, attributes: list[tuple]) -> float:
    """``images``: (N, 3, 32, 32) in [0, 1]; ``attributes``: (colour, shape, position, background) per image."""
    axis = (torch.arange(shapes.SIZE) + 0.5) / shapes.SIZE
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    names = list(shapes.COLOURS)
    correct = 0
    for image, (colour, _, position, background) in zip(images, attributes, strict=True):
        cx, cy = shapes.POSITIONS[position]
        disc = (x - cx) ** 2 + (y - cy) ** 2 <= 0.08**2
        mean = image[:, disc].mean(dim=1)
        candidates = [torch.tensor(shapes.COLOURS[n]) for n in names]
        candidates.append(torch.full((3,), shapes.BACKGROUNDS[background]))
        distances = torch.stack([(mean - c).abs().sum() for c in candidates])
        correct += int(distances.argmin().item() == names.index(colour))
    return correct / len(images)


def motion_cases(count: int = 20) -> list[tuple]:
    """The `wan-motion` learning check's prompts: ``count`` distinct attribute tuples, in a seeded order."""
    order = torch.randperm(len(motion.ALL_ATTRIBUTES), generator=torch.Generator().manual_seed(1234))
    return [motion.ALL_ATTRIBUTES[i] for i in order[:count]]


def motion_samples(pipe, entry, count: int = 20) -> tuple[torch.Tensor, list[tuple]]:
    """One clip per case of :func:`motion_cases`, the i-th with seed i: (count, F, C, H, W) in [0, 1]."""
    cases = motion_cases(count)
    clips = [pipe(**entry.call_kwargs(motion.prompt_for(*case), index)).frames for index, case in enumerate(cases)]
    return torch.cat(clips).float(), cases
