"""The exception family of fine-tuner.

Every error carries fields (file, row, column, status, ...) and a message that tells the operator
what to do. Messages never contain cell values from a dataset: these are patient records, so an
error names the file, the column, the row number and counts, never the text of a cell.
This module imports nothing from ``daemon``.
"""

from __future__ import annotations


class FineTunerError(Exception):
    """Base of every error fine-tuner raises on purpose.

    ``hint`` says what the user should do; ``error_type`` is the stable name written to
    ``error.json`` and logs.
    """

    default_hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    @property
    def error_type(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict:
        """The error as JSON-ready fields (for error.json and metadata); no cell contents."""
        out = {"error_type": self.error_type, "message": self.message, "hint": self.hint}
        for key in ("file", "row", "column"):
            value = getattr(self, key, None)
            if value is not None:
                out[key] = value
        return out

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


# --- configuration -----------------------------------------------------------------------------

class ConfigError(FineTunerError):
    """The configuration is invalid; ``problems`` lists every problem found (key: what is wrong)."""

    default_hint = "fix the configuration file or the FINE_TUNER_* variables and start again"

    def __init__(self, problems: list[str], *, source: str | None = None, hint: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        # ``hint``: what to do when the problem is not the daemon's configuration (a job file's)
        super().__init__(f"invalid configuration{where}: " + "; ".join(self.problems), hint=hint)


# --- datasets and mappings ---------------------------------------------------------------------

class DatasetError(FineTunerError, ValueError):
    """A dataset or rating mapping cannot be used. Names the file, and the column/row where it applies."""

    default_hint = "fix the input file and drop it again"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        column: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = file
        self.row = row
        self.column = column
        where = []
        if file:
            where.append(file)
        if column:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message, hint=hint)


class EmptyDatasetError(DatasetError):
    """The file is empty, holds only a header, or has no usable rows."""


class DatasetFormatError(DatasetError):
    """The file is not a readable CSV (binary junk, wrong delimiter, bad quoting, too large a cell)."""


class DatasetEncodingError(DatasetError):
    """The file is neither UTF-8 nor cp1252."""

    default_hint = "save the file as UTF-8 (CSV UTF-8 in Excel) and drop it again"


class MissingColumnError(DatasetError):
    """A required column is absent; the message suggests the closest column name."""


class InvalidRatingError(DatasetError):
    """Ratings are not integers."""


class UnmappedRatingError(DatasetError):
    """Ratings appear that the rating mapping does not contain (each value and its count are named)."""


class LabelRatingMismatchError(DatasetError):
    """Rows whose ``Expert Rating`` label has another rating in the given mapping than their own
    ``Standardized_Rating``: the training target of those rows is unknown (their numbers are named)."""

    default_hint = ("fix the Standardized_Rating or the Expert Rating of those rows (or the mapping, if it "
                    "is the wrong one) and drop the files again")


class MappingError(DatasetError):
    """The rating mapping file or object is invalid, or cannot be inferred."""

    default_hint = "fix the mapping file (labels as keys, integer ratings as values) and drop it again"


# --- the seed's errors -------------------------------------------------------------------------

class DatasetTooSmallWarning(UserWarning):
    """The dataset has fewer usable rows than recommended for fine-tuning (50).

    Warned normally; raised when fallback is off and no other approach is allowed, so it carries
    the same ``hint``/``to_dict`` as the errors above.
    """

    hint = "add rows (50 or more are recommended), or allow the model-set fallback"
    error_type = "DatasetTooSmallWarning"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def to_dict(self) -> dict:
        return {"error_type": self.error_type, "message": self.message, "hint": self.hint}


class FineTuningNotSupportedError(FineTunerError):
    """The model, its weights or this machine cannot be fine-tuned; ``report`` says which check failed."""

    default_hint = "use approach 'model_set', or enable fallback, or fix the failed checks"

    def __init__(self, message: str, *, report: object | None = None, hint: str | None = None) -> None:
        self.report = report
        super().__init__(message, hint=hint)


class GGUFFormatError(FineTunerError, ValueError):
    """A GGUF file that cannot be read: not a GGUF, cut short, or past the reader's limits. ``file``
    names it and ``offset`` is where reading stopped."""

    default_hint = ("the GGUF file is damaged or incomplete: pull the model again (ollama pull), or name "
                    "another .gguf file under base_models:")

    def __init__(self, message: str, *, file: str, offset: int | None = None, hint: str | None = None) -> None:
        self.file = file
        self.offset = offset
        super().__init__(message, hint=hint)


class TrainingFailedError(FineTunerError):
    """The trainer child failed: non-zero exit, signal or timeout. Its stderr log stays in the job folder."""

    default_hint = "read the trainer's stderr log named in this error; fix the cause and resubmit"

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        stderr_path: str | None = None,
        timed_out: bool = False,
        hint: str | None = None,
    ) -> None:
        self.exit_code = exit_code
        self.stderr_path = stderr_path
        self.timed_out = timed_out
        super().__init__(message, hint=hint)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(exit_code=self.exit_code, stderr_path=self.stderr_path, timed_out=self.timed_out)
        return out


class TrainingInterruptedError(FineTunerError):
    """Training was stopped because the service is shutting down; the job goes back to the queue."""

    default_hint = "the job is retried when the service starts again"


class JournalError(FineTunerError):
    """The job journal (SQLite) cannot be opened, read or written.

    ``path`` is the journal file, ``reason`` the short cause (SQLite's message such as "database or
    disk is full" or "database disk image is malformed", or the OS error's text): it describes the
    file, never a row. ``disk_full`` tells a full disk (retry later) from a damaged, locked or
    read-only file (an operator must act; ``hint`` says how).
    """

    default_hint = ("move the damaged journal file aside, with its -wal and -shm files if any; the service "
                    "then starts with a new, empty journal")

    def __init__(self, message: str, *, path: str | None = None, reason: str | None = None,
                 disk_full: bool = False, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path
        self.reason = reason
        self.disk_full = disk_full

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(path=self.path, reason=self.reason, disk_full=self.disk_full)
        return out


class JobControlError(FineTunerError):
    """A command on a job (``status JOB_ID``, ``cancel``, ``retry``, ``promote``) cannot be done: no
    such job, or the job is not in a state that allows it. ``job_id`` names it."""

    def __init__(self, message: str, *, job_id: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.job_id = job_id


class EvaluationError(FineTunerError):
    """The job's models could not be evaluated and ``evaluation.enabled`` is ``required``."""

    default_hint = "make a backend available (Ollama, or the base weights on disk), or set evaluation.enabled: auto"


class RaterError(FineTunerError, RuntimeError):
    """A rating backend could not answer (the server failed, the child died). The message names no data."""


class ModelSetConfigError(FineTunerError):
    """The model set configuration could not be created."""


# --- Ollama ------------------------------------------------------------------------------------

class OllamaError(FineTunerError):
    """An Ollama call failed. ``status`` is the HTTP status (None when no response came back),
    ``server_error`` the server's ``error`` text."""

    default_hint = "check that Ollama is running and reachable at the configured host"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        server_error: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.status = status
        self.server_error = server_error
        super().__init__(message, hint=hint)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(status=self.status, server_error=self.server_error)
        return out


class OllamaUnavailableError(OllamaError):
    """No answer from the server: connection refused, reset or timed out."""


class RegistrationError(OllamaError):
    """A model was built but could not be registered in Ollama (or failed its check afterwards)."""


class AdapterRefusedError(RegistrationError):
    """Ollama would not create a model from base + adapter: the create was refused (400, or an
    error line such as ``unsupported architecture``), or the created model shows no ADAPTER."""


# --- OpenAI-compatible servers -----------------------------------------------------------------

class OpenAIError(FineTunerError):
    """A call to the OpenAI-compatible server at ``openai.base_url`` failed. ``status`` is the HTTP
    status (None when no answer came back). The message never holds the server's error text (a
    server may repeat the request, records included) nor the API key."""

    default_hint = "check that the server at openai.base_url is running and serves the model"

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None) -> None:
        self.status = status
        super().__init__(message, hint=hint)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["status"] = self.status
        return out
