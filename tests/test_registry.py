"""The adapter registry both generators keep their books with: held adapters stay, least recently used
go first, superseded and forgotten generations go once idle. No torch, no model."""

import subprocess
import sys
from pathlib import Path

from bot.serving.interface import AdapterRef
from bot.serving.registry import AdapterRegistry


def ref(name: str) -> AdapterRef:
    return AdapterRef(name, Path("/generations") / name)


def test_least_recently_used_idle_adapters_make_room():
    registry = AdapterRegistry(2)
    for name in ("user-a-gen-1", "user-b-gen-1"):
        registry.add(ref(name))
    registry.touch("user-a-gen-1")
    registry.hold("user-b-gen-1")
    assert registry.make_room(reserve=1) == ["user-a-gen-1"]  # b is older but held
    registry.add(ref("user-c-gen-1"))
    assert registry.make_room(reserve=1) == ["user-c-gen-1"] and registry.names() == ["user-b-gen-1"]
    assert registry.make_room(reserve=2) == [] and len(registry) == 1  # over capacity rather than cut b short


def test_a_newer_generation_retires_the_older_once_its_requests_are_done():
    registry = AdapterRegistry(4)
    registry.add(ref("user-a-gen-1"))
    registry.add(ref("user-aa-gen-1"))  # another lineage, however alike its name
    registry.hold("user-a-gen-1")
    assert registry.add(ref("user-a-gen-2")) == []  # gen-1 still answers a request
    assert registry.release("user-a-gen-1") == ["user-a-gen-1"]
    assert registry.names() == ["user-aa-gen-1", "user-a-gen-2"] and registry.holds() == {}
    assert registry.add(ref("user-a-gen-1")) == []  # an older one loaded again retires nothing ...
    local = AdapterRegistry(4, supersede_newer=True)
    local.add(ref("user-a-gen-2"))
    assert local.add(ref("user-a-gen-1")) == ["user-a-gen-2"]  # ... unless the last one loaded wins


def test_a_forgotten_lineage_goes_as_its_requests_finish():
    registry = AdapterRegistry(4)
    for name in ("user-a-gen-2", "user-a-gen-1", "user-b-gen-1", "plain"):  # gen-1 loaded again for a late reply
        registry.add(ref(name))
    registry.hold("user-a-gen-2")
    registry.hold("user-a-gen-2")
    assert registry.retire_lineage("user-a") == ["user-a-gen-1"]
    assert registry.release("user-a-gen-2") == [] and registry.release("user-a-gen-2") == ["user-a-gen-2"]
    assert registry.names() == ["user-b-gen-1", "plain"]


def test_a_lost_adapter_keeps_its_pending_retirement():
    registry = AdapterRegistry(4)
    registry.add(ref("user-a-gen-1"))
    registry.hold("user-a-gen-1")
    registry.add(ref("user-a-gen-2"))
    registry.discard("user-a-gen-1")  # the server lost it; it is loaded again for the request in flight
    registry.add(ref("user-a-gen-1"))
    assert registry.release("user-a-gen-1") == ["user-a-gen-1"]


def test_serving_interfaces_import_no_torch():
    for module in ("bot.serving", "bot.serving.interface", "bot.serving.registry", "bot.serving.vllm"):
        check = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch'"
        subprocess.run([sys.executable, "-c", check], check=True)
