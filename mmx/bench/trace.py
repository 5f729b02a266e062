"""Tracing diffusers pipelines: time and extra peak memory against no tracing and against full attention maps.

Two pipelines with random weights at real shapes, built offline:

* ``sd15``: Stable Diffusion 1.5's UNet (860M parameters) at 512x512 (64x64 latents), guidance on,
  a small CLIP text encoder of SD's width; the figure is traced / untraced time of the denoising
  steps (``output_type="latent"``: no VAE).
* ``flux``: Flux's transformer blocks at 1024x1024 (4,096 image tokens, 512 text tokens, 24 heads
  of 128) with fewer layers (``--layers``, default one double-stream and one single-stream block);
  the figure is the extra peak memory of tracing against materialising every layer's full joint
  attention, as attention-map-diffusers does.

"Full maps" keeps, per traced layer and step, the whole softmax ``[B, H, L, S]`` of the conditional
rows in float32 (for joint attention ``S = L = L_img + L_txt``). Per layer-step that is
``H * L * S * 4`` bytes; tracing adds ``L_img * L_txt * 4`` bytes of running sums (and a chunk of
scores no larger), whatever the number of layers and steps.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import Any

import torch

from mmx.attnmap.pipelines import trace
from mmx.attnmap.pipelines.trace import FAMILIES, _Tracer
from mmx.bench.memory import PeakMemory
from mmx.bench.report import Figure, Log, SuiteResult, log_info
from mmx.bench.timing import _sync

__all__ = ["build", "full_maps", "measure", "suite"]


class _FullMaps(_Tracer):
    """The attention-map-diffusers way: keep every layer-step's whole probability matrix."""

    def record(self, name: str, q: torch.Tensor, k: torch.Tensor, mask: Any, scale: float | None) -> None:
        call = self.current
        if call is None:
            return
        q, k = q[call.rows].float(), k[call.rows].float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
        if isinstance(mask, torch.Tensor):
            mask = mask[call.rows] if mask.ndim == 4 and mask.shape[0] > 1 else mask
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        self.kept.append(scores.softmax(-1))  # (B, H, L, S)


class full_maps:  # noqa: N801 - a context manager named like trace()
    """``with full_maps(pipe) as kept:``: every traced layer-step's full softmax, in ``kept``."""

    def __init__(self, pipe: Any) -> None:
        from mmx.attnmap.pipelines.result import TraceResult
        from mmx.attnmap.pipelines.trace import detect_family

        family = detect_family(pipe)
        self.tracer = _FullMaps(pipe, family, TraceResult(family.name, pipe, None, None), None)
        self.tracer.kept = []

    def __enter__(self) -> list[torch.Tensor]:
        self.tracer.attach()
        return self.tracer.kept

    def __exit__(self, *exc: Any) -> None:
        self.tracer.detach()


def build(case: str, quick: bool = False, layers: tuple[int, int] = (1, 1)) -> tuple[Any, dict[str, Any]]:
    """A pipeline of ``case`` (``sd15`` or ``flux``) and the call that measures it (``quick``: tiny sizes)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from mmx.attnmap.pipelines.offline import clip_tokenizer, t5_tokenizer

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4 if case == "sd15" else 16,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    width = 768 if case == "sd15" and not quick else 32
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=1,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            max_position_embeddings=77,
            projection_dim=width,
        )
    ).eval()
    if case == "sd15":
        if quick:
            unet = diffusers.UNet2DConditionModel(
                block_out_channels=(32, 64),
                layers_per_block=1,
                cross_attention_dim=32,
                attention_head_dim=4,
                norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            )
        else:
            unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5's layout
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae,
            text_encoder=clip,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_sd_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        size = 64 if quick else 512
        call = dict(height=size, width=size, num_inference_steps=2, guidance_scale=7.5, output_type="latent")
    elif case == "flux":
        t5_tok = t5_tokenizer()
        heads, head_dim, text = (2, 16, 16) if quick else (24, 128, 512)
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=32 if quick else 4096,
                d_kv=8,
                d_ff=32,
                num_layers=1,
                num_heads=4,
                relative_attention_num_buckets=8,
            )
        ).eval()
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=layers[0],
            num_single_layers=layers[1],
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=32 if quick else 4096,
            pooled_projection_dim=width,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8) if quick else (16, 56, 56),
        )
        pipe = diffusers.FluxPipeline(
            transformer=transformer,
            vae=vae,
            text_encoder=clip,
            tokenizer=tokenizer,
            text_encoder_2=t5,
            tokenizer_2=t5_tok,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        )
        size = 64 if quick else 1024
        call = dict(height=size, width=size, num_inference_steps=1, max_sequence_length=text, output_type="latent")
    else:
        raise ValueError(f"unknown case {case!r}; valid: sd15, flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


def measure(
    case: str,
    device: torch.device,
    quick: bool = False,
    repeats: int = 2,
    log: Log = log_info,
    layers: tuple[int, int] = (1, 1),
) -> dict[str, Any]:
    """Time and extra peak memory of one call: untraced, traced, and with full maps kept."""
    pipe, call = build(case, quick, layers)
    pipe.to(device)
    prompt = "a photo of an astronaut riding a horse on the moon"

    def run(mode: str) -> tuple[float, float | None, torch.Tensor, Any]:
        gc.collect()
        context = {"plain": lambda _: contextlib.nullcontext(), "traced": trace, "full": full_maps}[mode](pipe)
        with PeakMemory(device) as peak, context as held:
            start = time.perf_counter()
            out = pipe(prompt, generator=torch.Generator().manual_seed(0), **call).images
            _sync(device)
            seconds = time.perf_counter() - start
        kept = held
        return seconds, peak.mib, out, kept

    run("plain")  # warm-up
    times: dict[str, list[float]] = {"plain": [], "traced": [], "full": []}
    peaks: dict[str, list[float]] = {"plain": [], "traced": [], "full": []}
    outputs, extra = {}, {}
    for i in range(repeats):
        for mode in ("plain", "traced", "full") if i % 2 == 0 else ("full", "traced", "plain"):
            seconds, mib, out, held = run(mode)
            times[mode].append(seconds)
            peaks[mode].append(mib if mib is not None else float("nan"))
            outputs[mode] = out
            if mode == "traced":
                extra["traced_layer_steps"] = held.calls
                extra["trace_sum_mib"] = held.total.numel() * 4 / 2**20
            if mode == "full":
                extra["full_layer_steps"] = len(held)
                extra["full_kept_mib"] = sum(t.numel() * t.element_size() for t in held) / 2**20
            del held
    result = {
        "case": case,
        "quick": quick,
        "call": {k: v for k, v in call.items()},
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "peak_mib": {k: statistics.median(v) for k, v in peaks.items()},
        "peak_mib_each": peaks,  # every repeat: the spread of identical untraced calls is the measurement noise
        "noise_mib": max(peaks["plain"]) - min(peaks["plain"]),
        "identical": torch.equal(outputs["plain"], outputs["traced"]),
        "parameters_m": sum(p.numel() for p in getattr(pipe, FAMILIES[_family(case)].denoiser).parameters()) / 1e6,
        **extra,
    }
    s, m = result["seconds"], result["peak_mib"]
    log(
        f"{case}: untraced {s['plain']:.2f} s, traced {s['traced']:.2f} s ({s['traced'] / s['plain']:.3f}x), full maps "
        f"{s['full']:.2f} s; extra peak MiB: traced {m['traced'] - m['plain']:.1f}, full {m['full'] - m['plain']:.1f}; "
        f"identical latents: {result['identical']}"
    )
    return result


def _sd_scheduler() -> Any:
    """SD 1.5's DDIM settings (its scheduler_config.json)."""
    import diffusers

    return diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _family(case: str) -> str:
    return "sd" if case == "sd15" else "flux"


def suite(device: torch.device, quick: bool = False, log: Log = log_info) -> SuiteResult:
    """``mmx bench trace``: SD 1.5's UNet at 512x512 (time) and Flux blocks at 1024x1024 (memory)."""
    sd = measure("sd15", device, quick, repeats=1 if quick else 2, log=log)
    flux = measure("flux", device, quick, repeats=1 if quick else 2, log=log)
    extra = {mode: flux["peak_mib"][mode] - flux["peak_mib"]["plain"] for mode in ("traced", "full")}
    figures = [
        Figure(
            "SD 1.5 UNet 512x512: traced / untraced time",
            sd["seconds"]["traced"],
            "untraced",
            sd["seconds"]["plain"],
            "s",
        ),
        Figure(
            "SD 1.5 UNet 512x512: traced / full maps time",
            sd["seconds"]["traced"],
            "full maps",
            sd["seconds"]["full"],
            "s",
        ),
        Figure(
            "Flux blocks 1024x1024: extra peak memory, traced / full maps",
            extra["traced"],
            "full maps",
            extra["full"],
            "MiB",
        ),
        Figure(
            "Flux blocks 1024x1024: traced / untraced time",
            flux["seconds"]["traced"],
            "untraced",
            flux["seconds"]["plain"],
            "s",
        ),
    ]
    heads, img, txt = (24, 4096, 512) if not quick else (2, 16, 16)
    notes = [
        f"outputs identical with tracing: SD {sd['identical']}, Flux {flux['identical']}; targets: SD time ratio <= "
        "1.15, Flux extra memory <= 1/50 of full maps",
        f"per Flux layer-step, full maps hold H*L^2*4 B = {heads * (img + txt) ** 2 * 4 / 2**30:.2f} GiB, tracing "
        f"L_img*L_txt*4 B = {img * txt * 4 / 2**20:.1f} MiB in all; the full model (19 double + 38 single blocks, "
        f"28 steps) would keep {57 * 28 * heads * (img + txt) ** 2 * 4 / 2**40:.1f} TiB of full maps",
        f"Flux extra peak memory: traced {extra['traced']:.1f} MiB (it holds {flux['trace_sum_mib']:.1f} MiB of sums), "
        f"full maps {extra['full']:.1f} MiB; identical untraced calls differ by {flux['noise_mib']:.1f} MiB (the "
        "measurement's noise)",
    ]
    return SuiteResult(
        "trace",
        "Tracing diffusers pipelines (SD 1.5 UNet, Flux blocks)",
        figures,
        details={"sd15": sd, "flux": flux},
        notes=notes,
    )
