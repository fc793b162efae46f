"""ctrlora_core: host-independent PyTorch implementation of CtrLoRA.

CtrLoRA = one shared *Base ControlNet* (an SD UNet-encoder copy whose only spatial
input is the VAE latent of the condition image) + small per-condition adapters
(LoRA on every Linear, plus the condition's own zero convs and attention norms).

Nothing in this package imports ComfyUI. Hosts inject their layer classes through
`ctrlora_core.layers`.
"""
from .errors import CtrLoRAError, CheckpointError

__all__ = ["CtrLoRAError", "CheckpointError"]
