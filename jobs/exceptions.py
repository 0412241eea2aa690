"""User-facing errors. The CLI turns each into a one-line message and exit code 1."""

from __future__ import annotations


class LLMBatchError(Exception):
    """Base of every error a user is meant to read."""


class InputFileError(LLMBatchError):
    """The input file as a whole cannot be used (empty, too large, not JSONL, --strict failures)."""

    def __init__(self, message: str, line_errors: list[str] | None = None):
        super().__init__(message)
        self.line_errors = line_errors or []

    def __str__(self) -> str:
        head = super().__str__()
        if not self.line_errors:
            return head
        return "\n".join([head, *self.line_errors])


class JobNotFound(LLMBatchError):
    def __init__(self, job_id: str):
        super().__init__(f"no job with id or name {job_id!r}")


class AmbiguousJob(LLMBatchError):
    """A job name that several jobs share: the user must pick one by id."""

    def __init__(self, name: str, matches: list[tuple[str, str, str]]):
        listed = ", ".join(f"{job_id} ({status}, created {created[:19]})" for job_id, status, created in matches)
        super().__init__(f"the name {name!r} matches {len(matches)} jobs: {listed}; give a job id instead")


class DatabaseURLError(LLMBatchError):
    """A database URL that cannot be used: malformed, no driver installed, or a missing directory."""


class InvalidState(LLMBatchError):
    """An operation that the job's current state does not allow (cancel a finished job, ...)."""


class BrokerUnavailable(LLMBatchError):
    """The job is stored but its work could not be queued."""


class FileNotFound(LLMBatchError):
    def __init__(self, file_id: str):
        super().__init__(f"no file with id {file_id!r}")


class FileTooLarge(InputFileError):
    """An upload over LLMBATCH_MAX_FILE_BYTES; nothing of it is kept."""


class StorageQuotaExceeded(FileTooLarge):
    """An upload that would take its key past LLMBATCH_MAX_STORAGE_BYTES_PER_KEY; nothing of it is kept."""


class InvalidRequest(LLMBatchError):
    """An HTTP API request with a missing or wrong parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelUnavailable(LLMBatchError):
    """A model name that is no directory, no bundled alias and no hub model reachable now, or a
    model that failed to load."""
