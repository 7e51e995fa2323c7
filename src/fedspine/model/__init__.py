"""Base models, LoRA adapters and training footprints.

Submodules: ``load`` (HF directory, packaged SmolLM2 GGUF converted once, tiny random Llama),
``lora`` (peft adapters and the ``LoraState`` that travels), ``footprint`` (FLOPs / bytes / memory from
the model's shape; imports no torch). This package imports nothing at import time, so that
``fedspine.model.footprint`` stays torch-free.
"""
