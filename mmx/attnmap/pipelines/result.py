"""What ``trace(pipe)`` yields: running per-token attention sums of a pipeline call, read by word or token.

In the spirit of DAAM's global and word heat maps (Tang et al. 2023): the maps are summed over
heads, layers and denoising steps on the latent grid; a word's map averages its tokens (of every
text segment: CLIP and T5 in SD3). Start, end and padding tokens are in :meth:`token_maps` and
:meth:`special_tokens`, never in the word list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmx.attnmap.pipelines.words import PromptTokens, Segment, prompt_tokens
from mmx.attnmap.words import WordMap, normalize_map
from mmx.context import WordSpan

__all__ = ["TraceResult"]


class TraceResult:
    """Per-token attention of the conditional images of one pipeline call (the last inside ``trace``)."""

    def __init__(self, family: str, pipe: Any, prompts: list[str] | None, window: int | None) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive number of steps; got {window}")
        self.family, self.pipe, self.window = family, pipe, window
        self._given_prompts = list(prompts) if prompts is not None else None
        self.prompts: list[str] | None = self._given_prompts
        self.texts: dict[str, list[str] | None] = {}  # the texts of the second and third prompts, when given
        self.images_per_prompt = 1
        self.batch = 0
        self.steps = 0
        self.layers = 0
        self.calls = 0
        self.text_tokens = 0
        self.total: torch.Tensor | None = None  # (B, S, h, w) float32
        self.window_totals: dict[int, torch.Tensor] = {}
        self.images: Any = None  # what the pipeline's image processor returned (PIL, numpy or torch)
        self._tokens: list[PromptTokens] | None = None

    # -- filled by the tracer --------------------------------------------------------------------
    def begin(self, arguments: dict[str, Any], batch: int) -> None:
        """A pipeline call starts: its ``encode_prompt`` arguments and the number of conditional images."""

        def as_list(value: Any) -> list[str] | None:
            return [value] if isinstance(value, str) else None if value is None else list(value)

        prompts = as_list(arguments.get("prompt"))
        self.prompts = prompts if prompts is not None else self._given_prompts
        self.texts = {key: as_list(arguments.get(key)) for key in ("prompt_2", "prompt_3")}
        self.images_per_prompt = int(arguments.get("num_images_per_prompt") or 1)
        self.batch, self.steps, self.calls = batch, 0, 0
        self.total, self.images, self._tokens = None, None, None
        self.window_totals.clear()

    def add(self, layer: str, maps: torch.Tensor) -> None:
        """Add one layer-step's ``[B, S, h, w]`` maps (summed over heads) into the running sums."""
        maps = maps.float()
        self.total = maps.clone() if self.total is None else self.total.add_(maps)
        if self.window:
            key = self.steps // self.window
            held = self.window_totals.get(key)
            self.window_totals[key] = maps.clone() if held is None else held.add_(maps)
        self.calls += 1

    # -- reading ---------------------------------------------------------------------------------
    def _check(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("nothing was traced: call the pipeline inside `with trace(pipe) as maps:`")
        return self.total

    def _row(self, prompt: int, image: int) -> int:
        n_prompts = self.batch // self.images_per_prompt
        if not 0 <= prompt < n_prompts or not 0 <= image < self.images_per_prompt:
            raise IndexError(
                f"prompt {prompt}, image {image} is outside the call's {n_prompts} prompt(s) x "
                f"{self.images_per_prompt} image(s) per prompt"
            )
        return prompt * self.images_per_prompt + image  # diffusers repeats each prompt's rows in place

    def segments(self) -> list[Segment]:
        """The runs of the text tokens each tokenizer made (e.g. SD3: ``clip [0, 77)``, ``t5 [77, 333)``)."""
        pipe, n = self.pipe, self.text_tokens
        if self.family in ("sd", "sdxl"):
            return [Segment("clip", 0, n)]
        if self.family == "sd3":
            clip = int(getattr(pipe, "tokenizer_max_length", 77))
            return [Segment("clip", 0, clip), Segment("t5", clip, n)]
        return [Segment("t5", 0, n)]

    def tokens(self) -> list[PromptTokens]:
        """Per prompt: its words and their token positions, the special tokens, what truncation cut."""
        self._check()
        if self._tokens is None:
            if self.prompts is None:
                raise ValueError(
                    "this call passed prompt_embeds and no prompt, so there are no words to name; "
                    "give trace(pipe, prompts=[...]) the prompts behind the embeddings"
                )
            tokenizer = {
                "clip": self.pipe.tokenizer,
                "t5": self.pipe.tokenizer_3 if self.family == "sd3" else getattr(self.pipe, "tokenizer_2", None),
            }
            second = {"sd3": self.texts.get("prompt_3"), "flux": self.texts.get("prompt_2")}.get(self.family)
            segments = [
                (s.label, tokenizer[s.label], s.end - s.start, second if s.label == "t5" else None)
                for s in self.segments()
                if tokenizer[s.label] is not None
            ]
            self._tokens = prompt_tokens(self.prompts, segments)
        return self._tokens

    def words(self, prompt: int = 0) -> list[str]:
        """The whitespace words of prompt ``prompt``."""
        return [w.word for w in self.tokens()[prompt].words]

    def special_tokens(self, prompt: int = 0) -> dict[str, list[int]]:
        """Token positions of the start, end and padding tokens of prompt ``prompt``."""
        return self.tokens()[prompt].special

    def token_maps(self, prompt: int = 0, image: int = 0) -> torch.Tensor:
        """``[S, h, w]``: every text token's summed attention over image ``image`` of prompt ``prompt``."""
        return self._check()[self._row(prompt, image)]

    def word_map(
        self,
        word: str | int,
        prompt: int = 0,
        image: int = 0,
        size: tuple[int, int] | None = None,
        normalize: str = "minmax",
    ) -> torch.Tensor:
        """``[h, w]`` (or ``size``): the mean of the word's tokens' maps; ``word`` is the word or its position.

        A word that occurs several times averages every occurrence; name one by its position.
        """
        entries = self.tokens()[prompt].words
        chosen = [w for w in entries if (w.word == word if isinstance(word, str) else w.index == word)]
        if not chosen:
            raise KeyError(
                f"{word!r} is not a word of prompt {prompt} ({self.prompts[prompt]!r}); its words: "
                f"{[w.word for w in entries]}"
            )
        positions = [t for w in chosen for t in w.tokens]
        if not positions:
            raise ValueError(f"{word!r} has no tokens left: truncation cut it ({self.tokens()[prompt].truncated})")
        heat = self.token_maps(prompt, image)[positions].mean(0)
        if size is not None:
            heat = F.interpolate(heat[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
        return normalize_map(heat, normalize)

    # -- pictures --------------------------------------------------------------------------------
    def image(self, prompt: int = 0, image: int = 0) -> torch.Tensor | None:
        """The generated image as ``[3, H, W]`` in [-1, 1], when the call decoded one (None for latents)."""
        out = self.images
        if out is None:
            return None
        item = out[self._row(prompt, image)]
        if isinstance(item, torch.Tensor):  # "pt": [3, H, W] in [0, 1]
            return item.float().cpu() * 2 - 1
        pixels = np.asarray(item, dtype=np.float32)
        if pixels.max() > 1.0:  # PIL: uint8
            pixels = pixels / 255.0
        return torch.from_numpy(pixels).permute(2, 0, 1) * 2 - 1

    def word_maps(self, prompt: int = 0, image: int = 0, size: tuple[int, int] | None = None) -> list[WordMap]:
        """A :class:`~mmx.attnmap.WordMap` per word with tokens, for the plotting functions."""
        out = []
        for w in self.tokens()[prompt].words:
            if w.tokens:
                span = WordSpan(w.word, min(w.tokens), max(w.tokens) + 1)
                out.append(WordMap(w.word, w.index, span, self.word_map(w.index, prompt, image, size)))
        return out

    def overlay(self, word: str | int, path: str | Path, prompt: int = 0, image: int = 0) -> Path:
        """A PNG of the word's map over the generated image (the call must have decoded images)."""
        from mmx.attnmap.plot import save_overlay

        picture = self._picture(prompt, image)
        chosen = next(
            m
            for m in self.word_maps(prompt, image, tuple(picture.shape[-2:]))
            if (m.word == word if isinstance(word, str) else m.index == word)
        )
        return save_overlay(picture, chosen, path)

    def _picture(self, prompt: int, image: int) -> torch.Tensor:
        picture = self.image(prompt, image)
        if picture is None:
            raise ValueError("the call returned latents (output_type='latent'): there is no image to draw on")
        return picture

    def summary(self) -> dict[str, Any]:
        """What words.json holds: the call, the segments, and per prompt its words with their tokens and peaks."""
        total = self._check()
        n_prompts = self.batch // self.images_per_prompt
        prompts = []
        for p, item in enumerate(self.tokens()):
            words = []
            for w in item.words:
                peaks = []
                for i in range(self.images_per_prompt):
                    if w.tokens:
                        heat = self.word_map(w.index, p, i, normalize="none")
                        peaks.append([int(v) for v in divmod(int(heat.argmax()), heat.shape[-1])])
                words.append(
                    {
                        "word": w.word,
                        "index": w.index,
                        "tokens": w.tokens,
                        "segments": w.segments,
                        "peak_per_image": peaks,
                    }
                )
            prompts.append(
                {"prompt": item.prompt, "words": words, "special_tokens": item.special, "truncated": item.truncated}
            )
        return {
            "family": self.family,
            "prompts": n_prompts,
            "images_per_prompt": self.images_per_prompt,
            "steps": self.steps,
            "layers": self.layers,
            "layer_steps_recorded": self.calls,
            "grid": list(total.shape[-2:]),
            "text_tokens": self.text_tokens,
            "segments": [vars(s) for s in self.segments()],
            "per_prompt": prompts,
        }

    def save(self, folder: str | Path, word: str | None = None, gif: bool = True) -> list[Path]:
        """Write words.json, a grid of every word's overlay per image, one overlay per word (or only ``word``)
        and, with step windows, a GIF per word; returns the paths written."""
        from mmx.attnmap.plot import file_label, save_overlay, save_steps_gif, save_word_grid

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        summary = self.summary()
        for p in range(summary["prompts"]):
            for i in range(self.images_per_prompt):
                picture = self.image(p, i)
                tag = f"p{p}_i{i}"
                if picture is None:
                    continue
                size = tuple(picture.shape[-2:])
                maps = self.word_maps(p, i, size)
                written.append(save_word_grid(picture, maps, self.prompts[p], folder / f"grid_{tag}.png"))
                for m in maps:
                    if word is not None and m.word != word:
                        continue
                    name = f"{tag}_word_{m.index:02d}_{file_label(m.word)}"
                    written.append(save_overlay(picture, m, folder / f"{name}.png"))
                    if gif and self.window_totals:
                        frames = self._window_frames(m, p, i, size)
                        labels = [
                            f"steps {k * self.window}-{(k + 1) * self.window - 1}" for k in sorted(self.window_totals)
                        ]
                        written.append(save_steps_gif(picture, frames, m.word, folder / f"{name}.gif", labels=labels))
        path = folder / "words.json"
        path.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        return [*written, path]

    def _window_frames(self, m: WordMap, prompt: int, image: int, size: tuple[int, int]) -> list[torch.Tensor]:
        positions = next(w.tokens for w in self.tokens()[prompt].words if w.index == m.index)
        row = self._row(prompt, image)
        frames = []
        for key in sorted(self.window_totals):
            heat = self.window_totals[key][row, positions].mean(0)
            heat = F.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            frames.append(normalize_map(heat))
        return frames
