"""The exception types for failures that end a command with one line instead of a traceback.

Anything raised as `UserError` reaches the terminal as a single line
(`sg2dist: error: ...`) with no traceback, so its message must name the thing
that is wrong and say how to fix it. The exit code tells a scheduler (a Kubernetes
Job) whether running the command again can help: `UserError` exits 2 (fatal: fix the
input first), `TemporaryError` exits 75 (retry: an outage or a lost peer, not a
mistake).
"""

EXIT_USER_ERROR = 2
# EX_TEMPFAIL from sysexits.h: "try again later". The Kubernetes Job retries it (only 2 fails
# the Job at once), and a retried pod resumes from the run's latest checkpoint.
EXIT_RETRYABLE = 75


class UserError(Exception):
    """A problem the user caused and can fix (bad config, missing file, bad credentials)."""

    exit_code = EXIT_USER_ERROR


class TemporaryError(UserError):
    """A failure that waiting may fix (object storage unreachable, a peer process that stopped
    answering); the command exits EXIT_RETRYABLE so that the Job runs it again."""

    exit_code = EXIT_RETRYABLE
