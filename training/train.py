"""Train one LoRA generation with TRL: DPO on pick pairs, then (with enough thumbs) KTO on thumbs.

    python -m training.rollover --force        # the usual way: dataset, training, gate, promotion

A night continues the serving generation (warm start: its LoRA weights are loaded into the new
adapter before training) on that night's bounded data (training/dataset.py), while the DPO reference
stays the base model (adapters disabled), so every night is measured against one fixed anchor and
no drift compounds. The first night, or a change of LoRA shape, starts from a fresh adapter.
Variety is protected by a bounded number of passes, a moderate beta, a small SFT term instead of
cloning the chosen replies, overdone pairs (a taught piece is also preferred over the piece twice,
training/dataset.py), and by the gate afterwards.

A night also stops as soon as the pairs it trains on are won by `training.stop_margin` (the mean DPO
reward margin of its last steps): what is already learned is not pushed further. That matters most on
warm nights: a generation that already knows tonight's lesson would otherwise keep raising it for
every pass (the SFT term never saturates) until it leaks into every reply.
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback

from bot.config import TrainingSettings
from bot.model import ModelBackend
from bot.prompt import defuse
from training.dataset import overdone_pairs, trim_prompt

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    adapter_dir: Path
    pairs: int
    thumbs: int
    seconds: float
    metrics: dict


class ProgressLog(TrainerCallback):
    """One log line per logging step: loss and reward margins (the numbers that show learning)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        keys = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "kl", "eval_rewards/margins")
        shown = ", ".join(f"{k}={logs[k]:.4g}" for k in keys if isinstance(logs.get(k), (int, float)))
        if shown:
            logger.info("step %d/%d %s", state.global_step, state.max_steps, shown)


class StopWhenWon(TrainerCallback):
    """Ends DPO once the mean reward margin over the last `window` steps reaches `margin` (and at least
    `window` steps have run): the pairs are learned, and more steps would only move the model further."""

    def __init__(self, margin: float, window: int):
        self.margin, self.window, self.margins = margin, window, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not isinstance(logs.get("rewards/margins"), (int, float)):
            return
        self.margins.append(logs["rewards/margins"])
        recent = self.margins[-self.window:]
        if len(recent) == self.window and sum(recent) / self.window >= self.margin and \
                state.global_step < state.max_steps:
            control.should_training_stop = True
            logger.info("pairs won by a mean margin of %.2f over %d steps: stopping at step %d/%d",
                        sum(recent) / self.window, self.window, state.global_step, state.max_steps)


def _rows(pairs: list[dict], backend: ModelBackend, cfg: TrainingSettings, max_reply_tokens: int) -> list[dict]:
    """TRL rows; text from users and picks is defused (a typed `<eos>` is trained as text, not as the token)."""
    rows = []

    def plain(text: str) -> str:
        return defuse(text, backend.special_tokens)

    for pair in pairs:
        if backend.use_chat_template:
            context = [{**m, "content": plain(m["content"])} for m in pair["context"]]
            rows.append({"prompt": context, "chosen": [{"role": "assistant", "content": plain(pair["chosen"])}],
                         "rejected": [{"role": "assistant", "content": plain(pair["rejected"])}]})
            continue
        prompt = trim_prompt(plain(pair["prompt"]), max_reply_tokens, cfg.max_length, backend.count_tokens)
        if prompt is None:
            continue
        # In a transcript a reply is " text" and ends at the line break.
        rows.append({"prompt": prompt, "chosen": f" {plain(pair['chosen'])}\n",
                     "rejected": f" {plain(pair['rejected'])}\n"})
    return rows


@contextmanager
def completion_tokens_only():
    """TRL's fused LM head scores only completion tokens on Triton devices; elsewhere it scores every
    position to keep tile shapes fixed for compilers. In eager mode on a CPU that only costs time (a
    prompt is most of each sequence, and the vocabulary is large), so score completion tokens there too.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:  # another TRL: nothing to change
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def rejected_end_unjudged(tokenizer, cfg: TrainingSettings, transcript: bool = True):
    """TRL's preference collator, except that a rejected reply's end of turn (its trailing line breaks,
    end-of-text and end-of-turn tokens) is left out of the loss, and so is the end-of-text token TRL
    appends to transcript replies (they end at their line break; the model never writes end-of-text there).

    A user who rejects a reply rejects what it says, not that it ended. Pushing a rejected reply's ending
    down teaches "do not stop after a sentence like this"; when the chosen and rejected replies are the
    same sentence with one piece changed (a taught speech style), that is every ending the model already
    uses, and its replies run on. The chosen reply's line break still counts, and the SFT term teaches
    it too. Without the appended end-of-text on the chosen side, DPO cannot meet its margin by raising
    a token the sampler never uses instead of learning what the user picked.
    """
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    special = set(tokenizer.all_special_ids)

    @lru_cache(maxsize=None)
    def ends_a_turn(token_id: int) -> bool:
        return token_id in special or not tokenizer.decode([token_id]).strip()

    class Collator(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            ids, mask = batch["input_ids"], batch["completion_mask"]
            half = mask.size(0) // 2  # chosen rows first, then the rejected ones
            for row in range(mask.size(0)):
                positions = mask[row].nonzero().flatten().tolist()
                if row < half:
                    if transcript and len(positions) > 1 and ids[row, positions[-1]] == tokenizer.eos_token_id:
                        mask[row, positions[-1]] = 0
                    continue
                while len(positions) > 1 and ends_a_turn(ids[row, positions[-1]].item()):
                    mask[row, positions.pop()] = 0
            return batch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Collator(pad_token_id=pad, max_length=cfg.max_length)


def lora_config(cfg: TrainingSettings) -> LoraConfig:
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def train_adapter(backend: ModelBackend, train_pairs: list[dict], thumbs: list[dict], cfg: TrainingSettings,
                  out_dir: Path, max_reply_tokens: int = 64, start_from: Path | None = None) -> TrainResult:
    """Train a LoRA adapter on `backend.model` (a plain base model) and save it to `out_dir`.

    `start_from` is the folder of an adapter to continue (the serving generation); None starts fresh.
    """
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    overdone = overdone_pairs(train_pairs) if cfg.overdone_pairs else []
    rows = _rows(train_pairs + overdone, backend, cfg, max_reply_tokens)
    if not rows:
        raise ValueError("no training pairs fit the length limit")
    random.Random(cfg.seed).shuffle(rows)
    bf16 = backend.model.dtype == torch.bfloat16
    common = dict(output_dir=str(out_dir / "trainer"), per_device_train_batch_size=cfg.batch_size,
                  gradient_accumulation_steps=cfg.grad_accum, lr_scheduler_type="cosine", warmup_steps=0.1,
                  save_strategy="no", report_to="none", logging_steps=1, seed=cfg.seed, bf16=bf16,
                  gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
                  max_length=cfg.max_length)
    losses = ["sigmoid", "sft"] if cfg.sft_weight > 0 else ["sigmoid"]
    weights = [1.0, cfg.sft_weight] if cfg.sft_weight > 0 else [1.0]
    callbacks: list[TrainerCallback] = [ProgressLog()]
    if cfg.stop_margin is not None:  # a window of about 32 pairs
        callbacks.append(StopWhenWon(cfg.stop_margin, max(2, -(-32 // (cfg.batch_size * cfg.grad_accum)))))
    reference_started = time.perf_counter()
    with completion_tokens_only():  # the reference pass (precompute_ref) runs while the trainer is built
        trainer = DPOTrainer(
            model=backend.model, processing_class=backend.tokenizer, train_dataset=Dataset.from_list(rows),
            peft_config=lora_config(cfg), callbacks=callbacks,
            data_collator=(rejected_end_unjudged(backend.tokenizer, cfg, not backend.use_chat_template)
                           if cfg.rejected_end_unjudged else None),
            args=DPOConfig(beta=cfg.beta, loss_type=losses, loss_weights=weights, learning_rate=cfg.learning_rate,
                           num_train_epochs=cfg.epochs, precompute_ref_log_probs=cfg.precompute_ref, **common),
        )
        reference_seconds = time.perf_counter() - reference_started
        metrics: dict = {"warm_start": start_from is not None and _continue(trainer.model, start_from),
                         "overdone_pairs": len(overdone)}
        output = trainer.train()
    model = trainer.model
    metrics.update(dpo_loss=output.training_loss, dpo_steps=output.global_step, dpo_max_steps=trainer.state.max_steps)
    if cfg.precompute_ref:
        metrics["reference_seconds"] = round(reference_seconds, 1)
    history = [h for h in trainer.state.log_history if "rewards/margins" in h]
    if history:
        metrics["train_margin"] = history[-1]["rewards/margins"]
        metrics["train_accuracy"] = history[-1].get("rewards/accuracies")

    usable_thumbs = _kto_ready(thumbs, cfg)
    if usable_thumbs:
        model = _kto_stage(model, backend, usable_thumbs, cfg, common, metrics)
    model.save_pretrained(out_dir, selected_adapters=["default"])
    backend.model = model.unload()  # the plain base again, LoRA layers removed
    backend.model.eval()
    seconds = time.perf_counter() - started
    metrics["train_seconds"] = round(seconds, 1)
    metrics["pairs_per_minute"] = round(len(rows) * cfg.epochs / seconds * 60, 1)
    return TrainResult(out_dir, len(rows), len(usable_thumbs), seconds, metrics)


def _continue(model, adapter_dir: Path) -> bool:
    """Load a saved adapter's weights into the fresh adapter "default"; False when its shape differs."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    if (saved.get("r"), saved.get("lora_alpha")) != (model.peft_config["default"].r,
                                                     model.peft_config["default"].lora_alpha):
        logger.warning("the serving adapter has another LoRA shape; this night starts from a fresh adapter")
        return False
    set_peft_model_state_dict(model, load_file(adapter_dir / "adapter_model.safetensors"), adapter_name="default")
    return True


def _kto_ready(thumbs: list[dict], cfg: TrainingSettings) -> list[dict]:
    """Thumbs are used when there are enough of them, and of each kind (a third of the minimum each)."""
    good = sum(t["label"] for t in thumbs)
    each = max(1, cfg.kto_min_thumbs // 3)
    return thumbs if len(thumbs) >= cfg.kto_min_thumbs and good >= each and len(thumbs) - good >= each else []


def _kto_stage(model, backend: ModelBackend, thumbs: list[dict], cfg: TrainingSettings, common: dict,
               metrics: dict):
    """Continue the DPO adapter with KTO on thumbs; the reference is the DPO result (TRL's 'ref' copy)."""
    from trl import KTOConfig, KTOTrainer

    rows = [{"prompt": t["prompt"] if backend.use_chat_template else defuse(t["prompt"], backend.special_tokens),
             "completion": f" {defuse(t['completion'], backend.special_tokens)}\n", "label": t["label"]}
            for t in thumbs]
    random.Random(cfg.seed).shuffle(rows)  # KTO samples sequentially
    good = sum(r["label"] for r in rows)
    undesirable_weight = good / max(1, len(rows) - good)  # keeps n_D*w_D / (n_U*w_U) at 1
    with completion_tokens_only():
        trainer = KTOTrainer(
            model=model, processing_class=backend.tokenizer, train_dataset=Dataset.from_list(rows),
            callbacks=[ProgressLog()],
            args=KTOConfig(beta=cfg.beta, learning_rate=cfg.learning_rate / 2, num_train_epochs=1,
                           desirable_weight=1.0, undesirable_weight=undesirable_weight,
                           **{**common, "per_device_train_batch_size": max(2, cfg.batch_size)}),
        )
        output = trainer.train()
    metrics["kto_loss"] = output.training_loss
    metrics["kto_rows"] = len(rows)
    return trainer.model
