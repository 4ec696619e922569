"""revwire: rewire residual PyTorch models into reversible twins (Re²TAL)."""
__version__ = "0.1.0"

from .engine import ReversibleStage, set_engine, stages
from .errors import (
    BlockShapeError,
    CheckpointError,
    InputError,
    NoChainError,
    ReconstructionError,
    RewireError,
    SpecError,
    StageFreedError,
    TraceError,
)
from .meter import cuda_peak_bytes, model_saved_bytes, saved_tensor_bytes

__all__ = [
    "ReversibleStage", "set_engine", "stages",
    "RewireError", "TraceError", "NoChainError", "InputError", "BlockShapeError",
    "ReconstructionError", "StageFreedError", "CheckpointError", "SpecError",
    "saved_tensor_bytes", "model_saved_bytes", "cuda_peak_bytes",
]
from .api import report, rewire
from .report import Report
__all__ += ["rewire", "report", "Report"]
from .errors import OutputError
from .specs import build_model, default_input
from .checkpoint import export_state_dict, load, load_weights, save
__all__ += ["OutputError", "build_model", "default_input", "save", "load", "load_weights", "export_state_dict"]
