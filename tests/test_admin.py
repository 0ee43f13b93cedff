"""Admin operations and their CLI commands, after real rollovers on the tiny model."""

import pytest

from bot.admin import Admin
from bot.cli import main
from bot.engine import UserRef
from tests.conftest import LENIENT, STRICT, nights, write_config

ALICE = UserRef("test", "alice")


@pytest.fixture
async def two_generations(engine, settings):
    await nights(engine, settings, LENIENT, STRICT)
    return Admin(engine.store, settings)


async def test_admin_ids_come_from_the_config(settings, store):
    settings.admins = ["discord:1", "telegram:2"]
    admin = Admin(store, settings)
    assert admin.is_admin("discord:1") and admin.is_admin("telegram:2")
    assert not admin.is_admin("discord:2") and not admin.is_admin("console:local")


async def test_status_learned_and_chart(two_generations, tmp_path):
    admin = two_generations
    status = admin.status()
    assert status["serving"] == {ALICE.id: "gen-1"}
    assert status["last_rollover"]["status"] == "finished" and status["picks"] >= 10
    learned = admin.learned(ALICE.id)
    assert learned["serving"] == 1 and learned["compared_with"] == "base"
    before, after = learned["metrics"]["accuracy"]
    assert before == admin.store.serving(ALICE.id)["metrics"]["accuracy_base"]
    path = admin.chart(ALICE.id, tmp_path / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert admin.learned("test:nobody") == {"lineage": "test:nobody", "serving": "base"}


async def test_cli_generations_promote_rollback(two_generations, settings, capsys, monkeypatch):
    monkeypatch.setenv("BANRYEO_SETTINGS_JSON", "")
    args = ["--config", str(write_config(settings))]
    assert main(args + ["generations", ALICE.id]) == 0
    out = capsys.readouterr().out
    assert "* gen-1" in out and "rejected" in out and "does not beat the base" in out
    assert main(args + ["promote", ALICE.id, "2"]) == 0
    assert "now serves gen-2" in capsys.readouterr().out
    assert main(args + ["rollback", ALICE.id]) == 0
    assert "now serves gen-1" in capsys.readouterr().out
    assert main(args + ["promote", ALICE.id, "base"]) == 0
    assert "now serves base" in capsys.readouterr().out
    assert main(args + ["promote", ALICE.id, "7"]) == 1
    assert "no generation 7" in capsys.readouterr().err
    assert main(args + ["learned", ALICE.id]) == 0
    assert "base model" in capsys.readouterr().out
    assert main(args + ["status"]) == 0  # what /status shows, for the operator on the machine
    out = capsys.readouterr().out
    assert "last rollover: finished at" in out and "(local): 1/1 lineages done" in out and "failed" not in out
