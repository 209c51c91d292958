"""What a fault scenario returns: its figures, each checked against its target.

``Result`` is the base of every scenario's result dataclass: ``checks()`` pairs each figure with
its target (the product's promise), ``summary()`` prints them and ``assert_ok()`` fails naming every
missed one. ``fraction`` and ``seconds_text`` format figures; ``iter_checks`` walks a run's results.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class Check:
    """One figure against its target."""

    figure: str
    value: str
    target: str
    ok: bool


@dataclass(kw_only=True)
class Result:
    """What a scenario measured; subclasses add the figures and say how they are judged."""

    scenario: ClassVar[str]
    size: int
    notes: list[str] = field(default_factory=list)
    log_dir: Path | None = None

    def checks(self) -> list[Check]:
        """Every figure with its target."""
        raise NotImplementedError

    def summary(self) -> str:
        """Every figure against its target, one per line."""
        return "\n".join(f"{'pass' if c.ok else 'FAIL'}  {c.figure}: {c.value} (target {c.target})"
                         for c in self.checks())

    def assert_ok(self) -> None:
        """Fail naming every missed target, with the notes and where the worker logs are."""
        missed = [c for c in self.checks() if not c.ok]
        if missed:
            lines = [f"{self.scenario} (size {self.size}): {c.figure} = {c.value}, target {c.target}" for c in missed]
            lines += [*self.notes[:15], f"worker logs: {self.log_dir}"]
            raise AssertionError("\n".join(lines))


def fraction(part: int, whole: int) -> str:
    return f"{part}/{whole}"


def seconds_text(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def iter_checks(results: Sequence[Result]) -> Iterator[tuple[Result, Check]]:
    """Every check of every result, in order."""
    for result in results:
        for check in result.checks():
            yield result, check
