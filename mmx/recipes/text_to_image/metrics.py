"""What a text-to-image run is scored by, at validation and in ``mmx eval``: metrics that fit the data.

Each metric is a small object registered in :data:`METRICS` and named in ``eval.metrics`` (a list of
specs such as ``{name: fid, weights: FILE}``). Left unset, the data decides
(:func:`default_metrics`): the shapes data is scored by the shapes detector (caption accuracy, and
in ``mmx eval`` attention mIoU); any other data by the held-out denoising loss, which needs no
pretrained network. FID and CLIP score need local weights, so they run only when named.

Every evaluation first generates one image per held-out caption (the grid); a metric reads those
samples, the held-out data set, or both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmx.registry import Registry

__all__ = ["METRICS", "Evaluator", "Evaluation", "MetricResult", "Samples", "default_metrics", "heldout_captions"]

logger = logging.getLogger(__name__)

METRICS: Registry = Registry("metric")


@dataclass
class Samples:
    """One generated image per prompt: ``images [N, C, H, W]`` in [-1, 1] on the CPU; word maps when recorded."""

    prompts: list[str]
    images: torch.Tensor
    maps: list | None = None  # per prompt, its list of WordMap (attention recorded while sampling)


@dataclass
class MetricResult:
    """``scores`` are logged and printed; ``details`` go to eval.json; ``correct`` frames the grid green or red."""

    scores: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    correct: list[bool] | None = None


def _is_shapes(data: Any) -> bool:
    from mmx.data import ShapesDataset

    return isinstance(data, ShapesDataset)


def _need_shapes(data: Any, metric: str) -> None:
    if not _is_shapes(data):
        raise ValueError(
            f"metric {metric!r} reads images with the shapes detector, so it needs the shapes data "
            f"(data.name: shapes); the held-out data is {type(data).__name__}. Use denoising_loss, fid or "
            "clip_score for other data"
        )


@METRICS.register("caption_accuracy")
class CaptionAccuracy:
    """Shapes data only: the share of generated images whose every claim the shapes detector confirms."""

    needs_maps = False
    validates = True

    def __call__(self, evaluator: Evaluator, samples: Samples) -> MetricResult:
        from mmx.eval import accuracy_by_pair, check_caption

        heldout = evaluator.heldout
        _need_shapes(heldout, "caption_accuracy")
        checks = [check_caption(image, prompt) for image, prompt in zip(samples.images, samples.prompts)]
        correct = [check.correct for check in checks]
        by_pair = accuracy_by_pair(
            samples.prompts, correct, heldout.heldout_colour_shape, heldout.heldout_shape_position
        )
        drawn = [[d.describe() for d in check.detections] for check in checks]  # what each image shows
        return MetricResult(
            {"caption_accuracy": sum(correct) / len(correct)},
            {"accuracy_by_pair": by_pair, "correct": correct, "drawn": drawn},
            correct,
        )


@METRICS.register("attention_miou")
class AttentionMIoU:
    """Shapes data only (``mmx eval``): IoU of each object word's attention map with its object.

    On the generated images (against the detector's masks) and on held-out renders noised at a
    few timesteps (against their true masks); layers coarser than ``eval.attention_max_downsample``
    are left out.
    """

    needs_maps = True
    validates = False

    def __init__(self, threshold: float = 0.4) -> None:
        self.threshold = threshold

    def __call__(self, evaluator: Evaluator, samples: Samples) -> MetricResult:
        from mmx.eval.attention import attention_miou_real, generated_miou

        _need_shapes(evaluator.heldout, "attention_miou")
        layers = evaluator.max_downsample
        generated = generated_miou(samples.images, samples.prompts, samples.maps, self.threshold)
        real = attention_miou_real(
            evaluator.pipeline,
            evaluator.heldout,
            len(samples.prompts),
            batch_size=evaluator.cfg.eval.batch_size,
            threshold=self.threshold,
            max_downsample=layers,
        )
        return MetricResult(
            {"attention_miou_generated": generated, "attention_miou_real": real}, {"attention_max_downsample": layers}
        )


@METRICS.register("denoising_loss")
class DenoisingLoss:
    """The model's denoising loss on held-out images, at fixed timesteps with fixed noise (any data, offline).

    The MSE of the prediction against the recipe's target (``diffusion.prediction_type``), without
    loss weights or condition dropping, averaged over ``num_images`` held-out images and the
    timesteps (default: 10 evenly spaced, 50, 150, ..., 950 of 1000). The noise comes from
    ``eval.seed``, so every validation of a run measures the same thing and the numbers fall as
    the model learns, unlike the training loss, which jitters with its random timesteps.
    """

    needs_maps = False
    validates = True

    def __init__(self, timesteps: Sequence[int] | None = None, num_images: int = 64) -> None:
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"denoising_loss num_images must be an integer >= 1; got {num_images!r}")
        self.timesteps = None if timesteps is None else [int(t) for t in timesteps]
        self.num_images = num_images

    def __call__(self, evaluator: Evaluator, samples: Samples) -> MetricResult:
        from mmx.diffusion import denoising_losses

        pipeline, unet = evaluator.pipeline, evaluator.unet
        total = pipeline.scheduler.config.num_train_timesteps
        timesteps = self.timesteps or [round((k + 0.5) * total / 10) for k in range(10)]
        images, captions = evaluator.real_images(self.num_images)
        device = next(unet.parameters()).device
        generator = torch.Generator(device=device).manual_seed(evaluator.cfg.eval.seed)
        losses = []
        for start in range(0, len(captions), evaluator.cfg.eval.batch_size):
            batch = slice(start, start + evaluator.cfg.eval.batch_size)
            ctx = pipeline.encode(captions[batch])
            losses.append(
                denoising_losses(unet, images[batch].to(device), ctx, pipeline.scheduler, timesteps, generator).cpu()
            )
        per_step = torch.cat(losses, dim=1).mean(1)  # (K,)
        return MetricResult(
            {"denoising_loss": float(per_step.mean())},
            {
                "denoising_loss_by_timestep": {int(t): float(v) for t, v in zip(timesteps, per_step)},
                "denoising_loss_images": len(captions),
            },
        )


@METRICS.register("fid")
class FID:
    """FID of the generated images against as many held-out images (needs the Inception weights file)."""

    needs_maps = False
    validates = True

    def __init__(self, weights: str) -> None:
        from mmx.eval.image_metrics import FrechetInceptionDistance

        self.fid = FrechetInceptionDistance(weights)

    def __call__(self, evaluator: Evaluator, samples: Samples) -> MetricResult:
        real, _ = evaluator.real_images(len(samples.prompts))
        self.fid.metric.to(next(evaluator.unet.parameters()).device)
        return MetricResult({"fid": self.fid(real, samples.images[: len(real)])}, {"fid_images": len(real)})


@METRICS.register("clip_score")
class CLIPScoreMetric:
    """CLIP score of each generated image against its caption (needs local open_clip weights)."""

    needs_maps = False
    validates = True

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None) -> None:
        from mmx.eval.image_metrics import CLIPScore

        self.clip = CLIPScore(model_name, pretrained)

    def __call__(self, evaluator: Evaluator, samples: Samples) -> MetricResult:
        self.clip.model.to(next(evaluator.unet.parameters()).device)
        scores = self.clip.per_image(samples.images, samples.prompts)
        return MetricResult({"clip_score": float(scores.mean())}, {"clip_scores": [round(float(s), 3) for s in scores]})


def heldout_captions(data: Any, num: int) -> list[str]:
    """The first ``num`` captions of ``data``, in order (a data set that can describe a sample is not drawn)."""
    n = min(num, len(data))
    if hasattr(data, "describe"):
        return [data.describe(i)[1] for i in range(n)]
    return [data[i]["caption"] for i in range(n)]


def default_metrics(heldout: Any) -> list[dict]:
    """The metrics of a run that names none: the shapes detector's for shapes data, the denoising loss otherwise."""
    if _is_shapes(heldout):
        return [{"name": "caption_accuracy"}, {"name": "attention_miou"}]
    return [{"name": "denoising_loss"}]


@dataclass
class Evaluation:
    """The outcome of one evaluation: its samples, the scores of every metric, and what eval.json keeps."""

    samples: Samples
    scores: dict[str, float]
    details: dict[str, Any]
    correct: list[bool] | None

    def report(self) -> dict[str, Any]:
        """What ``eval.json`` holds: the scores, each metric's details and the prompts."""
        return {
            "num_prompts": len(self.samples.prompts),
            **self.scores,
            **self.details,
            "prompts": self.samples.prompts,
        }


class Evaluator:
    """Scores a text-to-image pipeline on held-out data with a list of metrics (see :data:`METRICS`).

    Args:
        pipeline: the run's :class:`~mmx.diffusion.TextToImage`.
        cfg: the run's config (``eval`` and ``diffusion`` settings).
        heldout: the held-out data set (captions, and images for the metrics that read them).
        metrics: metric specs (``{"name": ..., **arguments}``); None: :func:`default_metrics`.
        max_downsample: the layers attention metrics read (None: every layer).
    """

    def __init__(
        self,
        pipeline: Any,
        cfg: Any,
        heldout: Any,
        metrics: Sequence[dict] | None = None,
        max_downsample: int | None = None,
    ) -> None:
        self.pipeline, self.cfg, self.heldout = pipeline, cfg, heldout
        self.max_downsample = max_downsample
        specs = default_metrics(heldout) if metrics is None else list(metrics)
        self.metrics = [(spec.get("name"), METRICS.build_from_dict(dict(spec))) for spec in specs]
        if len(heldout) == 0:
            raise ValueError("the held-out data set is empty: nothing to evaluate on")
        self._real: tuple[torch.Tensor, list[str]] | None = None
        self.unet: nn.Module = pipeline.unet

    def real_images(self, num: int) -> tuple[torch.Tensor, list[str]]:
        """The first ``num`` held-out images ``[n, C, H, W]`` and captions; read once, with augmentations seeded."""
        n = min(num, len(self.heldout))
        if self._real is None or len(self._real[1]) < n:
            with torch.random.fork_rng(devices=[]):  # random crops and flips: the same draw every time
                torch.manual_seed(self.cfg.eval.seed)
                items = [self.heldout[i] for i in range(n)]
            self._real = torch.stack([item["image"] for item in items]), [item["caption"] for item in items]
        images, captions = self._real
        return images[:n], captions[:n]

    def generate(self, prompts: list[str], steps: int | None = None, record: bool = False) -> Samples:
        """One image per prompt (batched, noise from ``eval.seed``); with ``record``, each prompt's word maps."""
        from mmx.attnmap import attend_generate, word_maps

        d, ev = self.cfg.diffusion, self.cfg.eval
        generator = torch.Generator(device=next(self.unet.parameters()).device).manual_seed(ev.seed)
        if record and self.unet is not self.pipeline.unet:
            raise ValueError("attention maps are recorded on the pipeline's own UNet; score it (unet=None)")
        images, maps = [], []
        for start in range(0, len(prompts), ev.batch_size):
            batch = prompts[start : start + ev.batch_size]
            if record:
                out, ctx, recorder = attend_generate(
                    self.pipeline,
                    batch,
                    steps or d.sample_steps,
                    d.guidance_scale,
                    d.sampler,
                    generator,
                    max_downsample=self.max_downsample,
                )
                maps += word_maps(recorder.maps(), ctx.words, image_size=tuple(out.shape[-2:]))
            else:
                out = self.pipeline.generate(
                    batch, steps or d.sample_steps, d.guidance_scale, d.sampler, generator, unet=self.unet
                )
            images.append(out.float().cpu())
        return Samples(prompts, torch.cat(images), maps if record else None)

    def __call__(
        self, num_prompts: int, steps: int | None = None, unet: nn.Module | None = None, validation: bool = False
    ) -> Evaluation:
        """Generate images for the first ``num_prompts`` held-out captions and run every metric on them.

        ``unet``: the weights to score (the trainer's EMA-weighted model; default the pipeline's).
        ``validation``: only the metrics that run at validation (attention mIoU waits for ``mmx eval``).
        """
        metrics = [(name, m) for name, m in self.metrics if m.validates or not validation]
        self.unet = self.pipeline.unet if unet is None else unet
        try:
            record = any(m.needs_maps for _, m in metrics)
            samples = self.generate(heldout_captions(self.heldout, num_prompts), steps, record)
            scores: dict[str, float] = {}
            details: dict[str, Any] = {}
            correct = None
            for _, metric in metrics:
                result = metric(self, samples)
                scores.update(result.scores)
                details.update(result.details)
                correct = result.correct if result.correct is not None else correct
            return Evaluation(samples, scores, details, correct)
        finally:
            self.unet = self.pipeline.unet
