"""CacheStore: the tensors a later step will read, and nothing else."""
from __future__ import annotations

import torch


class CacheStore:
    """Holds cached region outputs by key (``<region path>:<exit index>``).

    The executor puts a region's outputs when a phase stores them and drops them as soon as a phase
    computes the region without storing (the reuse window is over), so ``nbytes`` returns to zero after
    the last reuse. ``peak_nbytes`` records the most held at once since the last :meth:`clear`.
    """

    def __init__(self):
        self._data: dict[str, torch.Tensor] = {}
        self.peak_nbytes = 0

    def put(self, key: str, value: torch.Tensor) -> None:
        self._data[key] = value
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._data[key]
        except KeyError:
            raise KeyError(f"cache has no entry {key!r} (has {sorted(self._data)})") from None

    def drop(self, key: str) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()
        self.peak_nbytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> list[str]:
        return list(self._data)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._data.values())
