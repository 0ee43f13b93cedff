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

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict

EMBEDDED_MODEL = "embedded:gemma3-270m"
DEFAULT_CONFIG_FILE = Path("banryeo.toml")
SECRET_KEYS = {"discord_token", "telegram_token", "token"}


class ConfigError(Exception):
    """The configuration could not be used; the message says which value and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    name: str = Field(EMBEDDED_MODEL, description="'embedded:gemma3-270m', a Hugging Face model id or a local folder")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    prompt_format: Literal["auto", "transcript", "chat"] = Field(
        "auto", description="auto: the tokenizer's chat template when it has one, else a transcript"
    )
    cache_dir: Path = Field(Path("~/.cache/banryeo/models"), description="where converted models are kept")
    adapter: Path | None = Field(None, description="a LoRA adapter folder to apply to the base model")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: all cores")
    seed: int | None = None


class SamplingSettings(_Section):
    candidates: int = Field(3, ge=1, le=5, description="candidate replies offered per message")
    temperature: float = Field(0.9, gt=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    repetition_penalty: float = Field(1.1, ge=1, le=2)
    max_new_tokens: int = Field(48, ge=1, le=1024)


class ChatSettings(_Section):
    persona: str = Field("haru", description="persona key used for new users")
    language: Literal["ko", "en"] | None = Field(None, description="bot messages; default: the persona's language")
    max_message_chars: int = Field(2000, ge=50, description="longer messages are shortened in the prompt (kept whole in the store)")
    max_context_tokens: int = Field(1024, ge=128, description="prompt budget; the oldest turns are dropped first")


class StorageSettings(_Section):
    data_dir: Path = Field(Path("~/.local/share/banryeo"), description="database, imported personas, adapters")

    @property
    def db_path(self) -> Path:
        return self.data_dir.expanduser() / "banryeo.db"

    @property
    def persona_dir(self) -> Path:
        return self.data_dir.expanduser() / "personas"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BANRYEO_", env_nested_delimiter="__", extra="forbid")

    model: ModelSettings = ModelSettings()
    sampling: SamplingSettings = SamplingSettings()
    chat: ChatSettings = ChatSettings()
    storage: StorageSettings = StorageSettings()
    admins: list[str] = Field(default_factory=list, description="admin ids as 'platform:id', e.g. 'discord:1234'")
    discord_token: SecretStr | None = Field(None, validation_alias=AliasChoices("DISCORD_TOKEN", "BANRYEO_DISCORD_TOKEN"))
    telegram_token: SecretStr | None = Field(None, validation_alias=AliasChoices("TELEGRAM_TOKEN", "BANRYEO_TELEGRAM_TOKEN"))

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
