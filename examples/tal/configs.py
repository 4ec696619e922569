"""Experiment configuration: one dataclass tree, three presets, `--set key=value` overrides.

Presets:
  tiny      synthetic data, a small Swin3D, CPU-sized (the default of train.py)
  thumos14  THUMOS-14 frames, Swin3D-T, 1024 frames per window at 224², for CUDA
  anet      ActivityNet-1.3 frames, Swin3D-T, each video resampled to 768 frames, for CUDA
"""
from __future__ import annotations

import ast
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Sequence, Tuple

ENGINES = ("reversible", "autograd", "checkpoint", "frozen")


@dataclass
class SyntheticConfig:
    """Parameters of the synthetic dataset (see synthetic.py); they name its cache folder."""

    seed: int = 0
    num_train: int = 192
    num_val: int = 48
    num_classes: int = 4
    size: int = 40                      # frames are size x size pixels
    min_frames: int = 64
    max_frames: int = 128
    fps: float = 10.0
    min_action: int = 8                 # action length in frames
    max_action: int = 32
    max_actions: int = 3                # per video (at least one)
    motion_only: bool = False           # every class the same grey bar: only the motion differs


@dataclass
class ClipSetConfig:
    """A synthetic set of trimmed clips, one action each, for clip classification (pretraining).

    The recipe's stand-in for Kinetics: motions related to the localisation classes but not the
    same ones (shake ~ slide, zoom ~ pulse, sway ~ spin; bounce and orbit shared with or close to
    them), so features learnt here help localisation without already being perfect for it.
    """

    seed: int = 1
    classes: Tuple[str, ...] = ("bounce", "orbit", "shake", "zoom", "sway", "blink")
    num_train: int = 64                 # clips per class
    num_val: int = 16                   # clips per class
    frames: int = 16                    # every clip is one action from its first frame to its last
    size: int = 40
    motion_only: bool = True            # every class the same grey bar (as the localisation main task)


@dataclass
class DataConfig:
    source: str = "synthetic"           # "synthetic" or "files"
    annotations: str = ""               # ActivityNet-style JSON (data.py) when source == "files"
    media_root: str = ""                # holds <video_id>/ (JPEG frames) or <video_id>.<ext> (video files)
    cache_dir: str = ""                 # synthetic data goes here; "" = examples/tal/cache
    train_subset: str = "training"
    test_subset: str = "validation"
    window: int = 64                    # sampled frames per window fed to the backbone
    snippet_stride: int = 1             # take every n-th frame
    fixed_length: bool = False          # resample every whole video to `window` frames (ActivityNet style)
    test_overlap: float = 0.5           # overlap of sliding test windows, in [0, 1)
    trunc_thresh: float = 0.5           # a cut action must keep this fraction to stay a target
    resize: int = 40                    # shorter side after resizing (pixels)
    crop: int = 32                      # square crop fed to the backbone
    scale_jitter: Tuple[float, float] = (1.0, 1.15)  # training: random factor on `resize`
    flip: bool = True
    mean: Tuple[float, float, float] = (0.45, 0.45, 0.45)
    std: Tuple[float, float, float] = (0.225, 0.225, 0.225)
    num_workers: int = 1                # decoding overlaps the step on a second core
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    engine: str = "reversible"          # one of ENGINES
    # backbone: a revwire model spec ("torchvision:swin3d_t", "module:pkg.mod:factory", ...) built by
    # revwire.build_model(backbone, backbone_kwargs) and adapted to a (B, C, T') sequence by
    # model.py's BACKBONE_ADAPTERS; "" = the SwinTransformer3d described by the fields below
    backbone: str = ""
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    # Swin3D backbone (torchvision.models.video.swin_transformer.SwinTransformer3d), when backbone == ""
    patch_size: Tuple[int, int, int] = (2, 4, 4)
    embed_dim: int = 32
    depths: Tuple[int, ...] = (2, 2)
    num_heads: Tuple[int, ...] = (2, 4)
    window_size: Tuple[int, int, int] = (8, 4, 4)
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    weights: str = ""                   # local state_dict of the backbone (head keys ignored; model.py load_weights)
    spatial_pool: str = "mean+max"      # "mean", "max" or "mean+max" (both, concatenated)
    # ActionFormer-style neck and heads
    neck_dim: int = 64
    neck_layers: int = 2                # conv layers before the pyramid
    pyramid_levels: int = 5             # level l has temporal stride 2**l (in backbone steps)
    regression_ranges: Tuple[Tuple[float, float], ...] = ((0, 4), (4, 8), (8, 16), (16, 32), (32, 1e4))
    center_radius: float = 1.5          # centre sampling radius, in units of the level's stride
    head_layers: int = 2
    prior_prob: float = 0.01            # initial foreground probability of the classifier


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-3                    # head and neck
    backbone_lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    backbone_delay_epochs: float = 0.0  # the backbone's lr stays 0 this long (head first), then warms up
    min_lr_ratio: float = 0.0           # cosine decays to lr * min_lr_ratio
    clip_grad: float = 1.0              # max gradient norm; 0 turns clipping off
    ema_decay: float = 0.99             # 0 turns the EMA off
    amp: bool = True                    # bf16 autocast (CUDA only)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_weight: float = 1.0
    eval_every: int = 5
    seed: int = 0
    threads: int = 1                    # torch CPU threads (1 is fastest on a shared 2-core CPU)


@dataclass
class EvalConfig:
    score_thresh: float = 0.001
    pre_nms_topk: int = 2000
    nms_sigma: float = 0.5
    min_score: float = 0.001            # drop segments below this after Soft-NMS
    max_segments: int = 100             # per video
    batch_size: int = 8
    tious: Tuple[float, float, int] = (0.3, 0.7, 5)   # numpy.linspace(START, STOP, NUM)


@dataclass
class Config:
    name: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        return _from_dict(cls, d)


def _from_dict(cls, d):
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in d.items():
        if key not in hints:
            raise KeyError(f"unknown config key {key!r} for {cls.__name__}")
        default = getattr(cls(), key) if key in hints else None
        if dataclasses.is_dataclass(default):
            value = _from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = _tupleize(value)
        kwargs[key] = value
    return cls(**kwargs)


def _tupleize(v):
    return tuple(_tupleize(x) for x in v) if isinstance(v, (list, tuple)) else v


def _tiny() -> Config:
    return Config(name="tiny")


def _thumos14() -> Config:
    # Swin3D-T as torchvision's swin3d_t; 1024 frames per window at 224² (issue 6);
    # optimiser and post-processing in the range ActionFormer uses for THUMOS-14.
    return Config(
        name="thumos14",
        data=DataConfig(
            source="files", train_subset="validation", test_subset="test",
            window=1024, snippet_stride=1, test_overlap=0.25, resize=256, crop=224,
            scale_jitter=(1.0, 1.15), num_workers=8,
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        ),
        model=ModelConfig(
            embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=(8, 7, 7),
            drop_path=0.1, spatial_pool="mean", neck_dim=512, pyramid_levels=6,
            regression_ranges=((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 1e4)),
        ),
        train=TrainConfig(
            epochs=35, batch_size=2, lr=1e-4, backbone_lr=2e-5, warmup_epochs=5,
            ema_decay=0.999, eval_every=5,
        ),
        eval=EvalConfig(max_segments=200, batch_size=2, tious=(0.3, 0.7, 5)),
    )


def _anet() -> Config:
    # ActivityNet-1.3: each video resampled to a fixed number of frames (whole video, one window).
    return Config(
        name="anet",
        data=DataConfig(
            source="files", train_subset="training", test_subset="validation",
            window=768, fixed_length=True, resize=182, crop=160, num_workers=8,
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        ),
        model=ModelConfig(
            embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=(8, 7, 7),
            drop_path=0.1, spatial_pool="mean", neck_dim=256, pyramid_levels=6,
            regression_ranges=((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 1e4)),
        ),
        train=TrainConfig(
            epochs=15, batch_size=4, lr=1e-3, backbone_lr=1e-4, warmup_epochs=3,
            ema_decay=0.999, eval_every=3,
        ),
        eval=EvalConfig(max_segments=100, batch_size=4, tious=(0.5, 0.95, 10)),
    )


PRESETS = {"tiny": _tiny, "thumos14": _thumos14, "anet": _anet}


def get_config(name: str = "tiny", overrides: Sequence[str] = ()) -> Config:
    """The preset `name` with `overrides` ("section.key=value", values as Python literals) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def apply_override(cfg: Config, item: str) -> None:
    """Set one "a.b.c=value" on `cfg`; the value is a Python literal or a bare string."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.epochs=3")
    path, raw = item.split("=", 1)
    keys = path.strip().split(".")
    target = cfg
    for k in keys[:-1]:
        if not hasattr(target, k) or not dataclasses.is_dataclass(getattr(target, k)):
            raise ValueError(f"override {item!r}: {path!r} is not a config section")
        target = getattr(target, k)
    last = keys[-1]
    if not dataclasses.is_dataclass(target) or last not in {f.name for f in dataclasses.fields(target)}:
        raise ValueError(f"override {item!r}: unknown key {path!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    current = getattr(target, last)
    if isinstance(current, tuple) and isinstance(value, (list, tuple)):
        value = _tupleize(value)
    elif isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"override {item!r}: {path} needs True or False")
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif current is not None and not isinstance(value, type(current)):
        raise ValueError(f"override {item!r}: {path} must be of type {type(current).__name__}, got {value!r}")
    setattr(target, last, value)


def validate(cfg: Config) -> None:
    """Reject inconsistent settings early, with a message that says what to change."""
    m, d = cfg.model, cfg.data
    if m.engine not in ENGINES:
        raise ValueError(f"model.engine={m.engine!r}: choose one of {ENGINES}")
    if len(m.depths) != len(m.num_heads):
        raise ValueError(f"model.depths {m.depths} and model.num_heads {m.num_heads} need the same length")
    if len(m.regression_ranges) != m.pyramid_levels:
        raise ValueError(
            f"model.regression_ranges has {len(m.regression_ranges)} entries but model.pyramid_levels "
            f"is {m.pyramid_levels}: give one (low, high) range per level"
        )
    if not m.backbone:   # a spec backbone's temporal stride is known once built (model.build_model checks it)
        check_window(d.window, m.patch_size[0], m.pyramid_levels, "patch_size[0]")
    if not 0 <= d.test_overlap < 1:
        raise ValueError(f"data.test_overlap={d.test_overlap} must be in [0, 1)")
    if d.crop > d.resize:
        raise ValueError(f"data.crop={d.crop} is larger than data.resize={d.resize}")
    if d.source not in ("synthetic", "files"):
        raise ValueError(f"data.source={d.source!r}: choose 'synthetic' or 'files'")
    if d.source == "files" and not (d.annotations and d.media_root):
        raise ValueError("data.source='files' needs --annotations GT.json and --media-root DIR")
    if d.source == "synthetic" and cfg.data.synthetic.min_frames > cfg.data.synthetic.max_frames:
        raise ValueError("data.synthetic.min_frames is larger than data.synthetic.max_frames")


def check_window(window: int, temporal_stride: int, levels: int, stride_name: str = "the backbone's temporal stride") -> None:
    """Every pyramid level must tile the window: window = k * temporal_stride * 2**(levels - 1)."""
    if window % (temporal_stride * 2 ** (levels - 1)):
        raise ValueError(
            f"data.window={window} must be a multiple of {stride_name} * 2**(pyramid_levels-1) = "
            f"{temporal_stride} * {2 ** (levels - 1)} = {temporal_stride * 2 ** (levels - 1)}"
        )


def copy_config(cfg: Config) -> Config:
    return copy.deepcopy(cfg)
