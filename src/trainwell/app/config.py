"""The schema of one run: pydantic models, one section each (reading TOML files and
``--set`` overrides into it is :mod:`trainwell.app.config_files`).

Every section refuses unknown keys, wrong types and out-of-range values with a
``ConfigError`` whose lines each name the key and what it accepts; the CLI
prints them and exits with status 2.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

OPTIMIZER_ALIASES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
LOSS_NAMES = ("cross_entropy", "mse", "l1", "huber", "bce_with_logits")
#: Config keys that hold user code; relative file paths in them are relative to the config.
TARGET_KEYS = ("model.target", "data.target", "data.collate", "task.loss", "task.step",
               "task.metrics", "optimizer.name", "scheduler.name")  # fmt: skip
#: Upper bounds of the integer settings: far beyond any sensible run, low enough that a typo
#: (an extra zero run, ``1e23``) is refused at once instead of training forever or
#: allocating terabytes. Seeds stay below 2**31 so ``seed + member / study seed index``
#: stays a valid NumPy / scikit-learn seed (< 2**32).
MAX_EPOCHS = 1_000_000
MAX_STEPS = 1_000_000  # patience, warmup, accumulate, every-n-steps counts
MAX_BATCH = 2**24
MAX_WIDTH = 1_000_000
MAX_LAYERS = 1_000
MAX_CHANNELS = 4_096
MAX_SEED = 2**31 - 1
MAX_MEMBERS = 1_000
MAX_KEEP = 10_000
MAX_WINDOW = 10_000


def _torch_class(module: str, name: str, base: str) -> bool:
    """Whether ``module.name`` is a class derived from ``module.base`` (e.g. an optimizer)."""
    import importlib

    mod = importlib.import_module(module)
    cls, parent = getattr(mod, name, None), getattr(mod, base, None)
    return isinstance(cls, type) and parent is not None and issubclass(cls, parent)


class ConfigError(ValueError):
    """A config that cannot be used; ``str()`` is one line per problem."""


class Section(BaseModel):
    """Unknown keys are refused, and so is every NaN or Inf float (``allow_inf_nan=False``);
    a field where Inf means something says so with ``Field(allow_inf_nan=True)``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(Section):
    source: str = Field(
        "digits", description="digits | breast_cancer | wine | diabetes | path.csv | path.npz"
    )
    target: str | None = Field(
        None, description="label column of a CSV file, or 'module:function' returning datasets"
    )
    args: dict[str, Any] = Field(default_factory=dict, description="keyword args of the target")
    num_workers: int = Field(0, ge=0, le=256, description="DataLoader worker processes")
    pin_memory: bool = False
    collate: str | None = Field(None, description="'module:function' collate_fn")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    train_fraction: float | None = Field(None, gt=0, le=1, description="keep part of train")
    train_size: int | None = Field(
        None, ge=1, le=10**12, description="keep this many training samples"
    )
    split_seed: int | None = Field(
        None, ge=0, le=2**31 - 1,
        description="seed of the train/val/test split and subsample (default: the run's seed)",
    )  # fmt: skip

    def data_seed(self, run_seed: int) -> int:
        """The seed that draws the split: ``split_seed``, else the run's own seed."""
        return run_seed if self.split_seed is None else self.split_seed


class ModelConfig(Section):
    target: str | None = Field(None, description="'module:Class' or 'file.py:Class' (user model)")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword args of the target")
    kind: Literal["mlp", "cnn"] = "mlp"
    hidden: list[int] = Field(
        default_factory=lambda: [256, 256],
        min_length=1,
        max_length=MAX_LAYERS,
        description=f"hidden layer widths, each in [1, {MAX_WIDTH}]",
    )
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    norm: Literal["none", "batch", "layer"] = "none"
    dropout: float | list[float] = Field(0.0, description="one rate or one per hidden layer")
    channels: int = Field(32, ge=1, le=MAX_CHANNELS, description="cnn only")

    @field_validator("hidden")
    @classmethod
    def _widths_in_range(cls, hidden: list[int]) -> list[int]:
        bad = [w for w in hidden if not 1 <= w <= MAX_WIDTH]
        if bad:
            raise ValueError(
                f"every width must be in [1, {MAX_WIDTH}]; layer {hidden.index(bad[0])} "
                f"is {short_value(bad[0])}"
            )
        return hidden

    @field_validator("dropout")
    @classmethod
    def _rates_in_range(cls, dropout: float | list[float]) -> float | list[float]:
        rates = dropout if isinstance(dropout, list) else [dropout]
        if any(not 0.0 <= r < 1.0 for r in rates):
            raise ValueError("every rate must be in [0, 1)")
        return dropout


class OptimizerConfig(Section):
    name: str = Field(
        "adamw", description="sgd | adam | adamw | any torch.optim class | module:Class"
    )
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(0.0, ge=0)
    decoupled: bool = Field(True, description="weight decay via param_groups, no bias/norm decay")
    scheduler: Literal["none", "cosine"] = Field("none", description="shorthand for [scheduler]")
    args: dict[str, Any] = Field(default_factory=dict, description="more optimizer keyword args")

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        if (
            ":" in name
            or name.lower() in OPTIMIZER_ALIASES
            or _torch_class("torch.optim", name, "Optimizer")
        ):
            return name
        raise ValueError(
            f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZER_ALIASES)}, a "
            "torch.optim class name (e.g. RMSprop) or 'module:Class'"
        )


class SchedulerConfig(Section):
    name: str = Field(
        "none", description="none | any torch.optim.lr_scheduler class | module:Class"
    )
    args: dict[str, Any] = Field(default_factory=dict, description="scheduler keyword args")
    interval: Literal["epoch", "step"] = Field("epoch", description="when the scheduler steps")
    monitor: str = Field("val_loss", description="the metric a plateau scheduler watches")

    @field_validator("name")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        if (
            name == "none"
            or ":" in name
            or _torch_class("torch.optim.lr_scheduler", name, "LRScheduler")
        ):
            return name
        raise ValueError(
            f"unknown scheduler {name!r}; accepted: none, a torch.optim.lr_scheduler class name "
            "(e.g. OneCycleLR, ReduceLROnPlateau) or 'module:Class'"
        )


class TaskConfig(Section):
    kind: Literal["classification", "regression"] = "classification"
    loss: str | None = Field(
        None, description="cross_entropy | mse | l1 | huber | bce_with_logits | module:function"
    )
    metrics: list[str] = Field(default_factory=list, description="extra 'module:function' metrics")
    step: str | None = Field(
        None, description="'module:function' batch hook (model, batch, loss_fn) -> step output"
    )

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, loss: str | None) -> str | None:
        if loss is None or ":" in loss or loss in LOSS_NAMES:
            return loss
        raise ValueError(
            f"unknown loss {loss!r}; accepted: {', '.join(LOSS_NAMES)} or 'module:function'"
        )

    @model_validator(mode="after")
    def _loss_fits_kind(self) -> TaskConfig:
        """A built-in loss of the other kind fails in the first batch (float targets for
        cross-entropy, logits against labels for MSE); a ``step`` hook may adapt them."""
        if self.step is not None or self.loss is None or ":" in self.loss:
            return self
        if self.kind == "regression" and self.loss == "cross_entropy":
            raise ValueError(
                'loss "cross_entropy" takes class labels, but kind is "regression"; accepted '
                'there: mse, l1, huber, bce_with_logits (or kind = "classification")'
            )
        if self.kind == "classification" and self.loss in ("mse", "l1", "huber"):
            raise ValueError(
                f'loss "{self.loss}" is a regression loss, but kind is "classification"; '
                'accepted there: cross_entropy, bce_with_logits (or kind = "regression")'
            )
        return self


class RegularizationConfig(Section):
    l1: float = Field(0.0, ge=0)
    l2: float = Field(0.0, ge=0)
    exclude: list[str] = Field(default_factory=list, description="extra name patterns")
    exclude_embeddings: bool = False
    per_layer: dict[str, tuple[float, float]] = Field(default_factory=dict)
    max_norm: float | None = Field(None, gt=0, description="max-norm constraint on weights")


class DropoutConfig(Section):
    p: float | None = Field(None, ge=0, lt=1, description="overrides every dropout rate")
    per_layer: dict[str, float] = Field(default_factory=dict)
    schedule: Literal["none", "early", "late", "linear"] = "none"
    schedule_fraction: float = Field(
        0.25, gt=0, lt=1, description="early: off after; late: on after"
    )
    schedule_unit: Literal["step", "epoch"] = "step"


class ClipConfig(Section):
    mode: Literal["none", "value", "norm", "adaptive", "auto", "zscore"] = "none"
    value: float = Field(1.0, gt=0)
    max_norm: float = Field(1.0, gt=0, allow_inf_nan=True, description="inf means no clipping")
    norm_type: float = Field(2.0, gt=0, allow_inf_nan=True, description="inf: the max norm")
    clipping: float = Field(0.01, gt=0, description="adaptive")
    percentile: float = Field(10.0, gt=0, le=100, description="auto")
    z: float = Field(2.5, gt=0, description="zscore")


class GradientsConfig(Section):
    clip: ClipConfig = Field(default_factory=ClipConfig)
    skip_nonfinite: bool = True
    accumulate: int = Field(1, ge=1, le=MAX_STEPS)
    monitor: bool = False
    monitor_every: int = Field(10, ge=1, le=MAX_STEPS)


class EarlyStoppingConfig(Section):
    enabled: bool = False
    monitor: str = "val_loss"
    mode: Literal["min", "max"] | None = Field(
        None, description="default: from the monitor's name (val_loss min, val_acc max, ...)"
    )
    patience: int = Field(7, ge=1, le=MAX_STEPS)
    min_delta: float = Field(0.0, ge=0)
    delta_mode: Literal["abs", "rel"] = "abs"
    baseline: float | None = Field(None, description="must beat this to count")
    warmup: int = Field(0, ge=0, le=MAX_STEPS, description="checks before which nothing counts")
    stopping_threshold: float | None = Field(None, description="stop once this good")
    divergence_threshold: float | None = Field(None, description="stop once this bad")
    smoothing: Literal["none", "ema", "median"] = "none"
    window: int = Field(5, ge=1, le=MAX_WINDOW, description="smoothing window")
    nan_policy: Literal["stop", "worst", "raise"] = "stop"
    restore_best: bool = True

    @model_validator(mode="after")
    def _known_direction(self) -> EarlyStoppingConfig:
        """Resolve ``mode`` from the monitor's name (also the checkpoints' best-k direction)."""
        from trainwell.stopping import METRIC_DIRECTIONS, metric_base_name, metric_mode

        known = metric_mode(self.monitor)
        if self.mode is None and known is None:
            raise ValueError(
                f"monitor {self.monitor!r} is not a metric trainwell knows the direction of "
                f"({', '.join(METRIC_DIRECTIONS)}, with any val_/ema_val_/swa_val_ "
                'prefix); set early_stopping.mode = "min" or "max"'
            )
        if self.mode is not None and known is not None and self.mode != known:
            raise ValueError(
                f"mode {self.mode!r} contradicts monitor {self.monitor!r}: "
                f"{metric_base_name(self.monitor)} is better "
                f"{'lower' if known == 'min' else 'higher'}; leave mode unset or set {known!r}"
            )
        if self.mode is None:
            self.mode = known  # validated again (idempotent): the resolved mode is stored
        return self


class CheckpointConfig(Section):
    enabled: bool = False
    keep_last: int = Field(2, ge=1, le=MAX_KEEP)
    keep_best: int = Field(1, ge=0, le=MAX_KEEP)


class EMAConfig(Section):
    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)
    warmup: bool = True
    update_every: int = Field(1, ge=1, le=MAX_STEPS)
    buffers: Literal["copy", "average"] = "copy"


class SWAConfig(Section):
    enabled: bool = False
    start: float = Field(0.75, gt=0, lt=1, description="fraction of epochs before averaging")
    lr: float | None = Field(None, gt=0, description="SWA learning rate (default: optimizer lr)")
    anneal_epochs: int = Field(5, ge=1, le=MAX_EPOCHS)


class EnsembleConfig(Section):
    members: int = Field(0, ge=0, le=MAX_MEMBERS, description="0 or 1: no ensemble")
    diversity: Literal["seeds", "bagging", "snapshot"] = "seeds"
    combine: Literal["mean_prob", "mean_logit", "vote", "geometric"] = "mean_prob"
    jobs: int = Field(1, ge=1, le=256)


class DistributedConfig(Section):
    timeout_s: float = Field(
        120.0, gt=0, le=86400, description="seconds a DDP collective may wait for a rank"
    )


#: Tracking URIs MLflow resolves by name, not as paths (``databricks``, ``databricks://profile``).
NAMED_STORES = re.compile(r"databricks(://.*)?|databricks-uc(://.*)?")


class LoggingConfig(Section):
    """Where a run's metrics go besides its run directory: TensorBoard and MLflow.

    Relative locations are relative to the current directory (as MLflow and ``tensorboard
    --logdir`` read them) and made absolute when the config is loaded, so ``trainwell
    resume`` appends to the same place from anywhere.
    """

    tensorboard: bool | str = Field(
        False,
        description="true: event files in RUN_DIR/tensorboard (a study: STUDY_DIR/"
        "tensorboard/RUN); or a folder that gets one subfolder per run",
    )
    mlflow: str | None = Field(
        None,
        description="MLflow tracking URI: file:./mlruns, sqlite:///mlflow.db, http://host:5000",
    )
    experiment: str | None = Field(
        None, description="MLflow experiment (default: trainwell; ablate: the study's name)"
    )
    run_name: str | None = Field(
        None, description="default: the run directory's name; ablate: variant/data/seed"
    )
    tags: dict[str, str] = Field(default_factory=dict, description="extra MLflow run tags")
    every_n_steps: int = Field(
        50, ge=0, le=MAX_STEPS,
        description="log train loss and lr every N optimizer steps (0: per epoch only)",
    )  # fmt: skip

    @field_validator("tensorboard", mode="before")
    @classmethod
    def _tensorboard_kind(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, str) and value.strip()):
            return value
        raise ValueError(
            "expected true, false or the folder for the event files (a non-empty string)"
            f" (got {short_value(value)})"
        )

    @field_validator("mlflow", mode="before")
    @classmethod
    def _tracking_uri(cls, value: Any) -> Any:
        if value is False or value is None:
            return None
        if isinstance(value, str) and value.strip() and "\n" not in value and len(value) < 2000:
            return value.strip()
        raise ValueError(
            'expected an MLflow tracking URI such as "file:./mlruns", "sqlite:///mlflow.db" '
            f'or "http://host:5000" (or false) (got {short_value(value)})'
        )

    @property
    def enabled(self) -> bool:
        """Whether anything is logged (TensorBoard or MLflow)."""
        return bool(self.tensorboard) or self.mlflow is not None


class RunConfig(Section):
    """One training run."""

    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = Field("auto", description="auto (CUDA when present) | cpu | cuda | cuda:N | mps")
    precision: Literal["32", "bf16", "16-mixed"] = Field(
        "32", description="autocast dtype; 16-mixed adds a GradScaler"
    )
    compile: bool = Field(False, description="torch.compile the model")
    epochs: int = Field(30, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    regularization: RegularizationConfig = Field(default_factory=RegularizationConfig)
    dropout: DropoutConfig = Field(default_factory=DropoutConfig)
    gradients: GradientsConfig = Field(default_factory=GradientsConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    swa: SWAConfig = Field(default_factory=SWAConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    ablation: dict[str, Any] = Field(default_factory=dict, description="see `trainwell ablate`")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,4})?", device):
            return device
        raise ValueError(
            f"unknown device {short_value(device)}; accepted: auto, cpu, cuda, cuda:N, mps"
        )

    @model_validator(mode="after")
    def _one_scheduler(self) -> RunConfig:
        if self.optimizer.scheduler != "none" and self.scheduler.name != "none":
            raise ValueError(
                "optimizer.scheduler and scheduler.name are both set; use [scheduler] only"
            )
        return self


def short_value(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters; safe for integers of any size.

    Example:
        >>> short_value(10**300), short_value("x" * 100, 10)
        ('an integer of 301 digits', "'xxxxxx...")
    """
    try:
        text = repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits()
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if len(text) <= limit:
        return text
    if isinstance(value, int) and not isinstance(value, bool):
        return f"an integer of {len(text.lstrip('-'))} digits"
    return text[: limit - 3] + "..."


def cut_text(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _accepted(model: type[BaseModel], loc: tuple) -> str:
    """The keys accepted where an unknown key was found."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    return ", ".join(model.model_fields)


#: How pydantic tags the members of a union in an error's location (``float``, ``list[float]``).
_UNION_TAG = re.compile(r"(int|float|str|bool|none|(list|dict|tuple|set|literal)\[.*\])")


def _key(loc: tuple) -> tuple[str, list[str]]:
    """The dotted key of an error location (``model.hidden[0]``) and the union tags in it."""
    key, tags = "", []
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif _UNION_TAG.fullmatch(str(part)):
            tags.append(str(part))
        else:
            key += ("." if key else "") + str(part)
    return cut_text(key or "config"), tags


def _format(err: ValidationError) -> str:
    """One line per problem; the members of a union (``float | list[float]``) make one line."""
    lines: list[str] = []
    by_key: dict[str, list[tuple[dict, list[str]]]] = {}
    for e in err.errors():
        key, tags = _key(e["loc"])
        by_key.setdefault(key.partition("[")[0] if tags else key, []).append((e, tags))
    for group in by_key.values():
        if any(tags for _, tags in group) and len(group) > 1:
            wrong_value = [(e, t) for e, t in group if not e["type"].endswith("_type")]
            if not wrong_value:  # no member of the union took the value's type
                e = group[0][0]
                names = " or ".join(dict.fromkeys(t[-1] for _, t in group if t))
                key, _ = _key(e["loc"])
                lines.append(f"{key}: input should be {names}{_got(e)}")
                continue
            group = wrong_value
        for e, _ in group:
            lines.append(_line(e))
    return "\n".join(lines)


def _got(e: dict) -> str:
    got = e.get("input")
    return (
        ""
        if isinstance(got, dict) or short_value(got) in e["msg"]
        else f" (got {short_value(got)})"
    )


def _line(e: dict) -> str:
    key, _ = _key(e["loc"])
    if e["type"] == "extra_forbidden":
        key = cut_text(key, 40)  # the line goes on with every accepted key
        return f"{key}: unknown key; accepted here: {_accepted(RunConfig, e['loc'])}"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{key}: {msg[0].lower() + msg[1:]}{_got(e)}"


def validate(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a plain dict, raising ConfigError with one line per problem."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err)) from None
