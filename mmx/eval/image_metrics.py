"""Image quality metrics on local weights: FID (Heusel et al. 2017) and CLIP score (Hessel et al. 2021).

Neither downloads anything: FID reads the Inception weights from a file the user names, CLIP score
an open_clip checkpoint file (or an open_clip tag already in its cache). Images are tensors
``[N, 3, H, W]`` in [-1, 1], as mmx generates them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["FID_WEIGHTS_FILE", "CLIPScore", "FrechetInceptionDistance"]

logger = logging.getLogger(__name__)

# The Inception weights torchmetrics (through torch-fidelity) would download; FrechetInceptionDistance takes their path.
FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
_FID_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + FID_WEIGHTS_FILE


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1] -> float32 in [0, 1] on the CPU; anything else is an error naming the shape."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [N, 3, H, W]; got shape {tuple(images.shape)}")
    return images.detach().float().cpu().add(1).div(2).clamp(0, 1)


class FrechetInceptionDistance:
    """FID between real and generated images, torchmetrics' implementation on a local Inception weights file.

    Args:
        weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (what torchmetrics
            would download: the original TF FID Inception), as ``.pth`` or converted to ``.safetensors``.
            A ``.pth`` is first read with ``torch.load(weights_only=True)``, so a file that holds
            anything but tensors is refused before torchmetrics unpickles it.
        device: where the Inception network runs.

    FID is biased upwards at small N; compare runs only at the same number of images, and expect
    meaningful values from thousands of images, not tens.
    """

    def __init__(self, weights: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance as _FID
        except ImportError as err:  # torchmetrics, or torch-fidelity under it
            raise ImportError(
                "the fid metric needs torchmetrics and torch-fidelity: pip install 'mmx[metrics]'"
            ) from err
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"FID Inception weights {path} not found; download {_FID_URL} once where there "
                "is network and name the file"
            )
        state = _plain_state_dict(path)
        with tempfile.TemporaryDirectory() as folder:
            source = path
            if path.suffix == ".safetensors":  # torch-fidelity reads .pth only
                source = Path(folder) / FID_WEIGHTS_FILE
                torch.save(state, source)
            try:
                self.metric = _FID(feature=2048, normalize=True, feature_extractor_weights_path=str(source))
            except RuntimeError as err:  # load_state_dict: missing or unexpected keys
                raise ValueError(f"{path} is not the FID Inception ({FID_WEIGHTS_FILE}): {err}") from err
        self.metric.to(device)
        self.weights = path

    @torch.no_grad()
    def __call__(self, real: torch.Tensor, generated: torch.Tensor) -> float:
        """FID of ``generated`` against ``real`` (each ``[N, 3, H, W]`` in [-1, 1], N >= 2)."""
        for name, images in (("real", real), ("generated", generated)):
            if images.shape[0] < 2:
                raise ValueError(f"FID needs at least 2 {name} images; got {images.shape[0]}")
        self.metric.reset()
        device = self.metric.device
        self.metric.update(_to_unit(real).to(device), real=True)
        self.metric.update(_to_unit(generated).to(device), real=False)
        return float(self.metric.compute())


def _plain_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a pickle that ``weights_only=True`` accepts; else an error."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the restricted unpickler refuses anything but tensors and plain containers
        raise ValueError(
            f"{path} is not a plain state_dict of tensors (torch.load(weights_only=True) refused it: {err})"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return state


class CLIPScore:
    """CLIP score of images against their captions: ``100 * max(cos(image, text), 0)``, averaged (Hessel et al. 2021).

    The scale is torchmetrics' (100, not the paper's 2.5). The model is an open_clip architecture
    with local weights, exactly as :class:`~mmx.encoders.CLIPTextEncoder` takes them; images go
    through the model's own evaluation preprocessing (resize, centre crop, normalise).

    Args:
        model_name: an open_clip architecture, e.g. ``"ViT-B-32"``.
        pretrained: a local open_clip checkpoint file, or a tag already in open_clip's cache.
        device: where the model runs.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        from mmx.encoders.clip import check_model_name, create_model

        if pretrained is None:
            raise ValueError(
                "clip_score needs trained weights: pretrained: /path/to/open_clip_model.safetensors (random "
                "weights would score noise)"
            )
        check_model_name(open_clip, model_name)
        self.model = create_model(open_clip, model_name, os.fspath(pretrained), None).to(device).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.preprocess = image_transform_v2(
            PreprocessCfg(**open_clip.get_model_preprocess_cfg(self.model)), is_train=False
        )
        self.model_name, self.pretrained = model_name, os.fspath(pretrained)

    @torch.no_grad()
    def per_image(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """``[N]`` scores of each image ``[N, 3, H, W]`` (in [-1, 1]) against its caption."""
        from torchvision.transforms.functional import to_pil_image

        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        device = next(self.model.parameters()).device
        pixels = torch.stack([self.preprocess(to_pil_image(image)) for image in _to_unit(images)]).to(device)
        image_features = self.model.encode_image(pixels)  # [N, Dp]
        text_features = self.model.encode_text(self.tokenizer(list(captions)).to(device))  # [N, Dp]
        cosine = torch.nn.functional.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
        return 100 * cosine.clamp_min(0).cpu()

    def __call__(self, images: torch.Tensor, captions: Sequence[str]) -> float:
        """The mean score of ``images`` against ``captions``."""
        return float(self.per_image(images, captions).mean())
