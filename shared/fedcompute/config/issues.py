"""Config problems: one :class:`ConfigIssue` per semantic problem, two exception types.

- :class:`ConfigSyntaxError`: the text does not parse (bad token, unknown field or enum
  value, malformed JSON). Raised at the first problem, with ``file:line:col``.
- :class:`ConfigValidationError`: the config parses but breaks rules; carries *every*
  problem found as ``issues``.

Both subclass :class:`fedcompute.errors.ConfigError` (HTTP 400, CLI exit 2).
"""
from __future__ import annotations

from dataclasses import dataclass

from fedcompute.errors import ConfigError

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config.

    ``path`` is the proto field path (``federated_learning.learning_process.metrics[1].name``).
    ``line`` is the 1-based line of that field (or of its closest written ancestor when the
    field itself is missing), None when the config did not come from text.
    """

    path: str
    message: str
    fix: str | None = None
    severity: str = ERROR
    line: int | None = None
    source: str | None = None

    @property
    def location(self) -> str:
        """``source:line: path`` with the parts that are known."""
        head = ":".join(str(part) for part in (self.source, self.line) if part is not None)
        return f"{head}: {self.path}" if head else self.path

    def __str__(self) -> str:
        text = f"{self.location}: {self.message}"
        return f"{text} (fix: {self.fix})" if self.fix else text

    def to_error(self) -> ConfigError:
        return ConfigError(self.message, location=self.location, hint=self.fix)


class ConfigSyntaxError(ConfigError):
    """The config text cannot be parsed.

    Attributes: ``source``, ``line``/``column`` (1-based, None when unknown), ``token``
    (the offending field name or value), ``suggestion`` (closest valid name or None),
    ``path`` (proto field path, or JSON path ``$.a.b`` for JSON input).
    """

    def __init__(
        self,
        message: str,
        *,
        source: str,
        line: int | None = None,
        column: int | None = None,
        token: str | None = None,
        suggestion: str | None = None,
        path: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.source = source
        self.line = line
        self.column = column
        self.token = token
        self.suggestion = suggestion
        self.path = path
        location = ":".join(str(p) for p in (source, line, column) if p is not None)
        if hint is None and suggestion is not None:
            hint = f'did you mean "{suggestion}"?'
        super().__init__(message, location=location, hint=hint)


class ConfigValidationError(ConfigError):
    """The config parsed but is invalid. ``issues`` holds every error (never warnings)."""

    def __init__(self, issues: list[ConfigIssue] | tuple[ConfigIssue, ...], *, source: str | None = None) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        self.source = source
        count = len(self.issues)
        header = f"{count} error{'s' if count != 1 else ''} in task config {source or ''}".rstrip()
        super().__init__(header + ":\n" + "\n".join(f"  {issue}" for issue in self.issues))
