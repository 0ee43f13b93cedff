"""Nights on a real local Ray cluster (tiny model): every user's lineage as a job, promoted as it finishes;
a killed worker or a failing job costs only its lineage; admins see the night's progress in /status."""

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bot.admin import Admin
from bot.engine import UserRef
from bot.generations import lineage_dir
from bot.vllm_server import free_port
from tests.conftest import LENIENT, configure, make_picks
from tests.test_rollover import ROOT, _env
from training.rollover import run_rollover

pytest.importorskip("ray")

ALICE, BOB, CAROL = UserRef("test", "alice"), UserRef("test", "bob"), UserRef("test", "carol")
USERS = (ALICE, BOB, CAROL)


def on_ray(settings, **ray):
    configure(settings, LENIENT)
    settings.training.executor = "ray"
    settings.ray.local_cpus = 2
    settings.ray.cpus_per_job = 1
    settings.ray.memory_gb_per_job = 0.5
    for key, value in ray.items():
        setattr(settings.ray, key, value)
    return settings


async def kill_workers_of(settings, lineage: str, times: int, killed: list[int]) -> None:
    """SIGKILL the worker process training `lineage` (its partial folder is named after its pid), `times` times."""
    folder = lineage_dir(settings, lineage)
    while len(killed) < times:
        for partial in folder.glob(".partial-gen-*") if folder.exists() else []:
            pid = int(partial.name.rsplit("-", 1)[1])
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        await asyncio.sleep(0.05)


async def test_a_night_on_ray_trains_every_user_and_a_killed_worker_costs_one_retry(engine, settings):
    on_ray(settings)
    for user in USERS:
        await make_picks(engine, user)
    admin = Admin(engine.store, settings)
    killed: list[int] = []
    night = asyncio.create_task(asyncio.to_thread(run_rollover, settings))
    killer = asyncio.create_task(kill_workers_of(settings, BOB.id, 1, killed))
    seen = set()
    while not night.done():  # what an admin's /status shows while the night runs
        seen.add(next(line for line in admin.status_text().splitlines() if line.startswith("last rollover")))
        await asyncio.sleep(0.2)
    outcomes = {o.lineage: o for o in await night}
    killer.cancel()

    assert killed, "Bob's job never started"
    assert {lineage: o.status for lineage, o in outcomes.items()} == {u.id: "promoted" for u in USERS}, outcomes
    assert outcomes[BOB.id].attempts == 2 and outcomes[ALICE.id].attempts == outcomes[CAROL.id].attempts == 1
    assert any("running since" in line and "(ray): 0/3 lineages done" in line for line in seen), seen
    assert any("running since" in line and "1 retried" in line for line in seen), seen
    run = engine.store.last_run()
    assert (run["status"], run["executor"], run["lineages_total"], run["lineages_done"], run["lineages_failed"],
            run["retries"]) == ("finished", "ray", 3, 3, 0, 1)
    assert "finished at" in admin.status_text() and "3/3 lineages done, 1 retried" in admin.status_text()
    for user in USERS:  # each user is served by their own new generation, without a restart
        folder = lineage_dir(settings, user.id)
        assert [p.name for p in folder.iterdir()] == ["gen-0001"]  # the killed attempt left nothing behind
        assert (await engine.on_message(user, "안녕")).generation == f"user-{user.id.replace(':', '-')}-gen-1"


@pytest.mark.parametrize("executor", ["ray", "local"])
async def test_a_lineage_whose_job_fails_twice_fails_alone(engine, settings, executor):
    configure(settings, LENIENT)
    for user in USERS:
        await make_picks(engine, user)
    assert {o.status for o in run_rollover(settings)} == {"promoted"}  # gen-1 for everyone, locally
    weights = lineage_dir(settings, CAROL.id) / "gen-0001" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # Carol's serving generation is damaged on the shared disk
    for user in USERS:
        await make_picks(engine, user)

    if executor == "ray":
        on_ray(settings)
    outcomes = {o.lineage: o for o in run_rollover(settings)}
    assert outcomes[ALICE.id].status == outcomes[BOB.id].status == "promoted", outcomes
    carol = outcomes[CAROL.id]
    assert carol.status == "failed" and carol.attempts == 2 and carol.number is None, carol
    assert "safetensors" in carol.reason.lower() or "header" in carol.reason.lower(), carol.reason
    assert engine.store.serving(CAROL.id)["number"] == 1  # she keeps what she had
    assert [g["number"] for g in engine.store.generations(CAROL.id)] == [1]
    run = engine.store.last_run()
    assert (run["status"], run["lineages_done"], run["lineages_failed"], run["retries"]) == ("finished", 3, 1, 1)
    status = Admin(engine.store, settings).status_text()
    assert f"({executor}): 3/3 lineages done, 1 failed, 1 retried" in status
    assert f"  failed {CAROL.id}: " in status
    assert (await engine.on_message(ALICE, "잘 지내?")).generation == "user-test-alice-gen-2"


async def test_a_night_on_a_running_cluster_leaves_it_running(engine, settings, tmp_path):
    """`ray.address`: the rollover process (as the nightly job starts it) joins a cluster it did not start, with
    Ray's token authentication as a real deployment has it, and leaves the cluster up."""
    port = free_port()
    token = tmp_path / "ray-token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}  # set for the cluster and for the bot
    ray_bin = Path(sys.executable).with_name("ray")
    cluster_env = {**os.environ, "RAY_ADDRESS": "", **auth}
    start = subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2",
                            "--include-dashboard=false", "--object-store-memory=100000000"],
                           env=cluster_env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        on_ray(settings, address=f"127.0.0.1:{port}")
        for user in (ALICE, BOB):
            await make_picks(engine, user)
        night = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "training.rollover"], cwd=ROOT,
                                        env={**_env(settings), **auth}, capture_output=True, text=True, timeout=600)
        assert night.returncode == 0, night.stdout + night.stderr[-3000:]
        assert night.stdout.count(": promoted gen-1") == 2, night.stdout
        assert engine.store.last_run()["executor"] == "ray"
        status = subprocess.run([str(ray_bin), "status", f"--address=127.0.0.1:{port}"], env=cluster_env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr  # still up after the night
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=cluster_env, capture_output=True, timeout=120)


def ray_processes() -> set[int]:
    """Pids of Ray's own daemons and workers on this machine."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"raylet" in command or b"gcs_server" in command or command.startswith(b"ray::"):
                found.add(int(entry.name))
    return found


async def test_a_rollover_killed_mid_night_takes_its_local_ray_with_it(engine, settings):
    """The nightly job stops a rollover that runs too long with SIGKILL: the Ray it started must not outlive it,
    and the next night recovers."""
    on_ray(settings)
    await make_picks(engine, ALICE)
    before = ray_processes()
    slow = {"training": {**settings.training.model_dump(), "epochs": 400}}
    rollover = subprocess.Popen([sys.executable, "-m", "training.rollover"], cwd=ROOT, env=_env(settings, slow),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    folder = lineage_dir(settings, ALICE.id)
    started = False
    for _ in range(1200):  # until a worker trains Alice
        started = folder.exists() and bool(list(folder.glob(".partial-*")))
        if started or rollover.poll() is not None:
            break
        await asyncio.sleep(0.1)
    assert started, rollover.stdout.read().decode()[-2000:]
    ours = ray_processes() - before
    assert ours, "the rollover started no Ray processes"
    rollover.send_signal(signal.SIGKILL)
    rollover.wait()
    for _ in range(1200):  # its daemons at once; its agents notice within about a minute
        if not ours & ray_processes():
            break
        await asyncio.sleep(0.1)
    assert not ours & ray_processes(), "Ray outlived the rollover that started it"
    assert engine.store.last_run()["status"] == "running" and not list(folder.glob("gen-*"))

    [outcome] = await asyncio.to_thread(run_rollover, settings)  # the next night
    assert outcome.status == "promoted" and outcome.number == 1 and not list(folder.glob(".partial-*"))


async def test_a_job_no_machine_could_run_is_refused_with_the_reason(engine, settings):
    """Ray would queue a job that asks for more than any machine has forever; the night says why instead."""
    on_ray(settings, cpus_per_job=64)
    await make_picks(engine, ALICE)
    before = ray_processes()
    with pytest.raises(RuntimeError, match="cpus_per_job = 64, but the largest machine of the Ray cluster has 2 CPUs"):
        await asyncio.to_thread(run_rollover, settings)
    on_ray(settings, cpus_per_job=None, gpus_per_job=0.5)
    with pytest.raises(RuntimeError, match="gpus_per_job = 0.5, but no machine of the Ray cluster has that much GPU"):
        await asyncio.to_thread(run_rollover, settings)
    assert [r["status"] for r in engine.store.db.query("SELECT status FROM rollover_runs")] == ["failed", "failed"]
    assert engine.store.serving(ALICE.id) is None and not ray_processes() - before  # nothing trained; Ray stopped
