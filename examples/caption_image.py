"""Caption an image from Python with an mmx ImageCaptioner, and see which regions each word read.

The captioner's memory is ResNet-18 region tokens of the image; a Transformer decoder writes the
caption word by word (greedy, with key/value caches), each word's cross-attention reading the
regions. The full recipe is configs/seq2seq_captioning.yaml (`mmx train` / `mmx eval` / `mmx attend`).

    python examples/caption_image.py                      # trains the recipe first (about 8 min on 2 CPU cores)
    python examples/caption_image.py runs/captioning      # a trained run: captions held-out images
    python examples/caption_image.py runs/captioning my.png
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(run: str = "runs/caption_example", image: str | None = None, steps: int | None = None, index: int = 0) -> str:
    import torch

    from mmx.attnmap import save_word_grid
    from mmx.attnmap.seq2seq import caption_word_maps, decoder_attention, region_maps
    from mmx.config import load_config
    from mmx.decoding import greedy_decode
    from mmx.recipes import load_run
    from mmx.recipes.seq2seq import Seq2SeqConfig, Seq2SeqTask
    from mmx.train import train

    if not (Path(run) / "model" / "seq2seq").is_dir():  # no trained run yet: train the recipe
        cfg = load_config(Path(__file__).parents[1] / "configs" / "seq2seq_captioning.yaml", Seq2SeqConfig)
        cfg.train.max_steps = steps or cfg.train.max_steps
        cfg.train.validate_every = cfg.train.checkpoint_every = cfg.train.max_steps
        train(Seq2SeqTask(cfg, run), cfg.train, run)
    loaded = load_run(run)  # model (eval mode) + its word tokenizer
    cfg, task = loaded.config, loaded.model

    if image is None:  # a held-out shapes image: unseen compositions
        item = task.eval_dataset()[index]
        picture, reference = item["image"], item["caption"]
    else:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor, resize

        size = cfg.data.get("size", 32)
        pixels = resize(pil_to_tensor(Image.open(image).convert("RGB")), [size, size], antialias=True)
        picture, reference = pixels.float() / 127.5 - 1.0, None  # [3, H, W] in [-1, 1]

    model = task.model
    with torch.no_grad():
        memory = model.encode(picture[None])  # Context: [1, h*w, D] region tokens, grid (h, w)
        decoded = greedy_decode(model, memory, max_len=cfg.eval.max_len)
    caption = task.target.decode(decoded.tokens)[0]
    print(f"caption: {caption}" + (f"\n   want: {reference}" if reference else ""))

    attention = decoder_attention(model, memory, decoded.tokens)  # [1, T, h*w]
    maps = region_maps(attention, memory.grid, tuple(picture.shape[-2:]))[0]  # [T, H, W]
    words = caption_word_maps(caption.split(), maps)
    grid = save_word_grid(picture, words, f"generated: {caption}", Path(run) / "caption_attention.png")
    print(f"which regions each word read: {grid}")
    return caption


if __name__ == "__main__":
    main(*sys.argv[1:3])
