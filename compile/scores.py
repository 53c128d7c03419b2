"""The result of a model call."""

from __future__ import annotations

import numpy as np


class Scores:
    """What a model call gives for n rows: the model's raw ``margin``, the posterior-``corrected``
    score and the ``mapped`` (served) score.  Held as the one float64 [3, n] array the native
    call writes into (its rows are the three fields), so a call allocates once and a batch's
    scores are sliced per request without copies."""

    __slots__ = ("array", "seconds")

    def __init__(self, array: np.ndarray):
        self.array = array
        self.seconds = 0.0  # the native call's own time, when one on the model thread made them

    @classmethod
    def empty(cls, rows: int) -> Scores:
        return cls(np.empty((3, rows)))

    @classmethod
    def stack(cls, margin: np.ndarray, corrected: np.ndarray, mapped: np.ndarray) -> Scores:
        return cls(np.stack([margin, corrected, mapped]))

    @classmethod
    def concat(cls, parts: list[Scores]) -> Scores:
        return parts[0] if len(parts) == 1 else cls(np.concatenate([p.array for p in parts], axis=1))

    @property
    def margin(self) -> np.ndarray:
        return self.array[0]

    @property
    def corrected(self) -> np.ndarray:
        return self.array[1]

    @property
    def mapped(self) -> np.ndarray:
        return self.array[2]

    def __len__(self) -> int:
        return int(self.array.shape[1])

    def rows(self, start: int, stop: int) -> Scores:
        """Rows [start, stop), a view."""
        return Scores(self.array[:, start:stop])

    def __repr__(self) -> str:
        return f"Scores({len(self)} rows)"
