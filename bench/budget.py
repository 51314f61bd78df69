"""Wall-clock budgets: a whole run and its sections, so a campaign fits its window and records what it skipped."""

from __future__ import annotations

import time


class Budget:
    """``total_s`` for the run (None: unlimited); :meth:`section` opens a sub-budget capped by what is left."""

    def __init__(self, total_s: float | None = None, log=print):
        self.start = time.monotonic()
        self.deadline = None if total_s is None else self.start + total_s
        self.log = log
        self.sections: dict[str, dict] = {}

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def section(self, name: str, budget_s: float | None) -> "Section":
        return Section(self, name, budget_s)


class Section:
    def __init__(self, parent: Budget, name: str, budget_s: float | None):
        self.parent, self.name = parent, name
        self.start = time.monotonic()
        cap = parent.left()
        self.budget_s = cap if budget_s is None else min(budget_s, cap)
        self.deadline = self.start + self.budget_s
        self.skipped: list[str] = []
        parent.sections[name] = dict(budget_s=None if self.budget_s == float("inf") else round(self.budget_s, 1))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, want: float | None = None) -> float:
        """Seconds a sub-task may take: what is left, capped by ``want``."""
        left = self.left()
        return left if want is None else min(want, left)

    def has(self, seconds: float = 1.0) -> bool:
        return self.left() >= seconds

    def skip(self, what: str, why: str = "section time budget spent") -> None:
        self.skipped.append(f"{what}: {why}")
        self.parent.log(f"  skipped {what}: {why}")

    def __enter__(self):
        self.parent.log(
            f"== {self.name} (budget {self.budget_s:.0f} s)" if self.budget_s != float("inf") else f"== {self.name}"
        )
        return self

    def __exit__(self, exc_type, exc, tb):
        rec = self.parent.sections[self.name]
        rec.update(used_s=round(time.monotonic() - self.start, 1), skipped=self.skipped)
        if exc is not None and exc_type is not KeyboardInterrupt:
            rec["error"] = f"{exc_type.__name__}: {exc}"[:400]
            self.parent.log(f"  section {self.name} failed: {rec['error']}")
            return True  # one broken section must not lose the others' results
        return False
