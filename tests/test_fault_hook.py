"""The test-only fault wrapper (tests/faults.py): its rules, and that nothing of it ships in the service."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from app.engine.preprocessing import PreparedImage
from app.errors import DeviceOutOfMemory, EngineFailure
from app.service.metrics import Metrics
from app.service.scoring import ScoringService
from app.settings import Settings
from tests.faults import FaultRules, FaultyEngine, inject_faults
from tests.service_fakes import FakeEngine


def item(width: int, height: int) -> PreparedImage:
    return PreparedImage(torch.zeros(3, 8, 8), (width, height), bytes([width, height]))


def test_no_hook_ships_the_batcher_calls_the_engine_itself(tmp_path: Path) -> None:
    assert not any(name.startswith(("fault", "inject")) for name in Settings.model_fields)
    assert importlib.util.find_spec("app.service.faults") is None
    fake = FakeEngine()
    service = ScoringService(Settings(profiles_dir=tmp_path), Metrics(), fake)
    assert service.batcher._fn == fake.image_stats  # no wrapper in between


def test_the_wrapper_engine_is_the_real_one_but_for_run(tmp_path: Path) -> None:
    fake = FakeEngine()
    faulty = FaultyEngine(fake, FaultRules.parse("fail=13x17"))
    assert faulty.info == fake.info and faulty.decode == fake.decode
    service = ScoringService(Settings(profiles_dir=tmp_path), Metrics(), faulty)
    with pytest.raises(EngineFailure, match="injected"):
        service.batcher._fn([item(13, 17)])


def test_rules_parse_and_bad_rules_are_refused() -> None:
    rules = FaultRules.parse(" fail=13x17; oom=15x13:2 ;features=11x19:nan;features=9x9:1e300;")
    assert rules.fail == {(13, 17)} and rules.oom == {(15, 13): 2}
    assert math.isnan(rules.features[(11, 19)]) and rules.features[(9, 9)] == 1e300
    assert not FaultRules.parse("") and not FaultRules.parse(" ; ")
    for bad in ("fail=13", "oom=15x13", "oom=15x13:x", "features=9x9", "features=9x9:abc", "explode=1x1"):
        with pytest.raises(ValueError):
            FaultRules.parse(bad)


def test_each_rule_does_what_it_says() -> None:
    fake = FakeEngine()
    run = inject_faults(fake.image_stats, FaultRules.parse("fail=13x17;oom=15x13:2;features=11x19:inf"))
    with pytest.raises(EngineFailure, match="injected"):
        run([item(40, 40), item(13, 17)])
    with pytest.raises(DeviceOutOfMemory):
        run([item(15, 13), item(40, 40), item(40, 40)])
    assert len(run([item(15, 13), item(40, 40)])) == 2  # at the limit: fine
    plain, hit = run([item(40, 40), item(11, 19)])
    assert plain.finite and all(math.isfinite(v) for v in plain.features)
    assert not hit.finite and all(v == math.inf for v in hit.features) and (hit.heatmap == math.inf).all()
