"""Random LoRA adapters for the serving benchmarks: same shape as a nightly generation (the configured
`training.lora_r` and `lora_alpha`, all linear layers)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from bot.config import TrainingSettings


def make_random_adapters(model_dir: str | Path, out: Path, count: int, training: TrainingSettings,
                         scale: float = 0.02) -> list[Path]:
    """`count` peft LoRA folders with random non-zero weights, saved under `out`.

    The work runs on a thread that ends with it, so that its OpenMP threads end too and the model's
    thread stays the only one with a team (see `LocalGenerator`)."""
    paths: list[Path] = []
    errors: list[BaseException] = []

    def make() -> None:
        try:
            paths.extend(_make(model_dir, out, count, training, scale))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return paths


def _make(model_dir: str | Path, out: Path, count: int, training: TrainingSettings, scale: float) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=training.lora_r, lora_alpha=training.lora_alpha,
                                      target_modules="all-linear"))
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.normal_(0, scale)
        path = out / f"adapter-{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths
