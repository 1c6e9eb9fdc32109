"""Exception classes for tun2 error values, with the Go package's messages.

The Go package exposes sentinel errors (`ErrNoSuchBackend`, ...); Python code
catches classes instead, so each becomes one, keeping the message text that
operators may already grep their logs for.
"""


class Tun2Error(Exception):
    """Base class of every tun2g error."""


class CantOpenSessionStream(Tun2Error):
    def __init__(self, detail: str = ""):
        super().__init__(_with_detail("tun2: connection can't open session stream", detail))


class CantWriteRequest(Tun2Error):
    def __init__(self, detail: str = ""):
        super().__init__(_with_detail("tun2: connection stream can't write request", detail))


class CantReadResponse(Tun2Error):
    def __init__(self, detail: str = ""):
        super().__init__(_with_detail("tun2: connection stream can't read response", detail))


class NoSuchBackend(Tun2Error, LookupError):
    def __init__(self, backend_id: str = ""):
        super().__init__(_with_detail("tun2: there is no such backend", backend_id))


class AuthMismatch(Tun2Error):
    """The Auth a client sent does not match the stored tokens and routes.

    `reason` is what the client is told; `log_reason` (default: the same) is the
    whole story for the server log, e.g. which check failed behind "invalid token".
    """

    def __init__(self, reason: str, log_reason: str | None = None):
        super().__init__(f"tun2: authenication doesn't match database records: {reason}")
        self.reason = reason
        self.log_reason = log_reason or reason


class CantRemoveWhatDoesntExist(Tun2Error):
    def __init__(self, detail: str = ""):
        super().__init__(_with_detail("tun2: this connection does not exist, cannot remove it", detail))


class ConfigurationError(Tun2Error, ValueError):
    """A Server or Client was given an unusable configuration."""


class SetupError(Tun2Error):
    """Starting failed for a reason outside the code (a port in use, a file that cannot be read).

    The message names the setting (the flag, for the command line) and the fix.
    """


def _with_detail(message: str, detail: str) -> str:
    return f"{message}: {detail}" if detail else message
