"""The headless trainer of CtrLoRA condition LoRAs (`python train/train_lora.py`) and its evaluation."""
