"""The seq2seq recipe as a unit: load a run, decode held-out compositions, show what each written word read."""

from __future__ import annotations

from pathlib import Path

from mmx.recipes.base import Recipe, RecipeError, Result, Run, format_score
from mmx.recipes.seq2seq.config import Seq2SeqConfig
from mmx.recipes.seq2seq.task import Seq2SeqTask

__all__ = ["Seq2SeqRecipe", "RECIPE"]


class Seq2SeqRecipe(Recipe):
    """Words or images -> words: an encoder-decoder whose decoder reads the memory through cross-attention.

    ``run.model`` is the run's :class:`~mmx.recipes.seq2seq.task.Seq2SeqTask` (the trained model and
    its tokenizers).
    """

    name = "seq2seq"
    config_class = Seq2SeqConfig
    task_class = Seq2SeqTask
    model_folder = "model/seq2seq"

    def load(self, path: Path, overrides: list[str] | None = None, device: str = "cpu") -> Run:
        """The run's config and a task whose model holds the trained weights (eval mode)."""
        from mmx.config import load_config

        path = Path(path)
        cfg = load_config(path / "config.yaml", Seq2SeqConfig, overrides)
        task = Seq2SeqTask(cfg, path, trained=path / "model")
        task.model.to(device)
        return Run(path, self, cfg, task)

    def evaluate(self, run: Run, num: int | None = None, beam: int | None = None) -> Result:
        """``num`` held-out inputs decoded (``beam`` 1: greedy): exact match, alignment accuracy or attention mIoU."""
        from mmx.data import DATASETS

        cfg, task = run.config, run.model
        data = task.eval_dataset()
        if num is not None:
            spec = {k: v for k, v in cfg.data.items() if k not in ("split", "length", "seed")}
            data = DATASETS.build_from_dict({**spec, **dict(cfg.eval.data), "length": num})
        decoding = {} if beam is None else {"method": "greedy" if beam <= 1 else "beam", "beam_size": max(beam, 1)}
        scores = task.score(task.model, data, keep_examples=32, **decoding)
        method = decoding.get("method", cfg.eval.method)
        how = "greedy" if method == "greedy" else f"beam {decoding.get('beam_size', cfg.eval.beam_size)}"
        what = "captions" if task.captioning else "translations"
        lines = [f"[bold]held-out {what}: exact match {scores['exact_match']:.1%}[/bold] ({len(data)} inputs, {how})"]
        if "alignment_accuracy" in scores:
            lines.append(
                "alignment accuracy (strongest source word is the one translated): "
                f"{format_score(scores['alignment_accuracy'])}"
            )
        if "attention_miou" in scores:
            lines.append(
                f"attention mIoU of colour and shape words (threshold {cfg.eval.threshold}): "
                f"{format_score(scores['attention_miou'])}; their map peaks on the object: "
                f"{format_score(scores['attention_pointing'])}"
            )
        for e in [e for e in scores["examples"] if e["output"] != e["reference"]][:3]:
            lines.append(f"  wrong: {e['input']!r}\n     got {e['output']!r}\n    want {e['reference']!r}")
        return Result(lines, {"num": len(data), "decoding": how, **scores}, "eval.json")

    def attend(self, run: Run, prompt: str | None = None, image: Path | None = None, seed: int = 0) -> Result:
        """Translation: the word-alignment matrix of ``prompt``. Captioning: per generated word, the image regions
        it read (``image``, or held-out shapes image number ``seed``)."""
        if run.model.captioning:
            return self._attend_caption(run, prompt, image, seed)
        return self._attend_translation(run, prompt, image)

    def _attend_translation(self, run: Run, prompt: str | None, image: Path | None) -> Result:
        from mmx.attnmap.seq2seq import decoder_attention, save_alignment
        from mmx.data.seq2seq import ROMANISED
        from mmx.eval.seq2seq import decode_batch

        ev, task = run.config.eval, run.model
        if prompt is None or image is not None:
            raise RecipeError("a translation run maps a sentence: give it with --prompt (and no --image)")
        if not prompt.split():
            raise RecipeError(f"--prompt {prompt!r} has no words: give the sentence to translate")
        unknown = task.source.unknown_words(prompt)
        if unknown:
            raise RecipeError(
                f"words outside the source vocabulary: {unknown}; known: {' '.join(task.source.words[4:])}"
            )
        ids, mask = task.source.encode([prompt])
        memory = task.model.encode(ids, mask)
        decoded = decode_batch(task.model, memory, ev.method, ev.max_len, ev.beam_size, ev.length_penalty)
        words = task.target.tokens(decoded.tokens[0])
        att = decoder_attention(task.model, memory, decoded.tokens)[0]  # (T, S)
        source = prompt.split()
        rows = words + ["</s>"] * (int(decoded.lengths[0]) > len(words))  # END's row too: what it read to stop
        picture = {
            "alignment.png": lambda path: save_alignment(
                att, source, rows, path, title=f"{prompt} -> {' '.join(words)}", fallback_labels=ROMANISED
            )
        }
        reads = [
            {
                "word": w,
                "reads": source[int(att[t, : len(source)].argmax())],
                "attention": [round(float(v), 4) for v in att[t, : len(source)]],
            }
            for t, w in enumerate(words)
        ]
        lines = [f"{prompt}\n-> [bold]{' '.join(words)}[/bold]", *(f"  {r['word']} <- {r['reads']}" for r in reads)]
        return Result(lines, {"source": prompt, "translation": " ".join(words), "words": reads}, "words.json", picture)

    def _attend_caption(self, run: Run, prompt: str | None, image: Path | None, seed: int) -> Result:
        from mmx.attnmap import save_word_grid
        from mmx.attnmap.seq2seq import caption_word_maps, decoder_attention, region_maps
        from mmx.data.imagefolder import image_tensor
        from mmx.eval.seq2seq import decode_batch

        ev, task = run.config.eval, run.model
        if prompt is not None:
            raise RecipeError(
                "a captioning run writes its own caption: give an image with --image (or none: a held-out shapes image)"
            )
        item = None
        if image is not None:
            picture = image_tensor(image, tuple(task.eval_dataset()[0]["image"].shape[-2:]))
        else:
            data = task.eval_dataset()
            item = data[seed % len(data)]
            picture = item["image"]
        memory = task.model.encode(picture[None])
        decoded = decode_batch(task.model, memory, ev.method, ev.max_len, ev.beam_size, ev.length_penalty)
        words = task.target.tokens(decoded.tokens[0])
        caption = " ".join(words)
        maps = region_maps(
            decoder_attention(task.model, memory, decoded.tokens), memory.grid, tuple(picture.shape[-2:])
        )[0]
        word_maps = caption_word_maps(words, maps)
        scores = {}
        if item is not None:
            from mmx.eval import word_ious
            from mmx.eval.seq2seq import caption_masks

            scores = word_ious(word_maps, caption_masks(caption, item["objects"]), ev.threshold)
        stats = [
            {
                "word": m.word,
                "peak": [int(v) for v in divmod(int(m.map.argmax()), m.map.shape[-1])],
                "iou": None if m.index not in scores else round(scores[m.index], 3),
            }
            for m in word_maps
        ]
        report = {
            "image": str(image) if image else f"held-out #{item['index']}",
            "caption": caption,
            "reference": None if item is None else item["caption"],
            "words": stats,
        }
        grid = {
            "grid.png": lambda path: save_word_grid(picture, word_maps, f"generated: {caption}", path, scores=scores)
        }
        lines = [f"caption: [bold]{caption}[/bold]" + ("" if item is None else f"\n   want: {item['caption']}")]
        return Result(lines, report, "words.json", grid)


RECIPE = Seq2SeqRecipe()
