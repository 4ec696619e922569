"""revwire: rewire residual PyTorch models into reversible twins (Re²TAL).

The package has three layers: `revwire.runtime` (reversible stages, their autograd
engine, recompute replay, memory meters), `revwire.compiler` (trace -> shapes -> match
-> rewrite) and `revwire.tools` (model specs, revwire files, the CLI). The public API
is re-exported here.
"""
__version__ = "0.1.0"

from .errors import (
    BlockShapeError,
    CheckpointError,
    InputError,
    NoChainError,
    OptionError,
    OutputError,
    ReconstructionError,
    RewireError,
    SpecError,
    StageFreedError,
    TraceError,
)
from .options import RewireOptions
from .runtime.stage import ReversibleStage, set_engine, stages
from .runtime.meter import (BreakdownRow, PeakReport, StepMeter, cuda_peak_bytes, model_saved_bytes,
                            saved_tensor_bytes, step_peak, train_step_peak)
from .runtime.verify import verify
from .compiler.report import Report
from .api import report, rewire
from .tools.specs import build_model, default_input
from .tools.checkpoint import export_state_dict, load, load_weights, save

__all__ = [
    "rewire", "report", "Report", "RewireOptions", "verify",
    "ReversibleStage", "set_engine", "stages",
    "RewireError", "TraceError", "NoChainError", "InputError", "OptionError", "BlockShapeError",
    "ReconstructionError", "StageFreedError", "CheckpointError", "SpecError", "OutputError",
    "saved_tensor_bytes", "model_saved_bytes", "cuda_peak_bytes",
    "step_peak", "train_step_peak", "StepMeter", "PeakReport", "BreakdownRow",
    "build_model", "default_input", "save", "load", "load_weights", "export_state_dict",
]
