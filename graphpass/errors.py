"""Errors raised by graphpass. Every message names the problem and the fix."""


class GraphpassError(Exception):
    """Base class of all graphpass errors."""


class CaptureError(GraphpassError):
    """The model could not be captured as a graph, or captured into something graphpass cannot optimize."""


class TaggingError(GraphpassError):
    """Attention regions could not be found or classified."""


class ScheduleError(GraphpassError, ValueError):
    """A schedule is malformed or does not fit the model it is applied to."""


class InputError(GraphpassError, ValueError):
    """A call's inputs do not match what the captured graph can serve (names, shapes, dtypes, timestep)."""


class ArtefactError(GraphpassError):
    """A saved artefact (weights, exported folder, manifest) is missing, corrupt or from another version."""


class UnloweredOpError(ArtefactError):
    """The model calls an op that the ONNX exporter has no lowering for (the message names the op and the module
    calling it): no layout of the export can hold it."""


class SearchError(ScheduleError):
    """No schedule in the search space meets the target on the seeds measured."""


class WeightsError(ArtefactError, ValueError):
    """A shipped weights file is missing, unreadable, or does not match its config."""


class ParallelError(GraphpassError):
    """A model, a process group or a call does not fit sequence-parallel execution."""
