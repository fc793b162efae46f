"""Tests that run against a ComfyUI checkout ($COMFYUI_PATH): library tests and a headless server."""
