"""attnc's error types: data (message, span, notes) rendered in one place with file:line:col and a caret."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Span:
    """A source position: file name, 1-based line and column, and the text of that line."""

    file: str
    line: int
    column: int
    source_line: str = ""
    end_column: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class AttncError(Exception):
    """Base of every error attnc raises on purpose; carries a message, an optional span and notes."""

    kind = "error"

    def __init__(self, message: str, span: Span | None = None, notes: tuple[str, ...] = ()):
        self.message = message
        self.span = span
        self.notes = tuple(notes)
        super().__init__(self.render())

    def render(self) -> str:
        """Render as `file:line:col: kind: message`, the source line, a caret and notes."""
        return render(self.kind, self.message, self.span, self.notes)


def render(kind: str, message: str, span: Span | None, notes: tuple[str, ...] = ()) -> str:
    """Format a diagnostic the way compilers do: location, message, source line with a caret."""
    out = []
    if span is None:
        out.append(f"{kind}: {message}")
    else:
        out.append(f"{span}: {kind}: {message}")
        if span.source_line:
            text = span.source_line.rstrip("\n")
            out.append(f"    {text}")
            width = 1
            if span.end_column is not None and span.end_column > span.column:
                width = span.end_column - span.column
            out.append("    " + " " * (span.column - 1) + "^" * width)
    out.extend(f"  note: {n}" for n in notes)
    return "\n".join(out)


class ParseError(AttncError):
    """The `.attn` text does not follow the grammar."""

    kind = "parse error"


class VerifyError(AttncError):
    """The IR is well formed text but breaks a typing, dim or structure rule."""

    kind = "verify error"


class TraceError(AttncError):
    """The Python DSL was used in a way that cannot be traced into IR."""

    kind = "trace error"


class LoweringError(AttncError):
    """The IR (or the requested variant) cannot be lowered to WGSL for the given plan."""

    kind = "lowering error"


class UsageError(AttncError):
    """A command line, option value or file that attnc cannot use (missing, unreadable, unwritable)."""

    kind = "error"


class DeviceError(AttncError):
    """No suitable WebGPU adapter, or the adapter lacks a requested capability."""

    kind = "device error"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """A rendered-later diagnostic used where several problems are collected before raising."""

    message: str
    span: Span | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
