"""What the routes are given: the dataplane, admission and live settings, as FastAPI dependencies.

``app.build_app`` puts them on ``app.state``; a route asks for them by type, so a unit test builds the app
with fakes and no Ray.
"""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from deployments.admission import GENERATION_PATHS, Admission
from pipelines.dataplane import Dataplane


@dataclass
class ApiSettings:
    """The ingress's live settings that routes read per request (its ``user_config`` sets them)."""

    request_timeout_s: float = 30.0
    readiness_timeout_s: float = 2.0
    generation_timeout_s: float = 300.0

    def timeout_for(self, path: str) -> float:
        """A request's timeout: language-model answers stream for longer than other requests take."""
        return self.generation_timeout_s if path in GENERATION_PATHS else self.request_timeout_s


def _dataplane(request: Request) -> Dataplane:
    return request.app.state.dataplane


def _admission(request: Request) -> Admission:
    return request.app.state.admission


def _settings(request: Request) -> ApiSettings:
    return request.app.state.settings


DataplaneDep = Annotated[Dataplane, Depends(_dataplane)]
AdmissionDep = Annotated[Admission, Depends(_admission)]
SettingsDep = Annotated[ApiSettings, Depends(_settings)]
