"""The backends of phase graphs live in :mod:`graphpass.runtime.backends`; this name serves imports of
``graphpass.exporters.backends``."""
from ..runtime.backends import BACKENDS, InductorRunner, make_runner

__all__ = ["BACKENDS", "InductorRunner", "make_runner"]
