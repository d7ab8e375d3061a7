"""What differs between the two LiVT stages: the model, the transform, the loss of a step and the evaluation.

The training loop (engine.py) and `livt eval` (evaluate.py) are shared; they only call what `Task` declares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from livt_ds import dist, report
from livt_ds.config import Recipe, check_loss_targets, recipe_to_dict
from livt_ds.data import transforms
from livt_ds.data.shards import train_class_counts
from livt_ds.data.transforms import normalisation, to_model_input
from livt_ds.errors import CheckpointError
from livt_ds.losses import build_loss, default_drw_epoch
from livt_ds.metrics import EvalAccumulator, per_class_accuracy, prediction_report
from livt_ds.models.registry import build_classifier, build_mae
from livt_ds.models.vit import load_encoder_weights
from livt_ds.priors import expected_accuracy, recipe_prior_adjustment, resolve_prior, standard_prior_names
from livt_ds.test_split import resolve_test_split

Forward = Callable[[torch.Tensor], Any]


@dataclass
class EvalResult:
    """Evaluation metrics (JSON-serialisable) and images to log (name -> [3, H, W] float in [0, 1])."""

    metrics: dict[str, Any]
    images: dict[str, torch.Tensor]


class Task(Protocol):
    """One LiVT stage as the trainer sees it."""

    stage: str  # "pretrain" | "finetune": names the checkpoint kind and the run
    best_metric: tuple[str, str]  # (metric of `evaluate`, "min" | "max"): which evaluation is the best

    recipe: Recipe

    def build_model(self, init: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """The stage's model; ``init``: weights to start from (``model.init``, read by weights.initial_model)."""
        ...

    def train_transform(self) -> Callable: ...  # PIL image (or ``.decode``'s output) -> [3, H, W] tensor, augmented

    def eval_transform(self) -> Callable: ...

    def prepare_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """On the device, before the forward: (normalised float images, targets), e.g. mixup's soft targets."""
        ...

    def loss(self, forward: Forward, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def set_epoch(self, epoch: int) -> None:
        """The 0-based epoch of the coming steps (a loss whose form changes with it, LDAM-DRW, is told)."""
        ...

    def evaluate(self, forward: Forward, model: nn.Module, loader: Iterable, cast: Callable) -> EvalResult:
        """Metrics over the eval loader (every rank calls it; results are gathered)."""
        ...


def padded_eval_batches(loader: Iterable, img_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Yield (images, labels, real) until every rank has run out; a rank that has run out gets a dummy batch
    (``real`` False) so that all ranks make the same number of forward calls (ZeRO-3 gathers weights in forward)."""
    iterator = iter(loader)
    dummy = (torch.zeros(1, 3, img_size, img_size), torch.zeros(1, dtype=torch.long))
    while True:
        batch = next(iterator, None)
        if not dist.any_rank(batch is not None):
            return
        yield (batch[0], batch[1], True) if batch is not None else (*dummy, False)


class PretrainTask:
    """MGP: masked-autoencoder pretraining, label-free; evaluated by the masked-patch loss on the eval split."""

    stage = "pretrain"
    best_metric = ("recon_loss", "min")

    def __init__(self, recipe: Recipe, meta: dict) -> None:
        self.recipe = recipe
        self.meta = meta
        self.mean, self.std = normalisation(recipe, meta)

    def build_model(self, init: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """The MAE, from scratch (``init`` is for fine-tuning)."""
        m = self.recipe.model
        model = build_mae(m)
        if m.grad_checkpointing:
            model.encoder.set_grad_checkpointing(True)
        return model

    def train_transform(self):
        """Crops decoded (at reduced size where the crop allows) and cut in the loader; `prepare_batch` resizes,
        flips and normalises them on the device."""
        return transforms.PretrainCrop(self.recipe.model.img_size, resize_on_device=True)

    def eval_transform(self):
        return transforms.eval_transform(self.recipe.model.img_size, self.mean, self.std, self.recipe.augment.crop_pct)

    def prepare_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_input(images, self.mean, self.std), labels

    def loss(self, forward: Forward, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss, _, _ = forward(images)
        return loss

    def set_epoch(self, epoch: int) -> None:
        pass  # the MAE loss does not change over the epochs

    @torch.no_grad()
    def evaluate(self, forward: Forward, model: nn.Module, loader: Iterable, cast: Callable) -> EvalResult:
        """Mean masked-patch loss over the eval split with a fixed masking seed, and a reconstruction grid."""
        total = torch.zeros(2)
        grid = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234 + dist.rank())
            for images, _, real in padded_eval_batches(loader, self.recipe.model.img_size):
                loss, pred, mask = forward(cast(images))
                if real:
                    total += torch.tensor([loss.float().item() * images.shape[0], images.shape[0]])
                    if grid is None and dist.is_main():
                        grid = self._reconstructions(model, images, pred, mask)
        total = dist.all_reduce_mean(total) * dist.world_size()
        metrics = {"recon_loss": float(total[0] / max(total[1], 1)), "num_samples": int(total[1])}
        return EvalResult(metrics, {"reconstructions": grid} if grid is not None else {})

    def _reconstructions(self, model: nn.Module, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
        mae = getattr(model, "module", model)
        images = images.float().cpu()
        pred, mask = pred.float().cpu(), mask.float().cpu()
        if self.recipe.model.norm_pix:  # undo the per-patch normalisation with the true patch statistics
            target = mae.patchify(images)
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        pred_images = mae.unpatchify(pred)
        mask_images = mae.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
        scale = max(1, 128 // images.shape[-1])  # nearest-neighbour x4 for 32 px: tiles people can see
        return report.reconstruction_grid(images, pred_images, mask_images, self.mean, self.std, scale=scale)


class FinetuneTask:
    """BFT: encoder + linear head trained with the (balanced) loss from the shards' class prior."""

    stage = "finetune"
    best_metric = ("top1", "max")

    def __init__(self, recipe: Recipe, meta: dict, class_counts: list[int] | None = None,
                 trained_with: dict | None = None) -> None:
        """``class_counts`` / ``trained_with``: the training prior and the recipe dict the test-prior adjustment
        follows, when they are not ``meta``'s and ``recipe``'s (`livt eval` passes the model's own)."""
        self.recipe = recipe
        self.meta = meta
        self.mean, self.std = normalisation(recipe, meta)
        self.class_counts = class_counts or train_class_counts(meta, recipe.data.train_split)
        self.num_classes = int(meta["num_classes"])
        a, lo = recipe.augment, recipe.loss
        self.mixup = transforms.build_mixup(self.num_classes, a.mixup, a.cutmix, a.label_smoothing)
        check_loss_targets(recipe)
        self.test_split = resolve_test_split(recipe, meta)  # read once, at the end of a run (test_split.py)
        drw_epoch = default_drw_epoch(recipe.train.epochs) if lo.drw_epoch is None else lo.drw_epoch
        self.criterion = build_loss(lo.name, self.class_counts, tau=lo.tau, test_prior=lo.test_prior, gamma=lo.gamma,
                                    beta=lo.beta, max_margin=lo.max_margin, scale=lo.scale, drw_epoch=drw_epoch)
        names = [*standard_prior_names(), *(p for p in recipe.eval.test_priors if p not in standard_prior_names())]
        self.test_priors = {name: resolve_prior(name, self.class_counts, meta.get("classes")) for name in names}
        trained_with = trained_with or recipe_to_dict(recipe)
        self.prior_adjustments = torch.stack([recipe_prior_adjustment(self.class_counts, trained_with, prior)
                                              for prior in self.test_priors.values()])

    def build_model(self, init: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """The classifier, its trunk from ``init`` (an MGP encoder or a BFT classifier: ``model.init``) when given."""
        m = self.recipe.model
        model = build_classifier(m, self.num_classes)
        if m.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if init is not None:
            try:
                report = load_encoder_weights(model, init)
            except ValueError as exc:
                raise CheckpointError(f"model.init={m.init}: {exc}") from exc
            if dist.is_main():
                print(f"[livt] model.init={m.init}: new (not in the checkpoint) {report['missing']}, unexpected "
                      f"{report['unexpected']}, ignored {len(report['ignored'])} keys (decoder / other head)")
        return model

    def train_transform(self):
        a = self.recipe.augment
        return transforms.finetune_transform(self.recipe.model.img_size, self.mean, self.std,
                                        rand_augment=a.rand_augment, re_prob=a.re_prob, crop_scale=a.crop_scale)

    def eval_transform(self):
        return transforms.eval_transform(self.recipe.model.img_size, self.mean, self.std, self.recipe.augment.crop_pct)

    def prepare_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup / cutmix / label smoothing into soft targets [B, C] (int labels [B] when all are off)."""
        images = to_model_input(images, self.mean, self.std)
        if self.mixup is None:
            return images, labels
        return self.mixup(images, labels)

    def loss(self, forward: Forward, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = forward(images)
        return self.criterion.to(logits.device)(logits, targets.to(logits.device))

    def set_epoch(self, epoch: int) -> None:
        """Passed on to a loss that changes with the epoch (LDAM-DRW), which says when it starts re-weighting."""
        if not hasattr(self.criterion, "set_epoch"):
            return
        before = self.criterion.reweighting
        self.criterion.set_epoch(epoch)
        if self.criterion.reweighting and not before and dist.is_main():
            print(f"[livt] epoch {epoch}: LDAM-DRW re-weights with the class-balanced weights from here on "
                  f"(loss.drw_epoch {self.criterion.drw_epoch})", flush=True)

    @torch.no_grad()
    def evaluate(self, forward: Forward, model: nn.Module, loader: Iterable, cast: Callable) -> EvalResult:
        """Top-1, many/medium/few, ECE/MCE and per-class accuracy of the raw logits (the bias is loss-only), and
        the expected top-1 under each test prior, raw and prior-adjusted (``test_priors`` in the metrics).

        Each rank keeps only predictions, confidences, labels and per-class counts (fp32 softmax/argmax), so
        the gather is O(N + P*C), not the N*C logits."""
        acc = EvalAccumulator(self.num_classes, self.prior_adjustments)
        for images, target, real in padded_eval_batches(loader, self.recipe.model.img_size):
            out = forward(cast(images))
            if real:
                acc.update(out, target)
        pred, confidence, labels, adjusted_hits = acc.gather()
        metrics = prediction_report(pred, confidence, labels, self.class_counts)
        per_count = torch.bincount(labels, minlength=self.num_classes)
        metrics["test_priors"] = {
            name: {"raw": expected_accuracy(metrics["per_class"], prior),
                   "adjusted": expected_accuracy(per_class_accuracy(adjusted_hits[p], per_count), prior)}
            for p, (name, prior) in enumerate(self.test_priors.items())}
        metrics["test_prior_loss"] = {"name": self.recipe.loss.name, "tau": self.recipe.loss.tau}
        images = {}
        if dist.is_main():
            images["per_class_accuracy"] = report.per_class_image({"model": metrics["per_class"]}, self.class_counts)
            images["reliability"] = report.reliability_image({"model": {**metrics["reliability"],
                                                                         "ece": metrics["ece"]}})
            images["test_priors"] = report.prior_shift_image(metrics["test_priors"])
        return EvalResult(metrics, images)


TASKS: dict[str, type] = {"pretrain": PretrainTask, "finetune": FinetuneTask}


def build_task(stage: str, recipe: Recipe, meta: dict) -> Task:
    if stage not in TASKS:
        raise ValueError(f"unknown stage '{stage}'; valid: {', '.join(TASKS)}")
    return TASKS[stage](recipe, meta)
