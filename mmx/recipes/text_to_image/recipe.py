"""The text-to-image recipe as a unit: load a run, score it, map its attention, sample from it, the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmx.recipes.base import Recipe, RecipeError, Result, Run, check_steps, file_label, format_score
from mmx.recipes.text_to_image.config import TextToImageConfig
from mmx.recipes.text_to_image.task import TextToImageTask

__all__ = ["TextToImageRecipe", "RECIPE"]


def _max_downsample(cfg: TextToImageConfig, option: int | None) -> int | None:
    """The --max-downsample option (0: every layer) or, when not given, the recipe's choice."""
    if option is None:
        return cfg.eval.attention_max_downsample
    return option or None


def _layers_read(max_downsample: int | None) -> str:
    if max_downsample is None:
        return "every cross-attention layer"
    return f"layers with maps at most {max_downsample}x coarser than the image"


def by_pair(report: dict) -> str:
    """``"red triangle 6/6, ..."``: captions right per held-out pair of a shapes split (n/a for other data)."""
    pairs = report.get("accuracy_by_pair") or {}
    return ", ".join(f"{name} {right}/{total}" for name, (right, total) in pairs.items() if total) or "n/a"


def metric_lines(r: dict) -> list[str]:
    """One line per metric an evaluation report holds, in the words a user reads."""
    lines = []
    if "caption_accuracy" in r:
        lines += [
            f"held-out caption accuracy: {r['caption_accuracy']:.1%} ({r['num_prompts']} prompts)",
            f"captions right, by the held-out pair they name: {by_pair(r)}",
        ]
    if "attention_miou_generated" in r:
        lines.append(
            f"attention mIoU (object words, threshold 0.4, {_layers_read(r['attention_max_downsample'])}): "
            f"generated images {format_score(r['attention_miou_generated'])}, real renders noised "
            f"{format_score(r['attention_miou_real'])}"
        )
    if "denoising_loss" in r:
        lines.append(
            f"held-out denoising loss: {r['denoising_loss']:.4f} ({r['denoising_loss_images']} images, "
            f"{len(r['denoising_loss_by_timestep'])} fixed timesteps, fixed noise)"
        )
    if "fid" in r:
        lines.append(f"FID: {r['fid']:.2f} ({r['fid_images']} generated against as many held-out images)")
    if "clip_score" in r:
        lines.append(f"CLIP score: {r['clip_score']:.2f} ({r['num_prompts']} generated images against their captions)")
    return lines


class TextToImageRecipe(Recipe):
    """Captions -> images: a UNet reads a frozen text encoder's tokens through cross-attention."""

    name = "text_to_image"
    config_class = TextToImageConfig
    task_class = TextToImageTask
    model_folder = "model/unet"

    def load(self, path: Path, overrides: list[str] | None = None, device: str = "cpu") -> Run:
        """The run's config and its TextToImage with the EMA weights (eval mode)."""
        from mmx.config import load_config
        from mmx.models import MODELS
        from mmx.recipes.text_to_image.pipeline import build_pipeline

        path = Path(path)
        cfg = load_config(path / "config.yaml", TextToImageConfig, overrides)
        cls = MODELS.get(cfg.model.get("name", "unet2d"))
        if not hasattr(cls, "from_pretrained"):
            raise RecipeError(f"model {cfg.model.get('name')!r} cannot be loaded from {path / self.model_folder}")
        unet = cls.from_pretrained(path / self.model_folder)
        return Run(path, self, cfg, build_pipeline(cfg, unet=unet).to(device).eval())

    def evaluation(self, run: Run, num: int | None = None, steps: int | None = None, max_downsample: int | None = None):
        """The :class:`~mmx.recipes.text_to_image.metrics.Evaluation` of ``num`` held-out prompts."""
        from mmx.recipes.text_to_image.pipeline import build_evaluator

        cfg, pipeline = run.config, run.model
        check_steps(steps, pipeline.scheduler)
        evaluator = build_evaluator(pipeline, cfg, num, _max_downsample(cfg, max_downsample))
        return evaluator(num or cfg.eval.num_prompts, steps)

    def _result(self, run: Run, evaluation: Any, title: str, lines: list[str]) -> Result:
        from mmx.train.visual import save_grid

        k = run.config.eval.grid_prompts
        samples, correct = evaluation.samples, evaluation.correct

        def grid(path: Path) -> None:
            save_grid(
                samples.images[:k], samples.prompts[:k], path, None if correct is None else correct[:k], title=title
            )

        return Result(lines, evaluation.report(), "eval.json", {"heldout_grid.png": grid})

    def evaluate(
        self, run: Run, num: int | None = None, steps: int | None = None, max_downsample: int | None = None
    ) -> Result:
        """Held-out prompts scored by the run's metrics (``eval.metrics``, or what fits its data); grid, eval.json."""
        evaluation = self.evaluation(run, num, steps, max_downsample)
        return self._result(run, evaluation, f"{run.name}: held-out captions", metric_lines(evaluation.report()))

    def sample(
        self,
        run: Run,
        prompts: list[str] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        scheduler: str | None = None,
    ) -> Result:
        """One image per prompt: a PNG each and a grid."""
        from PIL import Image

        from mmx.train.visual import save_grid, to_uint8

        if not prompts:
            raise RecipeError("give at least one caption with --prompt")
        cfg, pipeline = run.config, run.model
        d = cfg.diffusion
        check_steps(steps, pipeline.scheduler)
        try:
            images = pipeline.generate(
                list(prompts),
                steps or d.sample_steps,
                d.guidance_scale if guidance is None else guidance,
                scheduler or d.sampler,
                torch.Generator().manual_seed(seed),
            )
        except KeyError as err:  # an unknown scheduler name lists the valid ones
            raise RecipeError(str(err)) from None
        pictures = {
            f"{i:03d}.png": (lambda path, pixels=pixels: Image.fromarray(pixels.numpy()).save(path))
            for i, pixels in enumerate(to_uint8(images))
        }
        pictures["grid.png"] = lambda path: save_grid(images, list(prompts), path, title=f"{run.name}: seed {seed}")
        return Result([f"wrote {len(prompts)} images and grid.png"], pictures=pictures)

    def attend(
        self,
        run: Run,
        prompt: str | None = None,
        image: Path | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        gif: bool = False,
        max_downsample: int | None = None,
    ) -> Result:
        """Each word's map over a generated image (or a real one, noised): overlays, a grid, words.json."""
        from mmx.attnmap import attend_generate, attend_real, save_overlay, save_steps_gif, save_word_grid, word_maps
        from mmx.data.imagefolder import image_tensor
        from mmx.eval import detect_objects, detection_masks, word_ious

        if prompt is None:
            raise RecipeError("give the caption to map with --prompt")
        cfg, pipeline = run.config, run.model
        d = cfg.diffusion
        check_steps(steps, pipeline.scheduler)
        _, height, width = cfg.image_size
        generator = torch.Generator().manual_seed(seed)
        n_steps = steps or d.sample_steps
        window = max(1, n_steps // 8) if gif else None
        layers = _max_downsample(cfg, max_downsample)
        if image is not None:
            images = image_tensor(image, (height, width))[None]
            ctx, recorder = attend_real(pipeline, images, [prompt], generator=generator, max_downsample=layers)
        else:
            scale = d.guidance_scale if guidance is None else guidance
            images, ctx, recorder = attend_generate(
                pipeline, [prompt], n_steps, scale, d.sampler, generator, window=window, max_downsample=layers
            )
        maps = word_maps(recorder.maps(), ctx.words, image_size=(height, width))[0]
        try:
            scores = word_ious(maps, detection_masks(prompt, detect_objects(images[0])))
        except ValueError:  # a caption outside the shapes grammar: no detector scores
            scores = {}
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        stats, pictures = [], {}
        for m in maps:
            name = f"word_{m.index:02d}_{file_label(m.word)}"
            pictures[f"{name}.png"] = lambda path, m=m: save_overlay(images[0], m, path)
            weight = m.map / m.map.sum().clamp_min(1e-12)
            stats.append(
                {
                    "word": m.word,
                    "index": m.index,
                    "tokens": [m.span.start, m.span.end],
                    "peak": [int(v) for v in divmod(int(m.map.argmax()), width)],
                    "centroid_xy": [
                        round(float((weight * xs).sum()) / width, 3),
                        round(float((weight * ys).sum()) / height, 3),
                    ],
                    "area_above_0.4": round(float((m.map >= 0.4).float().mean()), 3),
                    "iou": None if m.index not in scores else round(scores[m.index], 3),
                }
            )
            if gif and recorder.window_totals:
                keys = sorted(recorder.window_totals)
                frames = [word_maps(recorder.window_totals[k], ctx.words, image_size=(height, width))[0] for k in keys]
                frame_maps = [next(f.map for f in frame if f.index == m.index) for frame in frames]
                labels = [f"steps {k * window}-{(k + 1) * window - 1}" for k in keys]
                pictures[f"{name}.gif"] = lambda path, m=m, frame_maps=frame_maps, labels=labels: save_steps_gif(
                    images[0], frame_maps, m.word, path, labels=labels
                )
        pictures["grid.png"] = lambda path: save_word_grid(images[0], maps, prompt, path, scores=scores)
        lines = []
        if scores:
            names = {m.index: m.word for m in maps}
            lines.append("object words' attention IoU: " + ", ".join(f"{names[i]} {v:.2f}" for i, v in scores.items()))
        lines.append(f"wrote {len(maps)} word overlays, grid.png and words.json")
        report = {"prompt": prompt, "image": str(image) if image else None, "words": stats}
        return Result(lines, report, "words.json", pictures)

    def demo(self, run: Run, num: int = 32, steps: int | None = None) -> Result:
        """Captions the model never saw: caption accuracy, attention mIoU, the grid and four attention figures."""
        from mmx.attnmap import save_word_grid

        evaluation = self.evaluation(run, num, steps)
        r = evaluation.report()
        if "caption_accuracy" not in r:
            raise RecipeError(f"the demo scores shapes captions; {run.path} was trained on other data (use mmx eval)")
        samples = evaluation.samples
        lines = [
            f"[bold]held-out caption accuracy: {r['caption_accuracy']:.1%}[/bold] on {num} captions with "
            f"colour-shape and shape-position pairs never seen in training; attention mIoU of object words "
            f"{format_score(r['attention_miou_generated'])}",
            f"captions right, by the held-out pair they name: {by_pair(r)}",
        ]
        result = self._result(run, evaluation, "captions never seen in training (green: detector agrees)", lines)
        for i in range(min(4, len(samples.prompts))):
            result.pictures[f"attention_{i}.png"] = lambda path, i=i: save_word_grid(
                samples.images[i], samples.maps[i], samples.prompts[i], path
            )
        return result


RECIPE = TextToImageRecipe()
