"""trace(pipe) on tiny pipelines of the four families: maps equal an explicit softmax, images are unchanged.

The reference is computed independently during an untraced call: the attention kernel of every
layer that reads text is replaced by one that also materialises the full softmax in float64 (as
attention-map-diffusers does); the conditional rows, the image -> text block and the grid are
taken by this test's own reading of each family's layout.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import mmx
from mmx.attnmap import trace

PROMPTS = ["a red cat on a mat", "an astronaut riding a horse"]


def _reads_text(family: str, module) -> bool:
    if family in ("sd", "sdxl"):
        return bool(getattr(module, "is_cross_attention", False))
    return hasattr(module, "add_q_proj") or type(module).__name__ == "FluxAttention"


@contextlib.contextmanager
def explicit_reference(pipe, family: str, batch: int, grid: tuple[int, int], guided: bool, separate_negative: bool):
    """Accumulate ``[B, S, h, w]`` float64 maps from the full softmax of every text-reading attention call."""
    import diffusers.models.transformers.transformer_flux as flux_module

    denoiser = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    state = {"inside": False, "call": -1, "total": None}
    hooks = []
    for module in denoiser.modules():
        if _reads_text(family, module):
            hooks.append(module.register_forward_pre_hook(lambda m, a: state.__setitem__("inside", True)))
            hooks.append(module.register_forward_hook(lambda m, a, o: state.__setitem__("inside", False)))
    hooks.append(denoiser.register_forward_pre_hook(lambda m, a: state.__setitem__("call", state["call"] + 1)))

    def record(q, k, mask, scale, layout):
        if (
            not state["inside"] or state.get("dispatching") or (separate_negative and state["call"] % 2 == 1)
        ):  # Flux: positive, then negative
            return
        if layout == "blhd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = q.double(), k.double()
        if guided and not separate_negative:
            q, k = q[batch:], k[batch:]  # guidance batches are [negative; positive]
            mask = None if mask is None else mask[batch:]
        scores = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        if mask is not None:
            scores = scores + mask.double()
        probs = scores.softmax(-1)  # (B, H, L, S): the whole matrix
        length, n_img = q.shape[2], grid[0] * grid[1]
        if family in ("sd", "sdxl"):
            block = probs.sum(1)  # every key is text
            factor = round((n_img / length) ** 0.5)
            h, w = grid[0] // factor, grid[1] // factor
        elif family == "sd3":
            block, (h, w) = probs[:, :, :n_img, n_img:].sum(1), grid  # [image; text]
        else:
            block, (h, w) = probs[:, :, length - n_img :, : length - n_img].sum(1), grid  # [text; image]
        maps = block.transpose(1, 2).reshape(block.shape[0], block.shape[2], h, w)
        if (h, w) != grid:
            maps = F.interpolate(maps.float(), size=grid, mode="bilinear", align_corners=False).double()
        state["total"] = maps if state["total"] is None else state["total"] + maps

    real_sdpa, real_dispatch = F.scaled_dot_product_attention, flux_module.dispatch_attention_fn

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        record(query, key, attn_mask, scale, "bhld")
        return real_sdpa(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw
        )

    def dispatch(query, key, value, attn_mask=None, *args, **kwargs):
        record(query, key, attn_mask, kwargs.get("scale"), "blhd")
        state["dispatching"] = True  # its native backend calls SDPA: one call, counted once
        try:
            return real_dispatch(query, key, value, attn_mask, *args, **kwargs)
        finally:
            state["dispatching"] = False

    torch.nn.functional.scaled_dot_product_attention = sdpa
    flux_module.dispatch_attention_fn = dispatch
    try:
        yield state
    finally:
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
        flux_module.dispatch_attention_fn = real_dispatch
        for hook in hooks:
            hook.remove()


def _call(family: str, guided: bool, negative: str | None, height=32, width=48, images=2, prompts=PROMPTS, **extra):
    kw = dict(num_inference_steps=2, height=height, width=width, output_type="pt", num_images_per_prompt=images)
    if family in ("sd3", "flux"):
        kw["max_sequence_length"] = 16
    if family == "flux":
        kw["true_cfg_scale"] = 2.0 if guided else 1.0  # Flux is guidance-distilled: true CFG is a separate pass
    else:
        kw["guidance_scale"] = 5.0 if guided else 1.0
    if negative is not None:
        kw["negative_prompt"] = [negative] * len(prompts) if isinstance(prompts, list) else negative
    return {"prompt": prompts, **kw, **extra}


def _grid(family: str, height: int, width: int) -> tuple[int, int]:
    latent = (height // 2, width // 2)  # the tiny VAE halves
    return latent if family in ("sd", "sdxl") else (latent[0] // 2, latent[1] // 2)  # SD3 patches, Flux packs 2x2


CASES = [  # (guided, negative prompt, height, width, images per prompt)
    (True, "blurry and dark", 32, 48, 2),
    (False, None, 32, 32, 1),
    (True, None, 48, 32, 1),
]


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
@pytest.mark.parametrize(("guided", "negative", "height", "width", "images"), CASES)
def test_maps_equal_an_explicit_softmax_and_images_are_unchanged(
    tiny_pipelines, family, guided, negative, height, width, images
):
    pipe = tiny_pipelines[family]
    call = _call(family, guided, negative, height, width, images)
    batch = len(PROMPTS) * images
    grid = _grid(family, height, width)
    guided = guided and (family != "flux" or negative is not None)  # Flux's true CFG needs a negative prompt
    separate = family == "flux" and guided
    with explicit_reference(pipe, family, batch, grid, guided, separate) as reference:
        plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with trace(pipe) as maps:
        traced = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(traced, plain), "tracing changes nothing the pipeline computes"
    assert maps.total.shape == reference["total"].shape == (batch, maps.text_tokens, *grid)
    torch.testing.assert_close(maps.total.double(), reference["total"], rtol=1e-4, atol=1e-5)
    assert maps.steps == 2 and maps.images_per_prompt == images and maps.layers > 0
    row = 1 * images + images - 1  # prompt 1, its last image
    assert torch.equal(maps.token_maps(1, images - 1), maps.total[row])


def test_prompt_embeds_passed_directly_trace_like_the_prompt(tiny_pipelines):
    pipe = tiny_pipelines["sd"]
    call = _call("sd", True, None, images=1)
    with trace(pipe) as by_prompt:
        pipe(**call, generator=torch.Generator().manual_seed(0))
    positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    embeds = {k: v for k, v in call.items() if k != "prompt"}
    with trace(pipe) as unnamed:
        pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            **embeds,
            generator=torch.Generator().manual_seed(0),
        )
    torch.testing.assert_close(unnamed.total, by_prompt.total)
    with pytest.raises(ValueError, match="passed prompt_embeds and no prompt.*trace\\(pipe, prompts="):
        unnamed.word_map("cat")
    with trace(pipe, prompts=PROMPTS) as named:
        pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            **embeds,
            generator=torch.Generator().manual_seed(0),
        )
    torch.testing.assert_close(named.word_map("cat"), by_prompt.word_map("cat"))


def test_words_come_from_the_pipelines_own_tokenizers(tiny_pipelines):
    pipe = tiny_pipelines["sd3"]
    long = "a " + " ".join(["astronaut"] * 80)  # 83 CLIP tokens: more than 77
    with trace(pipe) as maps:
        pipe(**_call("sd3", False, None, prompts=["an astronaut riding a horse,", long], images=1))
    first, second = maps.tokens()
    astronaut = next(w for w in first.words if w.word == "astronaut")
    assert astronaut.segments.count("clip") == 1 and astronaut.segments.count("t5") >= 2  # one BPE token, many pieces
    horse = next(w for w in first.words if w.word == "horse,")
    assert horse.tokens[0] < 77 <= horse.tokens[-1]
    special = {t for positions in first.special.values() for t in positions}
    assert not special & {t for w in first.words for t in w.tokens}, "start, end and padding are not words"
    assert first.special["start"] == [0] and len(first.special["end"]) == 2  # CLIP's end and T5's </s>
    heat = maps.word_map("astronaut", prompt=0, normalize="none")
    torch.testing.assert_close(heat, maps.token_maps(0)[astronaut.tokens].mean(0))  # a word averages its tokens
    assert second.truncated["clip"] > 0 and second.truncated["t5"] > 0
    with pytest.raises(KeyError, match="'cat' is not a word of prompt 0"):
        maps.word_map("cat")


def test_unsupported_pipelines_and_processors_are_named(tiny_pipelines):
    from diffusers.models.attention_processor import AttnProcessor

    class Pipeline:
        unet = torch.nn.Linear(1, 1)

    with pytest.raises(ValueError, match="supports Stable Diffusion .*got Pipeline with a Linear denoiser"):
        with trace(Pipeline()):
            pass
    pipe = tiny_pipelines["sd"]
    pipe.unet.set_attn_processor(AttnProcessor())
    try:
        with pytest.raises(ValueError, match="attention processor AttnProcessor of layer .* is not supported"):
            with trace(pipe):
                pass
    finally:
        pipe.unet.set_default_attn_processor()
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_a_saved_pipeline_folder_loads_and_attend_writes_its_maps(tiny_pipelines, family, tmp_path):
    from typer.testing import CliRunner

    from mmx.cli import app

    tiny_pipelines[family].save_pretrained(tmp_path / "pipe")
    out = tmp_path / "att"
    args = [
        "attend",
        "--pipeline",
        str(tmp_path / "pipe"),
        "-p",
        "a red cat on a mat",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "48",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, [*args, "--gif"])
    assert result.exit_code == 0, result.output
    import json

    words = json.loads((out / "words.json").read_text())
    assert (
        words["family"] == family
        and [w["word"] for w in words["per_prompt"][0]["words"]] == "a red cat on a mat".split()
    )
    assert (out / "grid_p0_i0.png").is_file() and (out / "p0_i0_word_02_cat.png").is_file()
    assert (out / "p0_i0_word_02_cat.gif").is_file()
    result = CliRunner().invoke(app, [*args, "--word", "dog", "--out", str(tmp_path / "att2")])
    assert result.exit_code == 2 and "--word 'dog' is not a word of the prompt" in result.output
    result = CliRunner().invoke(app, ["attend", "--pipeline", str(tmp_path), "-p", "a cat"])
    assert result.exit_code == 2 and "model_index.json not found" in " ".join(result.output.split())


def test_overlay_draws_on_the_generated_image(tiny_pipelines, tmp_path):
    pipe = tiny_pipelines["flux"]
    with trace(pipe) as maps:
        pipe(**{**_call("flux", False, None, images=1), "output_type": "pil"})
    path = maps.overlay("cat", tmp_path / "cat.png", prompt=0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert maps.image(1).shape == (3, 32, 48) and maps.image(1).min() >= -1
    assert mmx.attnmap.TraceResult is type(maps)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_the_callers_step_callback_still_runs_and_the_pipeline_is_left_as_it_was(tiny_pipelines, family):
    pipe = tiny_pipelines[family]
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    cls, processors = type(pipe), dict(denoiser.attn_processors)
    seen = []

    def on_step_end(pipeline, step, timestep, kwargs):
        seen.append(step)
        return kwargs

    call = _call(family, True, None, images=1, num_inference_steps=4)
    with trace(pipe, window=2) as maps:
        pipe(**call, callback_on_step_end=on_step_end, generator=torch.Generator().manual_seed(0))
    assert seen == [0, 1, 2, 3] and maps.steps == 4
    # steps 0-1 and 2-3 sum to the whole
    assert sorted(maps.window_totals) == [0, 1]
    torch.testing.assert_close(maps.window_totals[0] + maps.window_totals[1], maps.total)
    assert type(pipe) is cls and "__call__" not in vars(pipe)
    assert {k: type(v) for k, v in denoiser.attn_processors.items()} == {k: type(v) for k, v in processors.items()}
    assert "encode_prompt" not in vars(pipe) and "step" not in vars(pipe.scheduler)
