"""Test bed shared by tests, benches and tools: random full-size model files and a headless ComfyUI."""
