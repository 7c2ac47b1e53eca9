"""Text alignment on the canary (METHODS 4): a digit classifier trained on the real
scikit-learn digits at the canary resolution, to check that a generic prompt such as
"a handwritten digit 3" yields a 3.
"""

from __future__ import annotations

import re

import numpy as np
import torch

_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
          "seven": 7, "eight": 8, "nine": 9}
_DIGIT = re.compile(r"(?<![\w.])(\d)(?![\w.])")


def digit_of_prompt(prompt: str) -> int | None:
    """The single digit a prompt asks for ("a handwritten digit 3" -> 3), else None.

    Only prompts about digits/numbers/numerals count; a lone digit or a number word must be
    present. Multi-digit numbers ("print 101") are not a digit request.
    """
    text = prompt.lower()
    if not re.search(r"\b(digit|number|numeral|handwritten)\b", text):
        return None
    m = _DIGIT.search(text)
    if m:
        return int(m.group(1))
    for word, d in _WORDS.items():
        if re.search(rf"\b{word}\b", text):
            return d
    return None


class DigitClassifier:
    """Multinomial logistic regression on the upscaled digits (same pipeline as the canary
    data: 8x8 / 16 -> bilinear resize to `res`, 8-bit quantised).

    `predict(images01)`: float tensor or array [B, 3, H, W] (or [B, 1, H, W]) in [0, 1] ->
    np.ndarray [B] of digits. Images of another size are resized to `res` first.
    """

    def __init__(self, res: int = 16, train_indices: np.ndarray | None = None,
                 seed: int = 0) -> None:
        from sklearn.linear_model import LogisticRegression

        from memaudit.canary.data import digit_images

        self.res = res
        x, y = digit_images(res)
        if train_indices is not None:
            x, y = x[train_indices], y[train_indices]
        self.clf = LogisticRegression(max_iter=2000, C=0.1, random_state=seed)
        self.clf.fit(x.reshape(len(x), -1), y)

    def _features(self, images01: torch.Tensor | np.ndarray) -> np.ndarray:
        if not torch.is_tensor(images01):
            images01 = torch.as_tensor(np.asarray(images01))
        img = images01.detach().float().cpu()
        if img.ndim == 3:
            img = img[:, None]
        grey = img.mean(dim=1, keepdim=True)
        if grey.shape[-2:] != (self.res, self.res):
            grey = torch.nn.functional.interpolate(grey, size=(self.res, self.res),
                                                   mode="bilinear", antialias=True,
                                                   align_corners=False)
        return grey.reshape(len(grey), -1).numpy()

    def predict(self, images01: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.clf.predict(self._features(images01)).astype(np.int64)

    def predict_proba(self, images01: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.clf.predict_proba(self._features(images01))

    def logits(self, images01: torch.Tensor | np.ndarray) -> np.ndarray:
        """The 10 class scores (decision function) [B, 10]: the canary's quality features."""
        return self.clf.decision_function(self._features(images01))
