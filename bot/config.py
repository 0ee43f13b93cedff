"""Typed settings: defaults, overridden by a TOML file, overridden by environment variables.

    banryeo --config banryeo.toml run          # explicit file
    BANRYEO_CONFIG=/etc/banryeo.toml banryeo run
    BANRYEO_SAMPLING__CANDIDATES=4 banryeo chat  # any field: BANRYEO_<SECTION>__<FIELD>

Without --config or BANRYEO_CONFIG, ./banryeo.toml is read when it exists. Bot tokens are
secrets and are read only from the environment (DISCORD_TOKEN, TELEGRAM_TOKEN); a token in the
file is refused so it never ends up in a repository.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict, SettingsError

EMBEDDED_MODEL = "embedded:gemma3-270m"
DEFAULT_CONFIG_FILE = Path("banryeo.toml")
SECRET_KEYS = {"discord_token", "telegram_token", "token", "vllm_api_key", "api_key"}


class ConfigError(Exception):
    """The configuration could not be used; the message says which value and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    name: str = Field(EMBEDDED_MODEL, description="'embedded:gemma3-270m', a Hugging Face model id or a local folder")
    dtype: Literal["auto", "bfloat16", "float16", "float32", "int8"] = Field(
        "auto", description="auto: bfloat16 on CPU; int8: dynamic int8 linear layers on CPU (serving only)")
    prompt_format: Literal["auto", "transcript", "chat"] = Field(
        "auto", description="auto: the tokenizer's chat template when it has one, else a transcript"
    )
    cache_dir: Path = Field(Path("~/.cache/banryeo/models"), description="where converted models are kept")
    adapter: Path | None = Field(None, description="a LoRA adapter folder to apply to the base model")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: all cores")
    seed: int | None = None


class SamplingSettings(_Section):
    candidates: int = Field(3, ge=1, le=5, description="candidate replies offered per message (K)")
    samples: int = Field(8, ge=1, le=16, description="replies sampled per message in one batched call (N); "
                         "the best `candidates` of them are offered (see [ranking]); at most `candidates`: no ranking")
    temperature: float = Field(0.9, gt=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    repetition_penalty: float = Field(1.1, ge=1, le=2)
    max_new_tokens: int = Field(48, ge=1, le=1024)
    min_new_tokens: int = Field(0, ge=0, le=1024, description="benchmarks only: never stop before this many")


class RankingSettings(_Section):
    """How the `sampling.samples` replies are ranked to offer the best `sampling.candidates` (bot/ranking.py)."""

    enabled: bool = Field(True, description="rank the samples; off: offer the first distinct ones as sampled")
    logprob_weight: float = Field(1.0, description="prior weight of a reply's mean token log-probability")
    relevance_weight: float = Field(2.0, description="prior weight of its relevance: log-prob given the "
                                    "conversation minus given the persona alone (replies that ignore the message)")
    continue_best: int = Field(3, ge=0, le=16, description="after a reply's opening (8 tokens), only this many "
                               "unfinished replies, the best by their opening, are sampled to their end (most of "
                               "the cost of N replies is in the long ones; bench/candidates.py); 0: every reply to "
                               "its end")
    learn: bool = Field(True, description="learn each user's ranking from their picks, after every pick")
    state_dims: int = Field(64, ge=0, le=512, description="numbers kept of a reply's hidden state for the "
                            "per-user ranker (a fixed projection); 0: rank by the two signals alone")
    l2: float = Field(10.0, gt=0, description="pull of the learned log-prob and relevance weights towards the "
                      "prior (higher: they change more slowly)")
    state_l2: float = Field(1.0, gt=0, description="pull of the learned hidden-state weights towards zero")
    history_picks: int = Field(200, ge=1, description="the user's most recent picks the ranker is fit on")
    shuffle_shown: bool = Field(True, description="show the best candidates in random order, so the number a "
                                "reply gets says nothing about its rank (picks of button 1 out of habit teach nothing)")


class ChatSettings(_Section):
    persona: str = Field("haru", description="persona key used for new users")
    language: Literal["ko", "en"] | None = Field(None, description="bot messages; default: the persona's language")
    max_message_chars: int = Field(2000, ge=50, description="longer messages are shortened in the prompt (kept whole in the store)")
    max_context_tokens: int = Field(1024, ge=128, description="prompt budget; the oldest turns are dropped first")
    messages_per_minute: int = Field(12, ge=1, description="per user; faster messages are asked to slow down")


class TrainingSettings(_Section):
    """Nightly preference learning (DPO on picks, KTO on thumbs) of a LoRA adapter over the base model."""

    lineage: Literal["per_user", "shared"] = Field("per_user", description="a companion per user, or one for all")
    executor: Literal["local", "ray"] = Field("local", description="where lineages train: one after another in the "
                                              "rollover process, or as jobs on a Ray cluster (see [ray])")
    retries: int = Field(1, ge=0, le=3, description="a lineage whose job failed (or whose worker was lost) is run "
                         "again this often before it is recorded as failed; the other lineages go on either way")
    min_new_picks: int = Field(20, ge=1, description="picks since the last generation needed to train")
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="share of new picks held out for the gate "
                                    "(a different share each night; trained the night after)")
    min_heldout_picks: int = Field(16, ge=1, description="held out at least this many new picks (at most half)")
    pairs_per_night: int = Field(96, ge=8, description="training pairs per night: new picks first, then a "
                                 "replay sample of older ones; bounds a night's cost")
    replay_share: float = Field(0.25, ge=0, le=0.5, description="share of the budget kept for replaying older "
                                "picks (when there are any), so earlier lessons are kept")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    beta: float = Field(0.1, gt=0, description="DPO KL strength: higher stays closer to the base")
    sft_weight: float = Field(0.3, ge=0, le=1, description="NLL term on the chosen replies, beside DPO: keeps "
                              "replies ending where the user's did (0.05 let a taught style run on)")
    overdone_pairs: bool = Field(True, description="where a chosen reply is a rejected one plus a piece (a style "
                                 "ending), also train it over the reply with the piece twice (measured: without, "
                                 "a taught style looped in 10% of replies)")
    rejected_end_unjudged: bool = Field(False, description="leave a rejected reply's end of turn (line break, "
                                        "end-of-text) out of the DPO loss (measured: replies were not shorter)")
    learning_rate: float = Field(5e-5, gt=0)
    epochs: float = Field(2, gt=0, description="passes over the night's pairs, at most (see stop_margin)")
    stop_margin: float | None = Field(1.0, gt=0, description="stop once the last ~32 pairs trained were won by "
                                      "this mean DPO reward margin (None: always run every pass)")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(2, ge=1)
    max_length: int = Field(1152, ge=64, description="prompt + reply tokens; older turns are trimmed first")
    max_rejected_per_pick: int = Field(2, ge=1)
    precompute_ref: bool = Field(True, description="compute the base model's log-probs once before training")
    kto_min_thumbs: int = Field(30, ge=2, description="thumbs (a third of them of each kind) for a KTO stage")
    seed: int = 42
    keep_generations: int = Field(7, ge=1, description="generation folders kept per lineage")


class GateSettings(_Section):
    """Checks a new generation must pass before it is served (see README: the gate)."""

    min_accuracy: float = Field(0.6, ge=0, le=1, description="held-out pick accuracy of the new generation")
    min_gain_over_base: float = Field(0.0, description="accuracy must beat the base by more than this")
    max_drop_from_current: float = Field(0.03, ge=0, description="allowed accuracy drop against the serving one")
    min_distinct2_ratio: float = Field(0.9, ge=0, description="distinct-2 of samples relative to the base")
    max_self_bleu_ratio: float = Field(1.1, ge=0, description="self-BLEU of samples relative to the base")
    max_repetition_rate: float = Field(0.05, ge=0, le=1, description="share of samples with a repetition loop")
    length_band: tuple[float, float] = Field((0.7, 1.4), description="mean reply length relative to the base")
    max_kl_per_token: float = Field(0.5, gt=0, description="Monte-Carlo KL from the base, nats per token, over "
                                    "the tokens outside what was taught (a new style word costs ~12 nats a use)")
    confidence: float = Field(0.9, gt=0.5, lt=1, description="bootstrap interval for held-out accuracy: the gain "
                              "over the base must be above zero across it, and its top must reach min_accuracy")
    max_obsession: float = Field(0.3, ge=0, le=1, description="share of replies to unrelated contexts that may "
                                 "carry what was taught (contexts where the user picked replies without it)")
    probe_contexts: int = Field(12, ge=1, description="held-out contexts sampled for diversity")
    samples_per_context: int = Field(6, ge=2)


class ScheduleSettings(_Section):
    nightly_time: str = Field("04:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="local time, HH:MM")
    timezone: str = Field("Asia/Seoul", description="an IANA time zone name")
    enabled: bool = True
    max_minutes: float = Field(360, gt=0, description="a rollover still running after this long is stopped "
                               "(its run shows 'timed out' in /status) so later nights are not blocked")

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use a name like 'Asia/Seoul' or 'UTC')") from None
        return value


class ServingSettings(_Section):
    """How replies are generated: in this process (batched across users) or by a vLLM server."""

    backend: Literal["local", "vllm"] = Field("local", description="local: this process; vllm: a vLLM server")
    max_adapters: int = Field(16, ge=1, le=256, description="user adapters kept resident at once (LRU)")
    max_rank: int = Field(16, ge=1, le=256, description="highest LoRA rank the local server accepts")
    merged_adapters: int = Field(2, ge=0, le=64, description="adapters also kept merged into a copy of the "
                                 "weights, for batches that need one adapter alone (no per-token LoRA cost)")
    prefix_cache: int = Field(64, ge=0, le=4096, description="persona prefixes (per adapter) whose KV cache is "
                              "kept, so a reply computes only the conversation (about 9 MB each for the "
                              "embedded model in bfloat16; more for larger models); 0 turns this off")
    batch_window_ms: float = Field(8, ge=0, le=1000, description="how long a batch waits for more requests")
    max_batch_rows: int = Field(24, ge=1, le=256, description="sequences (requests x candidates) per batch")
    max_queue: int = Field(64, ge=1, description="requests waiting for the model; beyond it users hear 'busy'")
    vllm_url: str | None = Field(None, description="base URL of vLLM's OpenAI-compatible server, e.g. http://gpu:8000")
    vllm_model: str | None = Field(None, description="the base model's name on the vLLM server (default: model.name)")
    vllm_adapter_dir: Path | None = Field(None, description="the generations folder as the vLLM server sees it")
    vllm_timeout: float = Field(60, gt=0, description="seconds per vLLM request")
    vllm_venv: Path = Field(Path("~/.cache/banryeo/vllm-venv"), description="the virtualenv `banryeo vllm install` "
                            "creates and `banryeo vllm serve` runs vLLM from")


class DiscordSettings(_Section):
    pick_with: Literal["reactions", "buttons", "both"] = Field("reactions", description="how users pick in DMs")
    answer_in_guilds: bool = Field(False, description="answer in server channels when mentioned")
    admin_guild_id: int | None = Field(None, description="the one server where admin commands are offered; "
                                                         "unset: every server (never in DMs)")
    api_base: str | None = Field(None, description="REST base URL; only for a local test server")
    gateway_url: str | None = Field(None, description="gateway URL; only for a local test server")


class TelegramSettings(_Section):
    answer_in_groups: bool = Field(False, description="answer in group chats when addressed (mention, reply, /cmd@bot)")
    mode: Literal["polling", "webhook"] = Field("polling", description="how updates arrive")
    poll_timeout: int = Field(10, ge=0, le=50, description="long-polling timeout in seconds")
    webhook_url: str | None = Field(None, description="public HTTPS URL Telegram posts updates to (webhook mode)")
    webhook_listen: str = Field("127.0.0.1", description="address the webhook server listens on")
    webhook_port: int = Field(8443, ge=1, le=65535, description="port the webhook server listens on")
    api_base: str | None = Field(None, description="Bot API base URL ending in /bot; only for a local test server")

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return value


class RaySettings(_Section):
    """Nightly training on Ray (`training.executor = "ray"`): one train+gate job per lineage.

    Every worker must see `storage.data_dir`'s generations folder and the base model at the same path
    (a shared folder: NFS, a mounted bucket); only the rollover process opens the database.
    """

    address: str | None = Field(None, description="a running cluster ('ray://head:10001', 'auto'); None: start a "
                                "local one on this machine for the night and stop it after")
    local_cpus: int | None = Field(None, ge=1, description="CPUs the local cluster offers (default: all cores)")
    cpus_per_job: float | None = Field(None, gt=0, description="CPUs a job declares; torch in the job uses that "
                                       "many threads. Default: this machine's cores, one job per machine (on a CPU, "
                                       "packing jobs was slower: bench/night_packing.py); GPU nodes: 1")
    gpus_per_job: float = Field(0, ge=0, description="GPU share a job declares, e.g. 0.25: four lineages train on "
                                "one GPU at once")
    memory_gb_per_job: float = Field(4, ge=0, description="memory a job declares (scheduling only; 0: undeclared); "
                                     "a worker training the embedded model peaked at 3.5 GB")


class StorageSettings(_Section):
    data_dir: Path = Field(Path("~/.local/share/banryeo"), description="database, imported personas, adapters")

    @property
    def db_path(self) -> Path:
        return self.data_dir.expanduser() / "banryeo.db"

    @property
    def persona_dir(self) -> Path:
        return self.data_dir.expanduser() / "personas"

    @property
    def generations_dir(self) -> Path:
        return self.data_dir.expanduser() / "generations"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BANRYEO_", env_nested_delimiter="__", extra="forbid")

    model: ModelSettings = ModelSettings()
    sampling: SamplingSettings = SamplingSettings()
    ranking: RankingSettings = RankingSettings()
    chat: ChatSettings = ChatSettings()
    storage: StorageSettings = StorageSettings()
    training: TrainingSettings = TrainingSettings()
    gate: GateSettings = GateSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    ray: RaySettings = RaySettings()
    serving: ServingSettings = ServingSettings()
    discord: DiscordSettings = DiscordSettings()
    telegram: TelegramSettings = TelegramSettings()
    admins: list[str] = Field(default_factory=list, description="admin ids as 'platform:id', e.g. 'discord:1234'")
    discord_token: SecretStr | None = Field(None, validation_alias=AliasChoices("DISCORD_TOKEN", "BANRYEO_DISCORD_TOKEN"))
    telegram_token: SecretStr | None = Field(None, validation_alias=AliasChoices("TELEGRAM_TOKEN", "BANRYEO_TELEGRAM_TOKEN"))
    vllm_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices("VLLM_API_KEY", "BANRYEO_VLLM_API_KEY"))

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # Highest priority first: explicit arguments, the environment, then the TOML file.
        file_source = InitSettingsSource(settings_cls, init_kwargs=_file_values.get("data", {}))
        return (init_settings, env_settings, file_source)


# The file's values reach settings_customise_sources through this holder (it is a classmethod).
_file_values: dict[str, Any] = {}


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file with clear errors; refuses secrets in it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for section, values in [("", data), *[(k, v) for k, v in data.items() if isinstance(v, dict)]]:
        for key in values:
            if key in SECRET_KEYS:
                where = f"{section}.{key}" if section else key
                raise ConfigError(
                    f"{path}: '{where}' looks like a bot token; tokens are read only from the environment "
                    "(DISCORD_TOKEN, TELEGRAM_TOKEN)"
                )
    return data


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings from defaults, the config file (if any), the environment and overrides."""
    if path is None and os.environ.get("BANRYEO_CONFIG"):
        path = os.environ["BANRYEO_CONFIG"]
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    data = read_config_file(Path(path)) if path is not None else {}
    _file_values["data"] = data
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    except SettingsError as exc:  # an environment value for a list or table field that is not JSON
        field = str(exc).split('"')[1] if '"' in str(exc) else "a field"
        raise ConfigError(f"invalid configuration: the environment value for {field} must be JSON "
                          f"(e.g. BANRYEO_ADMINS='[\"discord:1234\"]')") from None
    finally:
        _file_values.clear()


def _describe(exc: ValidationError, path: Path | str | None) -> str:
    where = f"{path}: " if path else ""
    lines = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "(top level)"
        got = err.get("input")
        shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        lines.append(f"{where}{field}: {err['msg']}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
