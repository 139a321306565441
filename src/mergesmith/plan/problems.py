"""Problems and warnings found while planning, collected so that all are reported at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from mergesmith.errors import MergeError


@dataclass
class Findings:
    problems: list[MergeError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    def problem(self, message: str, hint: str | None = None, key: str | None = None) -> None:
        """Record a problem once: thousands of tensors can share one mistake (`key`)."""
        dedupe = key or message
        if dedupe not in self._seen:
            self._seen.add(dedupe)
            self.problems.append(MergeError(message, hint))

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
