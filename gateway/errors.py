"""Every error the gateway answers with, as one tree.

    GatewayError                      500 internal_error
    ├── InvalidRequest                400 invalid_request
    ├── Unauthorized                  401 unauthorized
    ├── Forbidden                     403 forbidden
    ├── SandboxNotFound               404 sandbox_not_found
    ├── PreviewNotFound               404 preview_not_found
    ├── ShareNotFound                 404 share_not_found
    ├── ProcessNotFound               404 process_not_found
    ├── RequestTimeout                408 request_timeout
    ├── SandboxNotRunning             409 sandbox_not_running
    │   └── SandboxPaused                 sandbox_paused
    ├── ProjectExists                 409 project_exists
    ├── TooManyShares                 409 too_many_shares
    ├── PayloadTooLarge               413 payload_too_large
    ├── UnsupportedMediaType          415 unsupported_media_type
    ├── TooManyRequests               429 too_many_requests
    ├── DiskFailed                    500 disk_error
    ├── DockerFailed                  502 docker_error
    │   ├── SandboxStartFailed            sandbox_start_failed
    │   └── ProjectFailed                 project_failed
    ├── AgentFailed                   the agent's code: bad_request, spawn_failed, bad_path 400,
    │                                 forbidden 403, not_found 404, conflict, exists, not_empty,
    │                                 not_a_folder, is_a_folder 409, precondition_failed 412,
    │                                 too_large 413, too_many 429, no_space 507, else 502
    └── ServiceUnavailable            503
        ├── AgentUnavailable              agent_unavailable
        ├── CapacityExhausted             capacity_exhausted
        ├── DockerUnavailable             docker_unavailable
        ├── DatabaseUnavailable           database_unavailable
        ├── HostMisconfigured             host_misconfigured
        ├── EgressNotEnforced             egress_not_enforced
        ├── TooManyConnections            too_many_connections
        ├── DiskQuotaUnavailable          disk_quota_unavailable
        └── HostDiskLow                   host_disk_low

Adapters raise these from foreign errors (``raise DockerUnavailable(...) from err``); the error
middleware turns them into ``{"error": {"code", "message"}}``.
"""

from typing import ClassVar


class GatewayError(Exception):
    status = 500
    code = "internal_error"
    default_message = "the gateway failed"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)

    @property
    def headers(self) -> dict[str, str]:
        """Response headers that go with the error."""
        return {}


class InvalidRequest(GatewayError):
    status = 400
    code = "invalid_request"


class Unauthorized(GatewayError):
    status = 401
    code = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class SandboxNotFound(GatewayError):
    status = 404
    code = "sandbox_not_found"


class PreviewNotFound(GatewayError):
    """A host under the preview domain that names no sandbox (malformed, or nobody's label)."""

    status = 404
    code = "preview_not_found"


class ShareNotFound(GatewayError):
    status = 404
    code = "share_not_found"


class ProcessNotFound(GatewayError):
    """No process of that id in the caller's own sandbox (another user's ids are not found either)."""

    status = 404
    code = "process_not_found"


class RequestTimeout(GatewayError):
    status = 408
    code = "request_timeout"

    @property
    def headers(self) -> dict[str, str]:
        # What is left of the request on the connection cannot be told from the next one.
        return {"Connection": "close"}


class SandboxNotRunning(GatewayError):
    status = 409
    code = "sandbox_not_running"
    default_message = "your sandbox is not running; start it with POST /api/sandbox"


class SandboxPaused(SandboxNotRunning):
    code = "sandbox_paused"
    default_message = (
        "your sandbox is paused (docker pause, by whoever runs this gateway): nothing in it can run until"
        " it is unpaused; stopping it with DELETE /api/sandbox keeps your files"
    )


class ProjectExists(GatewayError):
    status = 409
    code = "project_exists"


class TooManyShares(GatewayError):
    status = 409
    code = "too_many_shares"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    code = "unsupported_media_type"


class TooManyRequests(GatewayError):
    status = 429
    code = "too_many_requests"

    def __init__(self, message: str | None = None, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class DiskFailed(GatewayError):
    """Setting up, mounting or removing a user's filesystem failed (disks.py)."""

    code = "disk_error"


class DockerFailed(GatewayError):
    status = 502
    code = "docker_error"


class SandboxStartFailed(DockerFailed):
    code = "sandbox_start_failed"


class ProjectFailed(DockerFailed):
    code = "project_failed"


class AgentFailed(GatewayError):
    """The sandbox's agent refused an operation (agent.py): its code, and the status that goes with it."""

    status = 502
    code = "agent_error"
    STATUS_OF: ClassVar[dict[str, int]] = {
        "bad_request": 400,
        "spawn_failed": 400,
        "not_found": 404,
        "conflict": 409,
        "too_many": 429,
        # The files operations (sandbox-image/agent/sandbox_agent/files_worker.py).
        "exists": 409,
        "not_empty": 409,
        "not_a_folder": 409,
        "is_a_folder": 409,
        "forbidden": 403,
        "bad_path": 400,
        "too_large": 413,
        "precondition_failed": 412,
        "no_space": 507,
    }

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = self.STATUS_OF.get(code, 502)


class ServiceUnavailable(GatewayError):
    status = 503
    code = "service_unavailable"


class AgentUnavailable(ServiceUnavailable):
    """The sandbox runs, but its agent cannot be reached or broke off: it is restarting or was killed."""

    code = "agent_unavailable"


class CapacityExhausted(ServiceUnavailable):
    code = "capacity_exhausted"


class DockerUnavailable(ServiceUnavailable):
    code = "docker_unavailable"


class HostMisconfigured(ServiceUnavailable):
    """The host lacks what the settings ask for (the sandbox runtime, lxcfs); the message says what."""

    code = "host_misconfigured"


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"


class EgressNotEnforced(ServiceUnavailable):
    """The kernel rules that SANDBOX_NETWORK_MODE needs are missing or wrong: no sandbox starts
    until they are back (egress.py)."""

    code = "egress_not_enforced"


class TooManyConnections(ServiceUnavailable):
    """A connection refused as it comes (connections.py): the front door writes it, then closes."""

    code = "too_many_connections"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1", "Connection": "close"}


class DiskQuotaUnavailable(ServiceUnavailable):
    """Disk quotas are on, and this gateway cannot mount filesystems where the engine sees them."""

    code = "disk_quota_unavailable"


class HostDiskLow(ServiceUnavailable):
    """The host's free disk is below SANDBOX_MIN_FREE_DISK_MB: no more sandboxes until it is freed."""

    code = "host_disk_low"
