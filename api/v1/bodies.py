"""Request bodies of the ``/v1`` routes: JSON, or a multipart form where a route takes an image file."""

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from api.body import check_declared_length, read_bytes
from api.v1 import schemas
from deployments.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from deployments.settings import limits

Model = TypeVar("Model", bound=BaseModel)

JSON = "application/json"
MULTIPART = "multipart/form-data"


class StrictMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, but a text field that is not valid in its charset is refused.

    Starlette falls back to Latin-1 for such fields, which would silently turn a
    client's broken UTF-8 into other text.
    """

    spool_max_size = limits().max_request_bytes  # uploads stay in memory: no request's data touches the disk

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset)
            except (UnicodeDecodeError, LookupError):
                raise InvalidInput(f"form field is not valid {self._charset} text", field=part.field_name) from None
        super().on_part_end()


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, model: type[Model], multipart: bool = False) -> tuple[Model, bytes | None]:
    """Parse and validate a JSON body, or a multipart form where the route allows one.

    Returns the validated request and, for a multipart upload, the raw image bytes.
    """
    check_declared_length(request)
    kind = content_type(request)
    if kind == JSON:
        return model.model_validate_json(await read_bytes(request), strict=True), None
    if kind == MULTIPART and multipart:
        body, files = await read_form(request, model, {"image": limits().max_image_bytes})
        return body, files.get("image")
    accepted = f"{JSON} or {MULTIPART}" if multipart else JSON
    raise UnsupportedMediaType(f"Content-Type must be {accepted}")


LISTS = {"labels": "labels", "texts": "texts", "concepts": "concepts"}
"""Form fields that may repeat, each value an item of a list field (form name -> field)."""


async def read_form(
    request: Request, model: type[Model], files: dict[str, int], lists: dict[str, str] = LISTS
) -> tuple[Model, dict[str, bytes]]:
    """A multipart form validated as ``model``, and its files: at most one per field of ``files`` (field name ->
    its most bytes). A file field's value in the model is ``schemas.IMAGE_PLACEHOLDER``, so the model's own
    check that it was sent passes. Uploads are kept in memory (within ``max_request_bytes``): none is written
    to disk."""
    lim = limits()
    parser = StrictMultiPartParser(
        request.headers, request.stream(), max_files=len(files), max_fields=lim.max_labels + 8
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:  # a malformed form, too many files or fields
        raise HTTPException(status_code=400, detail=exc.message) from None
    try:
        fields: dict = {}
        uploaded: dict[str, bytes] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in files:
                    where = " or ".join(f"the {name} in field {name!r}" for name in files)
                    raise InvalidInput(f"unexpected file field {key!r}; send {where}", field=key)
                if key in uploaded:
                    raise InvalidInput(f"form field {key!r} is given more than once", field=key)
                data = await value.read(files[key] + 1)
                if len(data) > files[key]:
                    raise PayloadTooLarge(f"{key} is larger than the limit of {files[key]} bytes", field=key)
                uploaded[key] = data
            elif key in lists:
                fields.setdefault(lists[key], []).append(value)
            elif key in fields or key in uploaded:
                raise InvalidInput(f"form field {key!r} is given more than once", field=key)
            else:
                fields[key] = value
    finally:
        await form.close()
    for name in uploaded:
        fields[name] = schemas.IMAGE_PLACEHOLDER  # so the model's own check on the field passes
    validate = getattr(model, "from_form", model.model_validate)
    return validate(fields), uploaded
