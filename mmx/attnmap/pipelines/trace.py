"""``trace(pipe)``: text-to-region attention maps of the diffusers pipelines people run, with fused attention kept.

Supported: ``StableDiffusionPipeline`` (1.x, 2.x), ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline`` and ``FluxPipeline`` (diffusers 0.35 and later; tested on 0.42), recognised
by their denoiser and text encoders. Each attention layer that reads text keeps its own
processor; mmx wraps it so that the attention kernel it calls (SDPA, or diffusers' dispatcher for
Flux) reports the queries and keys it is given, after QK-norm and RoPE, and then runs unchanged:
the images are bit-identical to an untraced call. From those queries and keys the image -> text
probabilities are computed beside the kernel (:func:`~mmx.attnmap.pipelines.joint.image_text_probs`),
summed over heads and added into one running sum per text token.

Everything about the call is read from the call itself: the prompts and images per prompt (from
``encode_prompt``), which denoiser batch rows are conditional (the rows of the positive prompt
embeddings: the second half of a classifier-free-guidance batch, all of an unguided or
guidance-distilled one, none of Flux's separate negative pass), the latent grid (from the
denoiser's input, non-square included) and the number of text tokens. The caller's own step
callback is not touched: steps are counted at the scheduler.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmx.attnmap.grid import query_grid
from mmx.attnmap.pipelines.joint import image_text_probs
from mmx.attnmap.pipelines.result import TraceResult

__all__ = ["FAMILIES", "Family", "detect_family", "trace"]


@dataclass(frozen=True)
class Family:
    """How one pipeline family lays out its text tokens and its attention."""

    name: str
    denoiser: str  # the pipeline attribute holding it
    layout: str  # "cross": every key is text; "image_first" / "text_first": joint sequences


FAMILIES = {
    "sd": Family("sd", "unet", "cross"),
    "sdxl": Family("sdxl", "unet", "cross"),
    "sd3": Family("sd3", "transformer", "image_first"),
    "flux": Family("flux", "transformer", "text_first"),
}
# processor class -> the name its module calls the attention kernel by
SUPPORTED_PROCESSORS = {
    "AttnProcessor2_0": "F",
    "FusedAttnProcessor2_0": "F",
    "JointAttnProcessor2_0": "F",
    "FusedJointAttnProcessor2_0": "F",
    "FluxAttnProcessor": "dispatch_attention_fn",
}


def detect_family(pipe: Any) -> Family:
    """The family of a pipeline, from its denoiser's class and its text encoders; an error names what it is."""
    unet, transformer = getattr(pipe, "unet", None), getattr(pipe, "transformer", None)
    kind = type(unet if unet is not None else transformer).__name__
    if kind == "UNet2DConditionModel":
        if getattr(pipe, "text_encoder_2", None) is not None and unet.config.get("addition_embed_type") == "text_time":
            return FAMILIES["sdxl"]
        if getattr(pipe, "text_encoder", None) is not None:
            return FAMILIES["sd"]
    if kind == "SD3Transformer2DModel":
        return FAMILIES["sd3"]
    if kind == "FluxTransformer2DModel" and hasattr(pipe, "text_encoder_2"):
        return FAMILIES["flux"]
    raise ValueError(
        f"trace() supports Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux pipelines; got "
        f"{type(pipe).__name__} with a {kind} denoiser"
    )


@dataclass
class _Call:
    """What the denoiser call in progress looks like."""

    rows: slice  # the conditional batch rows
    grid: tuple[int, int]  # (h, w) of the image queries (the UNet's latent grid)
    text: int  # text tokens


class _Tracer:
    """Attaches to a pipeline and fills a :class:`TraceResult`; :func:`trace` is its public face."""

    def __init__(self, pipe: Any, family: Family, result: TraceResult, chunk: int | None) -> None:
        self.pipe, self.family, self.result, self.chunk = pipe, family, result, chunk
        self.denoiser = getattr(pipe, family.denoiser)
        self.current: _Call | None = None
        self.positive: torch.Tensor | None = None
        self.fresh_call = False  # True from the start of a pipeline call to its first encode_prompt
        self._undo: list[Callable[[], None]] = []
        self._signature = inspect.signature(self.denoiser.forward)

    # -- attaching -------------------------------------------------------------------------------
    def attach(self) -> None:
        wrapped = 0
        for name, module in self.denoiser.named_modules():
            processor = getattr(module, "processor", None)
            if processor is None or not self._reads_text(module):
                continue
            kernel = SUPPORTED_PROCESSORS.get(type(processor).__name__)
            if kernel is None or not hasattr(sys.modules[type(processor).__module__], kernel):
                raise ValueError(
                    f"attention processor {type(processor).__name__} of layer {name} is not supported by "
                    f"trace(); supported: {', '.join(SUPPORTED_PROCESSORS)} (call "
                    f"{self.family.denoiser}.set_default_attn_processor() for the default one)"
                )
            module.set_processor(_wrap(processor, self, name, kernel))
            self._undo.append(lambda m=module, p=processor: m.set_processor(p))
            wrapped += 1
        if not wrapped:
            raise ValueError(f"no attention layer of {type(self.denoiser).__name__} reads the text")
        self.result.layers = wrapped
        hooks = (
            self.denoiser.register_forward_pre_hook(self._before, with_kwargs=True),
            self.denoiser.register_forward_hook(self._after),
        )
        self._undo += [hook.remove for hook in hooks]
        self._wrap_call()
        self._replace(self.pipe, "encode_prompt", self._encode_prompt)
        self._replace(self.pipe.scheduler, "step", self._step)
        processor = getattr(self.pipe, "image_processor", None)
        if processor is not None:
            self._replace(processor, "postprocess", self._postprocess)

    def _reads_text(self, module: Any) -> bool:
        if self.family.layout == "cross":
            return bool(getattr(module, "is_cross_attention", False))
        # joint attention: SD3's and Flux's double-stream blocks take the text as added projections;
        # Flux's single-stream blocks get the joined sequence (pre_only, no added projections)
        return hasattr(module, "add_q_proj") or type(module).__name__ == "FluxAttention"

    def _replace(self, owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        """Shadow ``owner.name`` by an instance attribute; undone by restoring what the instance held."""
        own = vars(owner)
        had, before = name in own, own.get(name)
        setattr(owner, name, make(getattr(owner, name)))

        def undo() -> None:
            if had:
                setattr(owner, name, before)
            else:
                delattr(owner, name)

        self._undo.append(undo)

    def _wrap_call(self) -> None:
        """Mark where each pipeline call begins (``pipe(...)`` looks ``__call__`` up on the class)."""
        cls = type(self.pipe)
        tracer = self

        def __call__(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            tracer.fresh_call, tracer.positive = True, None
            return cls.__call__(pipe, *args, **kwargs)

        self.pipe.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
        self._undo.append(lambda: setattr(self.pipe, "__class__", cls))

    def detach(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    # -- the pipeline call -----------------------------------------------------------------------
    def _encode_prompt(self, original: Callable) -> Callable:
        signature = inspect.signature(original)

        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if self.fresh_call:  # the first encode_prompt of a pipeline call encodes the positive prompt
                bound = signature.bind_partial(*args, **kwargs).arguments
                self.positive = out[0]
                self.result.begin(bound, self.positive.shape[0])
                self.fresh_call = False
            return out

        return encode_prompt

    def _step(self, original: Callable) -> Callable:
        def step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.result.steps += 1
            return out

        return step

    def _postprocess(self, original: Callable) -> Callable:
        def postprocess(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.result.images = out
            return out

        return postprocess

    def _before(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.current = None
        if self.positive is None:
            return
        inputs = self._signature.bind_partial(*args, **kwargs).arguments
        text = inputs.get("encoder_hidden_states")
        if text is None or inputs.get("skip_layers") is not None:  # SD3's skip-layer guidance pass
            return
        b = self.positive.shape[0]
        if text is self.positive or (text.shape[0] == b and text.data_ptr() == self.positive.data_ptr()):
            rows = slice(0, b)
        elif text.shape[0] == 2 * b:
            rows = slice(b, 2 * b)  # diffusers' guidance batches are torch.cat([negative, positive])
        else:
            return  # a negative-prompt pass (Flux's true CFG) reads no positive prompt
        self.current = _Call(rows, self._grid(inputs), text.shape[1])
        self.result.text_tokens = text.shape[1]

    def _after(self, module: Any, args: tuple, output: Any) -> None:
        self.current = None

    def _grid(self, inputs: dict) -> tuple[int, int]:
        x = inputs.get("sample", inputs.get("hidden_states"))
        if self.family.name == "flux":
            ids = inputs["img_ids"]  # [L, 3]: (0, row, column) of each packed latent
            return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        h, w = x.shape[-2:]
        if self.family.name == "sd3":
            p = self.denoiser.config.patch_size
            return h // p, w // p
        return h, w

    # -- recording -------------------------------------------------------------------------------
    def record(self, name: str, q: torch.Tensor, k: torch.Tensor, mask: Any, scale: float | None) -> None:
        """One kernel call: ``q [B, H, L, D]``, ``k [B, H, S, D]`` as the kernel received them."""
        call = self.current
        if call is None:
            return
        rows = call.rows
        q, k = q[rows], k[rows]
        if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[0] > 1:
            mask = mask[rows]
        elif not isinstance(mask, torch.Tensor):
            mask = None
        length, text = q.shape[2], call.text
        if self.family.layout == "cross":
            img, txt = slice(None), slice(None)
            grid = query_grid(call.grid, length)
        else:
            grid = call.grid
            if length != grid[0] * grid[1] + text:  # a block without the text (e.g. SD3.5's image-only attention)
                return
            n_img = length - text
            img, txt = (
                (slice(0, n_img), slice(n_img, length))
                if self.family.layout == "image_first"
                else (slice(text, length), slice(0, text))
            )
        probs = image_text_probs(q, k, img, txt, scale, mask, self.chunk)  # (B, L_img, S), summed over heads
        b, _, s = probs.shape
        maps = probs.transpose(1, 2).reshape(b, s, *grid)  # (B, S, h, w)
        if grid != call.grid:
            maps = F.interpolate(maps, size=call.grid, mode="bilinear", align_corners=False)
        self.result.add(name, maps)


class _FunctionalProxy:
    """``torch.nn.functional`` for one module, whose ``scaled_dot_product_attention`` reports before it runs."""

    def __init__(self, report: Callable[[tuple, dict], None]) -> None:
        self._report = report

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)

    def scaled_dot_product_attention(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._report(args, kwargs)
        return F.scaled_dot_product_attention(*args, **kwargs)


def _wrap(processor: Any, tracer: _Tracer, name: str, kernel: str) -> Any:
    """``processor`` behind a wrapper with its own call signature (diffusers filters kwargs by it)."""
    module = sys.modules[type(processor).__module__]
    blhd = kernel == "dispatch_attention_fn"  # diffusers' dispatcher takes [B, L, H, D]

    def report(args: tuple, kwargs: dict) -> None:
        q, k = args[0], args[1]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if blhd:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        tracer.record(name, q, k, mask, kwargs.get("scale"))

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if tracer.current is None:
            return processor(*args, **kwargs)
        original = getattr(module, kernel)
        if kernel == "F":
            replacement: Any = _FunctionalProxy(report)
        else:

            def replacement(*a: Any, **kw: Any) -> Any:
                report(a, kw)
                return original(*a, **kw)

        setattr(module, kernel, replacement)
        try:
            return processor(*args, **kwargs)
        finally:
            setattr(module, kernel, original)

    call.__signature__ = inspect.signature(type(processor).__call__)  # type: ignore[attr-defined]
    wrapper_cls = type(f"Traced{type(processor).__name__}", (), {"__call__": call, "original": processor})
    return wrapper_cls()


@contextlib.contextmanager
def trace(
    pipe: Any, prompts: list[str] | None = None, window: int | None = None, chunk: int | None = None
) -> Iterator[TraceResult]:
    """Record which region of each generated image looked at which word, during calls of ``pipe``.

    >>> with mmx.attnmap.trace(pipe) as maps:                       # doctest: +SKIP
    ...     image = pipe("a cat on a mat", num_images_per_prompt=2).images[0]
    >>> maps.word_map("cat", prompt=0, image=0)                     # [h, w] on the latent grid

    Args:
        pipe: a Stable Diffusion (1.x, 2.x), SDXL, SD3 or Flux pipeline of diffusers.
        prompts: the prompts behind ``prompt_embeds`` passed directly (then the call has no text to
            name words by); default: the call's own prompts.
        window: also keep sums per window of this many denoising steps (for a GIF over steps).
        chunk: image queries per chunk of the joint-attention computation (default: the largest
            that keeps its scores within the size of the result).

    The maps of the last pipeline call inside the ``with`` are kept. An unsupported pipeline or
    attention processor is a ValueError naming it.
    """
    family = detect_family(pipe)
    result = TraceResult(family.name, pipe, prompts, window)
    tracer = _Tracer(pipe, family, result, chunk)
    try:
        tracer.attach()
        yield result
    finally:
        tracer.detach()
