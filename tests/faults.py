"""Deterministic engine faults for the live reliability tests: a wrapper around the real engine, never
shipped (the test entry point ``python -m tests.fault_server`` serves with it; tests/conftest.py starts it
when a test sets ``DDM_TEST_FAULTS``).

``DDM_TEST_FAULTS`` is a ``;``-separated list of rules.
Each rule picks images by their source size (width x height as uploaded, after EXIF orientation), so a
test decides which batch misbehaves by what it uploads, through the real HTTP path and the real model:

* ``fail=WxH`` - a batch holding a WxH image raises :class:`EngineFailure` (the whole batch fails).
* ``oom=WxH:S`` - a batch of more than S images holding a WxH image raises :class:`DeviceOutOfMemory`
  (what CUDA would do), so the batcher splits it.
* ``features=WxH:X`` - WxH images are computed normally, then their features, step statistics and heat
  map (and the grids profiles derive other features from) are replaced by the float ``X`` (``nan``,
  ``inf``, ``-inf``, ``1e300``, ...).

:func:`inject_faults` wraps the engine's ``run`` between the batcher and the engine; the engine itself
(the science) is untouched. :class:`FaultyEngine` is the real engine with that ``run``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.engine.preprocessing import PreparedImage
from app.engine.types import ImageStats
from app.errors import DeviceOutOfMemory, EngineFailure

Run = Callable[[Sequence[PreparedImage]], list[ImageStats]]
_RULE = re.compile(r"(fail|oom|features)=(\d+)x(\d+)(?::(\S+))?")


@dataclass(frozen=True)
class FaultRules:
    fail: frozenset[tuple[int, int]] = frozenset()
    oom: dict[tuple[int, int], int] = field(default_factory=dict)  # size -> largest batch that works
    features: dict[tuple[int, int], float] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> FaultRules:
        fail: set[tuple[int, int]] = set()
        oom: dict[tuple[int, int], int] = {}
        features: dict[tuple[int, int], float] = {}
        for raw in spec.split(";"):
            rule = raw.strip()
            if not rule:
                continue
            match = _RULE.fullmatch(rule)
            if match is None:
                raise ValueError(
                    f"fault injection rule {rule!r}: expected fail=WxH, oom=WxH:S or features=WxH:X"
                )
            kind, size, arg = match.group(1), (int(match.group(2)), int(match.group(3))), match.group(4)
            if kind == "fail" and arg is None:
                fail.add(size)
            elif kind == "oom" and arg is not None and arg.isdigit():
                oom[size] = int(arg)
            elif kind == "features" and arg is not None:
                features[size] = float(arg)
            else:
                raise ValueError(f"fault injection rule {rule!r}: bad argument")
        return cls(frozenset(fail), oom, features)

    def __bool__(self) -> bool:
        return bool(self.fail or self.oom or self.features)


def inject_faults(run: Run, rules: FaultRules) -> Run:
    """``run`` with the rules applied (see the module docstring)."""

    def faulty(batch: Sequence[PreparedImage]) -> list[ImageStats]:
        sizes = [tuple(p.source_size) for p in batch]
        if any(s in rules.fail for s in sizes):
            raise EngineFailure(f"injected engine failure on a batch of {len(batch)}")
        for size, largest in rules.oom.items():
            if size in sizes and len(batch) > largest:
                raise DeviceOutOfMemory(f"injected device out of memory on a batch of {len(batch)}")
        out = run(batch)
        return [_replaced(s, rules.features[size]) if size in rules.features else s
                for s, size in zip(out, sizes, strict=True)]  # fmt: skip

    return faulty


def _replaced(stats: ImageStats, value: float) -> ImageStats:
    def fill(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.full(a.shape, value, dtype=a.dtype)

    # everything the engine measured: a profile derives its own features from the sums and grids too
    return dataclasses.replace(
        stats,
        features=fill(stats.features),
        step_sums=fill(stats.step_sums),
        delta_sums=fill(stats.delta_sums),
        heatmap=fill(stats.heatmap),
        step_grid=fill(stats.step_grid),
        delta_grid=fill(stats.delta_grid),
        embeddings=fill(stats.embeddings),
        finite=bool(np.isfinite(value)),
    )


class FaultyEngine:
    """The real engine (loading, decoding, the model) with ``image_stats`` passed through the rules; all else
    is the wrapped engine's own (``create_app(settings, engine=FaultyEngine(real, rules))``)."""

    def __init__(self, engine: Any, rules: FaultRules) -> None:
        self._engine = engine
        self.image_stats = inject_faults(engine.image_stats, rules)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)
