"""The console chat as a user runs it: `python -m bot run` in a subprocess, typing on stdin."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(tmp_path: Path, model_dir: Path, *args: str, stdin: bytes = b"", extra_env=None):
    config = tmp_path / "banryeo.toml"
    config.write_text(
        f'[model]\nname = "{model_dir}"\ndtype = "float32"\nseed = 3\n'
        f'[sampling]\nmax_new_tokens = 10\n'
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "TELEGRAM_TOKEN", "BANRYEO_CONFIG")}
    env.update({"BANRYEO_CONFIG": str(config), "PYTHONPATH": str(ROOT), **(extra_env or {})})
    return subprocess.run([sys.executable, "-m", "bot", *args], input=stdin, capture_output=True,
                          cwd=tmp_path, env=env, timeout=300)


def test_a_whole_console_conversation(tmp_path, tiny_model_dir):
    lines = ["안녕! 나 왔어", "2", "2", "5", "/다시", "   ", "오늘 뭐 했어?", "/regen", "1", "/reset", "/persona",
             "/persona sam", "/help", "/nope", "7", "/quit", "never read"]
    result = run_cli(tmp_path, tiny_model_dir, "run", stdin="\n".join(lines).encode() + b"\n")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert out.startswith("하루: ")                                    # the greeting
    assert "  1) " in out and "  3) " in out                           # numbered candidates
    assert "번호를 골라 줘 (1-3)" in out
    assert "이미 2번을 골랐어" in out                                  # the double pick
    assert "다시 뽑을 메시지가 없어" in out                            # /다시 after a pick
    assert "메시지가 비어 있어" in out                                 # whitespace-only message
    assert "새 대화를 시작할게" in out
    assert "페르소나: haru, sam" in out
    assert "Switched to Sam" in out and "Unknown command: /nope" in out  # Sam's user gets English
    assert "There is nothing to pick right now" in out or "Pick a number" in out
    assert out.rstrip().endswith("See you soon!")

    db = sqlite3.connect(tmp_path / "data" / "banryeo.db")
    statuses = [s for (s,) in db.execute("SELECT status FROM candidate_sets ORDER BY created_at, rowid")]
    assert statuses == ["picked", "regenerated", "picked"]
    assert db.execute("SELECT count(*) FROM picks").fetchone()[0] == 2
    assert db.execute("SELECT count(*) FROM conversations").fetchone()[0] == 3


def test_console_export_and_forget(tmp_path, tiny_model_dir):
    lines = ["안녕! 비밀 얘기 하나 할게", "1", "²", "/export", "/forget", "no", "/forget", "yes", "/quit"]
    result = run_cli(tmp_path, tiny_model_dir, "run", stdin="\n".join(lines).encode() + b"\n")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    [export] = list(tmp_path.glob("banryeo-export-*.json"))
    assert f"{export}" in out and (os.stat(export).st_mode & 0o777) == 0o600
    assert "비밀 얘기" in export.read_text()
    assert "지우지 않았어" in out and "다 지웠어" in out      # "no" cancels, "yes" deletes
    db = sqlite3.connect(tmp_path / "data" / "banryeo.db")
    assert db.execute("SELECT count(*) FROM turns").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 0
    assert out.count("  1) ") == 2  # "²" was a message (offered candidates), not a pick of number 2


def test_invalid_utf8_on_stdin_does_not_crash(tmp_path, tiny_model_dir):
    result = run_cli(tmp_path, tiny_model_dir, "chat", stdin=b"caf\xe9 \xff\xfe hello\n/quit\n")
    assert result.returncode == 0, result.stderr.decode()
    db = sqlite3.connect(tmp_path / "data" / "banryeo.db")
    [(text,)] = db.execute("SELECT text FROM turns WHERE role = 'user'")
    assert text == "caf\ufffd \ufffd\ufffd hello"


def test_end_of_input_leaves_politely(tmp_path, tiny_model_dir):
    result = run_cli(tmp_path, tiny_model_dir, "chat", stdin=b"")
    assert result.returncode == 0
    assert "또 와!" in result.stdout.decode()


@pytest.mark.parametrize("model, fragment", [("/no/such/model", "does not exist")])
def test_bad_model_path_is_a_one_line_error(tmp_path, model, fragment):
    result = run_cli(tmp_path, Path(model), "chat")
    assert result.returncode == 1
    assert fragment in result.stderr.decode() and "Traceback" not in result.stderr.decode()


def test_bad_config_and_missing_persona_file(tmp_path, tiny_model_dir):
    bad = run_cli(tmp_path, tiny_model_dir, "config", extra_env={"BANRYEO_SAMPLING__TEMPERATURE": "-3"})
    assert bad.returncode == 1 and "sampling.temperature" in bad.stderr.decode()
    missing = run_cli(tmp_path, tiny_model_dir, "persona", "import", str(tmp_path / "nope.png"))
    assert missing.returncode == 1 and "nope.png" in missing.stderr.decode()
    assert "Traceback" not in missing.stderr.decode()
