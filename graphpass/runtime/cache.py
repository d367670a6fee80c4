"""CacheStore: the tensors a later step will read, and nothing else; :func:`frees`: when a region's cached
tensors go."""
from __future__ import annotations

import torch

from ..schedules.base import Action


def frees(action: Action, next_action: Action | None) -> bool:
    """Whether a region's cached tensors are freed after a step where it did ``action``, the next step doing
    ``next_action`` (``Action.COMPUTE`` after the last step of a plan; None when the next step is unknown,
    i.e. off the plan). The one rule of the runtime, of ``inspect()`` and of exported artefacts: a region
    computed without storing holds nothing, and one reused for the last time before the next step computes
    or re-stores it holds nothing after that step. Off the plan a reuse keeps its tensors (a later step
    may reuse them again).

    >>> frees(Action.COMPUTE, None), frees(Action.REUSE, None), frees(Action.REUSE, Action.REUSE)
    (True, False, False)
    >>> frees(Action.REUSE, Action.STORE), frees(Action.STORE, Action.REUSE)
    (True, False)
    """
    if action == Action.COMPUTE:
        return True
    return action == Action.REUSE and next_action is not None and next_action != Action.REUSE


class CacheStore:
    """Holds cached region outputs by key (``<region path>:<exit index>``).

    The executor puts a region's outputs when a phase stores them and drops them as soon as a phase
    computes the region without storing (the reuse window is over), so ``nbytes`` returns to zero after
    the last reuse. ``peak_nbytes`` records the most held at once since the last :meth:`clear`.

    Bytes are counted per storage: a cached tensor that is a view (CogVideoX's text and video parts of
    one attention output) holds its whole base alive, and two views of one base count it once.

    >>> c = CacheStore(); base = torch.zeros(2, 53, 16)
    >>> c.put("a:0", base[:, :5]); c.put("a:1", base[:, 5:])
    >>> c.nbytes == base.numel() * 4
    True
    """

    def __init__(self):
        self._data: dict[str, torch.Tensor] = {}
        self._storages: dict[int, list[int]] = {}  # storage address -> [bytes, entries using it]
        self._nbytes = 0
        self.peak_nbytes = 0

    def _hold(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        entry = self._storages.get(s.data_ptr())
        if entry is None:
            self._storages[s.data_ptr()] = [s.nbytes(), 1]
            self._nbytes += s.nbytes()
        else:
            entry[1] += 1

    def _release(self, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        entry = self._storages[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            del self._storages[ptr]
            self._nbytes -= entry[0]

    def put(self, key: str, value: torch.Tensor) -> None:
        self._hold(value)  # before releasing the old entry: they may share a storage
        old = self._data.get(key)
        if old is not None:
            self._release(old)
        self._data[key] = value
        self.peak_nbytes = max(self.peak_nbytes, self._nbytes)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._data[key]
        except KeyError:
            raise KeyError(f"cache has no entry {key!r} (has {sorted(self._data)})") from None

    def drop(self, key: str) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self._release(old)

    def clear(self) -> None:
        self._data.clear()
        self._storages.clear()
        self._nbytes = 0
        self.peak_nbytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> list[str]:
        return list(self._data)

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct storages the cached tensors keep alive."""
        return self._nbytes
