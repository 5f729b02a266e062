"""The seq2seq recipe: teacher-forcing batches, the loss, training through the shared trainer, reloading."""

from __future__ import annotations

import math

import pytest
import torch

from mmx.config import load_config
from mmx.recipes import load_recipe, load_run
from mmx.recipes.seq2seq import Seq2SeqConfig, Seq2SeqTask
from mmx.train import train


def _task(name: str, tmp_path, *overrides: str) -> Seq2SeqTask:
    cfg, recipe = load_recipe(f"configs/seq2seq_{name}_tiny.yaml", list(overrides))
    task_cls = recipe.task_class
    assert task_cls is Seq2SeqTask
    return task_cls(cfg, tmp_path)


def test_translation_batches_are_teacher_forcing_pairs(tmp_path):
    task = _task("translation", tmp_path)
    data = task.train_dataset()
    batch = task.collate([data[0], data[1], data[2]])
    target = batch["target"]
    assert target[:, 0].eq(task.target.bos_id).all()
    assert task.target.decode(target) == [data[i]["target"] for i in range(3)]
    assert task.source.decode(batch["source"]) == [data[i]["source"] for i in range(3)]
    assert batch["source_mask"].sum(1).tolist() == [len(data[i]["source"].split()) for i in range(3)]
    loss = task.loss(task.model, batch, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and loss.requires_grad and math.isfinite(loss.item()) and loss.item() > 0


def test_loss_ignores_padding(tmp_path):
    task = _task("translation", tmp_path)
    task.model.eval()
    data = task.train_dataset()
    short = min(range(16), key=lambda i: len(data[i]["target"].split()))
    long = max(range(16), key=lambda i: len(data[i]["target"].split()))
    g = torch.Generator().manual_seed(0)
    alone = task.loss(task.model, task.collate([data[short]]), g)
    padded = task.collate([data[short], data[long]])
    assert padded["target_mask"][0].sum() < padded["target_mask"][1].sum()
    # the short sentence's loss is the same with or without the padding a longer neighbour forces on it
    logits = task.model(padded["source"], padded["target"][:, :-1], padded["source_mask"])
    labels = padded["target"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[0], labels[0], ignore_index=task.target.pad_id, label_smoothing=task.cfg.label_smoothing
    )
    assert per_token.item() == pytest.approx(alone.item(), abs=1e-5)


def test_captioning_trains_through_the_shared_trainer_and_reloads(tmp_path):
    task = _task("captioning", tmp_path, "train.max_steps=6", "train.validate_every=6")
    losses = []
    result = train(task, task.cfg.train, tmp_path, on_step=lambda step, loss: losses.append(loss.item()))
    assert result.step == 6 and all(math.isfinite(v) for v in losses)
    assert set(result.metrics) == {"exact_match", "attention_miou", "attention_pointing"}
    assert (tmp_path / "samples" / "step_0000006.json").is_file()
    loaded = load_run(tmp_path)
    cfg, again = loaded.config, loaded.model
    assert isinstance(cfg, Seq2SeqConfig) and again.captioning and not again.model.training
    images = torch.stack([task.eval_dataset()[i]["image"] for i in range(2)])
    task.model.eval()
    with torch.no_grad():
        tokens = torch.tensor([[task.target.bos_id, 5, 6]] * 2)
        assert torch.allclose(task.model(images, tokens), again.model(images, tokens), atol=1e-6)


def test_wrong_model_for_the_data_and_set_vocab_sizes_are_errors(tmp_path):
    with pytest.raises(ValueError, match="needs model.name: seq2seq"):
        _task("translation", tmp_path, "model.name=captioner")
    with pytest.raises(ValueError, match="leave it out"):
        _task("translation", tmp_path, "model.tgt_vocab_size=7")
    with pytest.raises(ValueError, match="'translation' or 'captioning'"):
        Seq2SeqTask(load_config({"data": {"name": "shapes"}}, Seq2SeqConfig), tmp_path)


def test_missing_run_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not an mmx run"):
        load_run(tmp_path)
    (tmp_path / "config.yaml").write_text("task: seq2seq\n")
    with pytest.raises(FileNotFoundError, match=r"has no trained model: .*model/seq2seq not found"):
        load_run(tmp_path)


def test_token_dropout_replaces_decoder_inputs_but_not_labels_or_bos(tmp_path):
    task = _task("translation", tmp_path, "token_dropout=0.5")
    data = task.train_dataset()
    batch = task.collate([data[i] for i in range(8)])
    seen = {}

    def spy(src, tgt_in, src_mask):
        seen["inputs"] = tgt_in
        return torch.zeros(*tgt_in.shape, len(task.target))

    task.loss(spy, batch, torch.Generator().manual_seed(0))
    inputs, original = seen["inputs"], batch["target"][:, :-1]
    dropped = inputs != original
    assert inputs[:, 0].eq(task.target.bos_id).all()
    droppable = original.ne(task.target.pad_id)
    droppable[:, 0] = False
    assert inputs[dropped].eq(task.target.unk_id).all() and not (dropped & ~droppable).any()
    assert 0.35 < dropped[droppable].float().mean() < 0.65
    with pytest.raises(ValueError, match="token_dropout"):
        _task("translation", tmp_path, "token_dropout=1.5")


def test_the_mask_kl_loss_targets_each_object_word_and_trains_the_cross_attention(tmp_path):
    from mmx.attnmap.losses import MaskKL
    from mmx.recipes.seq2seq import region_grid

    def attention_loss(attention, masks):
        return MaskKL(1.0)(attention, masks, region_grid(attention, masks))

    task = _task("captioning", tmp_path, "attention_losses=[{name: mask_kl, weight: 1.0}]")
    data = task.train_dataset()
    items = [data[i] for i in range(4)]
    batch = task.collate(items)
    masks = batch["word_masks"]  # (B, T, H, W): row i is the object named by word i
    assert masks.shape[:2] == (4, batch["target"].shape[1] - 1)
    for b, item in enumerate(items):
        words = item["caption"].split()
        named = {i for i, w in enumerate(words) if masks[b, i].any()}
        assert named == set(item["word_masks"]) and all(words[i] not in ("a", "and", "the") for i in named)
        for i in named:
            assert torch.equal(masks[b, i], torch.as_tensor(item["word_masks"][i]))
    # the loss is zero when the attention is the target, positive otherwise
    side = 4
    target = torch.nn.functional.adaptive_avg_pool2d(masks.flatten(0, 1).float()[:, None], side).flatten(1)
    rows = target.sum(-1) > 0
    exact = torch.full_like(target, 1.0 / side**2)
    exact[rows] = target[rows] / target[rows].sum(-1, keepdim=True)
    exact = exact.view(4, -1, side**2)
    assert attention_loss(exact, masks).item() == pytest.approx(0.0, abs=1e-5)
    uniform = torch.full_like(exact, 1.0 / side**2)
    assert attention_loss(uniform, masks).item() > 0.1
    with pytest.raises(ValueError, match="square grid"):
        attention_loss(torch.full((4, exact.shape[1], 6), 1 / 6), masks)
    # through the task: the term adds to the loss and its gradient reaches the cross-attention keys
    g = torch.Generator().manual_seed(0)
    plain = Seq2SeqTask(load_config({**task.cfg.__dict__, "attention_losses": []}, Seq2SeqConfig), tmp_path)
    plain.model.load_state_dict(task.model.state_dict())
    task.model.eval(), plain.model.eval()
    supervised = task.loss(task.model, batch, g)
    assert supervised.item() > plain.loss(plain.model, batch, torch.Generator().manual_seed(0)).item()
    supervised.backward()
    keys = [m.to_k.weight.grad for m in task.model.modules() if getattr(m, "is_cross", False)]
    assert keys and all(k is not None and k.abs().sum() > 0 for k in keys)
    assert all(not m.hooks for m in task.model.modules() if getattr(m, "is_cross", False)), "hooks removed"
    with pytest.raises(ValueError, match="attention_losses need object masks"):
        _task("translation", tmp_path, "attention_losses=[{name: mask_kl, weight: 1.0}]")
    with pytest.raises(ValueError, match="weight must be a number >= 0"):
        _task("captioning", tmp_path, "attention_losses=[{name: mask_kl, weight: -1}]")
