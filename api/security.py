"""The ingress's ``security`` settings: API keys, the audit trail (``user_config.security``, live).

API keys are off by default, for a local ``make serve``. One setting turns them on: ``api_keys.required:
true`` with the keys inline (their hashes) or in a file, or the environment variable ``MAAS_API_KEYS_FILE``
naming a key file, which the ingress replicas read at start (``api.keys`` makes the file).
"""

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.keys import MAX_KEYS, ApiKey
from pipelines.privacy import KINDS

KEYS_FILE_ENV = "MAAS_API_KEYS_FILE"


class ApiKeysConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    required: bool = Field(False, description="Every route but health and the API description needs a key.")
    file: str | None = Field(
        None,
        description="A key file (python -m api.keys add), re-read within a second when it changes: a "
        "mounted Kubernetes Secret, say. Absolute, or relative to the replica's working directory.",
    )
    keys: list[ApiKey] = Field(
        default_factory=list, max_length=MAX_KEYS, description="Keys inline: id, sha256, scopes, rate limit."
    )

    @model_validator(mode="after")
    def _from_environment(self) -> "ApiKeysConfig":
        if self.file is None and (path := os.environ.get(KEYS_FILE_ENV)):
            self.file, self.required = path, True
        return self


class AuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="One JSON line per request (api/audit.py says what is in it).")
    dir: str | None = Field(None, description="Where each ingress replica writes its file (default: Ray's logs/serve).")
    max_bytes: int = Field(10_000_000, ge=10_000, le=10_000_000_000, description="A file is rotated at this size.")
    backups: int = Field(5, ge=0, le=1000, description="Rotated files kept.")


class MaskingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["off", "all", "keys"] = Field(
        "off", description="Mask the texts and answers of every request (all), or of API keys with mask: true (keys)."
    )
    kinds: list[Literal["card", "email", "phone", "person"]] = Field(
        default_factory=lambda: list(KINDS), min_length=1, description="What is masked (pipelines/privacy.py)."
    )
    region: str = Field("US", pattern=r"^[A-Z]{2}$", description="Country whose national phone numbers are known.")


class SecurityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_keys: ApiKeysConfig = Field(default_factory=ApiKeysConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
