"""Settings: defaults, the TOML file, the environment, and clear errors."""

import pytest

from bot.config import EMBEDDED_MODEL, ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for var in ("BANRYEO_CONFIG", "DISCORD_TOKEN", "TELEGRAM_TOKEN", "BANRYEO_SAMPLING__CANDIDATES"):
        monkeypatch.delenv(var, raising=False)


def test_defaults_need_no_file_and_no_tokens():
    s = load_settings()
    assert s.model.name == EMBEDDED_MODEL
    assert s.sampling.candidates == 3
    assert s.chat.persona == "haru"
    assert s.discord_token is None and s.telegram_token is None


def test_file_then_environment_precedence(tmp_path, monkeypatch):
    path = tmp_path / "banryeo.toml"
    path.write_text('[sampling]\ncandidates = 2\ntemperature = 0.7\n[chat]\npersona = "sam"\n')
    assert load_settings(path).sampling.candidates == 2
    monkeypatch.setenv("BANRYEO_SAMPLING__CANDIDATES", "4")
    s = load_settings(path)
    assert s.sampling.candidates == 4          # environment beats the file
    assert s.sampling.temperature == 0.7       # the rest of the file still applies
    assert s.chat.persona == "sam"


def test_banryeo_toml_in_working_directory_is_read(tmp_path):
    (tmp_path / "banryeo.toml").write_text('[sampling]\ncandidates = 5\n')
    assert load_settings().sampling.candidates == 5


def test_tokens_only_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", "secret-discord")
    s = load_settings()
    assert s.discord_token.get_secret_value() == "secret-discord"
    assert "secret-discord" not in s.model_dump_json()
    path = tmp_path / "bad.toml"
    path.write_text('[telegram]\ntoken = "123:abc"\n')
    with pytest.raises(ConfigError, match="environment"):
        load_settings(path)


@pytest.mark.parametrize("text, fragment", [
    ("[sampling]\ntemperature = -1\n", "sampling.temperature"),
    ("[sampling]\ncandidates = 9\n", "sampling.candidates"),
    ("[model]\ndtype = \"int3\"\n", "model.dtype"),
    ("[model]\nnmae = \"x\"\n", "model.nmae"),
    ("[sampling\n", "Expected"),
])
def test_bad_values_name_the_field(tmp_path, text, fragment):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_settings(path)


def test_missing_and_non_utf8_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[chat]\npersona = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_settings(path)
