"""FID and CLIP score on local weights files: they load offline, score what they should, refuse bad files."""

import pickle

import pytest
import torch

from mmx.eval.image_metrics import CLIPScore, FrechetInceptionDistance


def test_fid_loads_local_weights_and_ranks_distributions(inception_weights):
    fid = FrechetInceptionDistance(inception_weights)
    g = torch.Generator().manual_seed(1)
    real = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1  # uniform over [-1, 1]
    alike = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    dark = torch.rand(6, 3, 16, 16, generator=g) * 0.5 - 1  # only the darkest quarter
    assert abs(fid(real, real)) < 1e-2
    assert 0 < fid(real, alike) < fid(real, dark)
    with pytest.raises(ValueError, match="FID needs at least 2 generated images; got 1"):
        fid(real, alike[:1])
    with pytest.raises(ValueError, match=r"expected RGB images \[N, 3, H, W\]; got shape \(6, 1, 16, 16\)"):
        fid(real, alike[:, :1])


def test_fid_takes_safetensors_and_refuses_what_is_not_a_plain_state_dict(inception_weights, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(inception_weights, weights_only=True)
    save_file(state, tmp_path / "inception.safetensors")
    assert FrechetInceptionDistance(tmp_path / "inception.safetensors").weights.suffix == ".safetensors"

    class Payload:  # unpickling this would run code of the file's choosing
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"weight": Payload()}, handle)
    with pytest.raises(ValueError, match="evil.pth is not a plain state_dict of tensors"):
        FrechetInceptionDistance(tmp_path / "evil.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth is not the FID Inception"):
        FrechetInceptionDistance(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth not found; download https://"):
        FrechetInceptionDistance(tmp_path / "missing.pth")


def test_clip_score_is_the_clamped_cosine_of_open_clips_own_features(tiny_clip_file):
    import open_clip
    from torchvision.transforms.functional import to_pil_image

    name, path, model = tiny_clip_file
    score = CLIPScore(name, path)
    images = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    captions = ["a red square", "a photo of a cat", "grey gravel"]
    per_image = score.per_image(images, captions)
    _, _, preprocess = open_clip.create_model_and_transforms(name)
    with torch.no_grad():  # the reference: open_clip's evaluation transform on the saved PNG-like pixels
        pixels = torch.stack([preprocess(to_pil_image((image + 1) / 2)) for image in images])
        image_features = model.encode_image(pixels)
        text_features = model.encode_text(open_clip.get_tokenizer(name)(captions))
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    torch.testing.assert_close(per_image, 100 * cosine.clamp_min(0), atol=1e-3, rtol=1e-4)
    assert score(images, captions) == pytest.approx(float(per_image.mean()))
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        score(images, captions[:2])


def test_clip_score_needs_weights(tiny_clip_names, tmp_path):
    with pytest.raises(ValueError, match="clip_score needs trained weights"):
        CLIPScore(tiny_clip_names["clip"], None)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        CLIPScore(tiny_clip_names["clip"], tmp_path / "nope.safetensors")
