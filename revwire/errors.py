"""Errors a user can act on: each says what failed, where, and what to do."""


class RewireError(Exception):
    """Base class of every error revwire raises on purpose."""


class TraceError(RewireError):
    """The model (or a part of it) could not be traced by torch.fx."""


class NoChainError(RewireError):
    """The model has no chain of same-shape residual blocks to rewire."""


class InputError(RewireError):
    """`example_inputs` are missing or do not fit the model."""


class BlockShapeError(RewireError):
    """A block of a reversible stage changed the shape of its input."""


class ReconstructionError(RewireError):
    """Backward reconstructed a non-finite value: the inversion lost precision."""


class StageFreedError(RewireError):
    """Backward was called a second time through a reversible stage."""


class CheckpointError(RewireError):
    """A checkpoint is missing, corrupt, or belongs to another architecture."""


class SpecError(RewireError):
    """A model spec (`timm:NAME`, `torchvision:NAME`, `module:pkg.mod:factory`) is invalid."""


class OutputError(RewireError):
    """An output path exists (and overwriting was not asked for) or cannot be written."""


class OptionError(InputError, ValueError):
    """A rewire option is unknown or has a wrong value (also a ValueError, as before)."""
