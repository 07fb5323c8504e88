"""The engine: torch only, no widget code.  Hooks, statistics, dissection and results."""
from gandissect_widgets.engine.dissection import dissect
from gandissect_widgets.engine.hooks import (Edit, StopForward, Trace, TraceDict, UnknownLayerError,
                                             edit_layers, resolve_layers, run_from)
from gandissect_widgets.engine.protocols import ProtocolError
from gandissect_widgets.engine.results import Dissection
from gandissect_widgets.engine.upsample import pool_mask, upsample

__all__ = ["dissect", "Dissection", "Edit", "Trace", "TraceDict", "StopForward", "edit_layers", "run_from",
           "resolve_layers", "upsample", "pool_mask", "ProtocolError", "UnknownLayerError"]
