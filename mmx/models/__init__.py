"""Networks built from mmx blocks: they predict, they know nothing about noise schedules or files."""

from mmx.models.grounding import GroundingNet
from mmx.models.seq2seq import ImageCaptioner, Seq2SeqTransformer
from mmx.models.unet1d import UNet1D
from mmx.models.unet2d import DiffusersUNet2D, UNet2D
from mmx.registry import Registry

MODELS: Registry = Registry("model")
MODELS.register("unet2d")(UNet2D)
MODELS.register("diffusers_unet2d")(DiffusersUNet2D)
MODELS.register("grounding")(GroundingNet)
MODELS.register("unet1d")(UNet1D)
MODELS.register("seq2seq")(Seq2SeqTransformer)
MODELS.register("captioner")(ImageCaptioner)

__all__ = ["MODELS", "UNet1D", "UNet2D", "DiffusersUNet2D", "GroundingNet", "Seq2SeqTransformer", "ImageCaptioner"]
