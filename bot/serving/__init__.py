"""Serving replies for many users at once, each on their own adapter generation.

    generator = LocalGenerator.load(settings.model, settings.serving)   # or VllmGenerator(...)
    samples = await generator.sample(prompt, 3, settings.sampling, ["\\n"], AdapterRef(name, path))

One concern per module:

    interface.py   Sample, AdapterRef, AdapterError, Pruning and the Generator protocol every generator follows
    registry.py    which adapters are resident, held by requests, superseded or forgotten (both generators)
    multi_lora.py  linear layers that add each batch row's own LoRA update; reading peft adapter folders
    slots.py       the local worker's adapter slots, on top of the registry
    kv_cache.py    prompt-prefix KV caches and left-padded batch caches
    signals.py     what the model thought of its samples, read while sampling (for bot/ranking.py)
    local.py       LocalGenerator: the model on one worker thread, mixed batches across users
    vllm.py        VllmGenerator: replies sampled by a vLLM server, adapters loaded at runtime

Importing this package loads no torch: the generators are imported on first use (the local one
brings torch and the model code, the vLLM client needs neither).
"""

import importlib

from bot.serving.interface import AdapterError, AdapterRef, Generator, Pruning, Sample

__all__ = ["AdapterError", "AdapterRef", "Generator", "LocalGenerator", "Pruning", "Sample", "VllmError",
           "VllmGenerator"]

_IMPORTED_ON_USE = {"LocalGenerator": "bot.serving.local", "VllmGenerator": "bot.serving.vllm",
                    "VllmError": "bot.serving.vllm"}


def __getattr__(name: str):
    if name in _IMPORTED_ON_USE:
        return getattr(importlib.import_module(_IMPORTED_ON_USE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
