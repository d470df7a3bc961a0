"""What the routes are given: the dataplane, admission and live settings, as FastAPI dependencies.

``app.build_app`` puts them on ``app.state``; a route asks for them by type, so a unit test builds the app
with fakes and no Ray.
"""

import contextlib
import functools
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from api.policy import ROUTES, Matcher
from deployments.admission import Admission
from pipelines.dataplane import Dataplane


@dataclass
class ApiSettings:
    """The ingress's live settings that routes read per request (its ``user_config`` sets them)."""

    request_timeout_s: float = 30.0
    readiness_timeout_s: float = 2.0
    generation_timeout_s: float = 300.0

    def timeout_for(self, path: str) -> float:
        """A request's timeout: the routes whose policy says ``long`` (language-model answers stream, audio takes
        its length to hear or say) get ``generation_timeout_s``, the rest ``request_timeout_s``."""
        return self.generation_timeout_s if _long_routes().match(path) else self.request_timeout_s


@functools.cache
def _long_routes() -> Matcher:
    return Matcher(ROUTES.long_routes())  # first asked while serving: every router has declared its routes


class RouteAdmission:
    """The ingress's admission as a route sees it: a request is admitted against its route's count (the one its
    policy names)."""

    def __init__(self, admission: Admission):
        self.admission = admission

    def slot(self, request: Request) -> contextlib.AbstractContextManager[None]:
        """Hold one of the request's route's slots for the block, or raise ``Overloaded`` if none is free."""
        return self.admission.slot(ROUTES.admission_key(request.scope["route"].path))


def _dataplane(request: Request) -> Dataplane:
    return request.app.state.dataplane


def _admission(request: Request) -> RouteAdmission:
    return RouteAdmission(request.app.state.admission)


def _settings(request: Request) -> ApiSettings:
    return request.app.state.settings


DataplaneDep = Annotated[Dataplane, Depends(_dataplane)]
AdmissionDep = Annotated[RouteAdmission, Depends(_admission)]
SettingsDep = Annotated[ApiSettings, Depends(_settings)]
