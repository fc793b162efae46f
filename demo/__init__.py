"""The bundled demo (`make demo`): synthetic dental data, miniature pretrained models, a LoRA trained on a CPU."""
