"""Calling the model deployments from the ingress: within the request's deadline, retried where it is safe.

Every model call is idempotent (classify, embed, fuse: same input, same
answer), so a call that fails because its replica stopped (a node lost, a
replica replaced) is made again, on another replica, while the request's
deadline allows. A call that waits for a replica (none running yet, or all
busy with their queues full) waits at most until that deadline. What still
cannot be served becomes an API error with its status: ``503`` with
``Retry-After``, never a ``500`` and never a request that outlives the HTTP
proxy's timeout.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.errors import MaasError, ModelUnavailable, Overloaded

logger = logging.getLogger("ray.serve")

T = TypeVar("T")

# Attempts of one request's model calls when a replica stops under it.
ATTEMPTS = 3
RETRY_BACKOFF_S = 0.1
# The answer has to reach the HTTP proxy before the proxy's own timeout.
RESPONSE_MARGIN_S = 1.0
# A deployment that needs every part of its work from one version of another model (fusion's class names,
# the explainer's text variants) asks again this often when a replica of another version answers.
SAME_VERSION_ATTEMPTS = 20
SAME_VERSION_RETRY_S = 0.05


class Deadline:
    """The moment by which a request must be answered (monotonic clock)."""

    def __init__(self, timeout_s: float):
        self.at = time.monotonic() + max(0.0, timeout_s - RESPONSE_MARGIN_S)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())


def api_error(exc: BaseException) -> MaasError | None:
    """The API error a failed model call stands for, or None for a bug (a 500, logged).

    Unwraps ``RayTaskError`` (an exception raised in a replica, or in resolving
    the arguments of a call that took another call's response).
    """
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException) and exc.cause is not exc:
        return api_error(exc.cause)
    if isinstance(exc, MaasError):
        return exc
    if isinstance(exc, BackPressureError):
        return Overloaded(
            "the model deployments' queues are full; retry later", retry_after_s=max(1, round(exc.retry_after_s or 1))
        )
    if isinstance(exc, DeploymentUnavailableError):
        return ModelUnavailable("a model deployment this request needs is not available; retry later")
    if isinstance(exc, RayActorError):
        return ModelUnavailable("a model replica stopped while serving this request; retry", retryable=True)
    return None


async def call_models(work: Callable[[], Awaitable[T]], deadline: Deadline) -> T:
    """Run ``work`` (a fresh set of model calls each time it is called) and return its result.

    Retries when a replica stopped under it, and gives up with ``ModelUnavailable``
    when the deadline passes first.
    """
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await asyncio.wait_for(work(), timeout=deadline.remaining())
        except TimeoutError:
            raise ModelUnavailable(
                "no model replica answered within the request's deadline; the service may be starting, "
                "updating or overloaded: retry"
            ) from None
        except Exception as exc:  # noqa: BLE001 - sorted into API errors and bugs below
            error = api_error(exc)
            if error is None:
                raise
            if not getattr(error, "retryable", False) or attempt == ATTEMPTS or deadline.remaining() <= 0:
                raise error from None
            logger.warning(
                "Model call failed (%s); retrying, attempt %d of %d", type(exc).__name__, attempt + 1, ATTEMPTS
            )
            await asyncio.sleep(min(RETRY_BACKOFF_S * attempt, deadline.remaining()))
    raise AssertionError("unreachable")
