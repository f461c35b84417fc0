"""LoRA-Pro (arXiv 2407.18242): LoRA whose A and B step so that s B A follows full fine-tuning's Adam.

Forward, init, scale (``use_rslora`` too) and merge are LoRA's; the method lives in its
optimizer, :mod:`mmadapt.optim.lora_pro`, which the trainer selects for these adapters.
That optimizer replaces A's and B's gradients by the ones whose low-rank step is closest
to the full-weight gradient, runs Adam on that full-size gradient and maps Adam's
direction back the same way. Its state holds two fp32 out x in moments per adapted
matrix: as much memory as full fine-tuning's Adam state for those matrices.
"""

from __future__ import annotations

from .lora import LoRA
from .registry import register_adapter


@register_adapter("lora_pro")
class LoRAPro(LoRA):
    optimizer = "lora_pro"
    zero_stages = (0,)
    zero_stage_reason = (
        "its optimizer needs each adapter's whole A, B and their gradients on one rank to build the full-size "
        "gradient and moments; ZeRO 1-3 hand the optimizer flat partitions that split them"
    )
