"""multipart/form-data uploads streamed to disk: the file part is never held whole in memory.

Starlette's own form parsing would first spool the whole upload to a temporary file and only
then let us see its size; here each piece of the request body goes through python-multipart's
push parser and straight into a files.Upload, which refuses the upload the moment it passes the
size limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio.to_thread
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from llmbatch.jobs.exceptions import FileTooLarge, InvalidRequest
from llmbatch.jobs.files import Upload
from llmbatch.jobs.settings import Settings

MAX_FIELD_BYTES = 64 * 1024  # a form field other than the file (purpose, expires_after...)
MAX_FIELDS = 16  # OpenAI's upload has four (file, purpose, expires_after[anchor], [seconds])
MAX_FIELDS_BYTES = 64 * 1024  # all fields other than the file together
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers, on top of the file's own bytes
# The whole body may hold the file, the fields, and their framing; past that it is refused even
# when it comes chunked (no Content-Length to check up front).
BODY_OVERHEAD = MULTIPART_OVERHEAD + MAX_FIELDS_BYTES


@dataclass
class Received:
    upload: Upload
    filename: str
    fields: dict[str, str] = field(default_factory=dict)


class _Parts:
    """python-multipart callbacks: the `file` part goes to `upload`, small fields are kept."""

    def __init__(self, upload: Upload):
        self.upload = upload
        self.fields: dict[str, str] = {}
        self.parts = 0  # form fields other than the file, repeated names included
        self.field_bytes = 0
        self.filename: str | None = None
        self.pending: list[bytes] = []  # file bytes parsed from the current body piece, written after it
        self.ended = False
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._value = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._hfield, "on_header_value": self._hvalue,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._part_end, "on_end": self._end}

    def _part_begin(self):
        self._headers, self._name, self._is_file, self._value = {}, None, False, bytearray()

    def _hfield(self, data, start, end):
        self._header_field += data[start:end]

    def _hvalue(self, data, start, end):
        self._header_value += data[start:end]

    def _header_end(self):
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_done(self):
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise InvalidRequest("malformed multipart body: a part without a form-data name")
        self._name = options[b"name"].decode("utf-8", "replace")
        if self._name == "file":
            if self.filename is not None:
                raise InvalidRequest("give exactly one 'file' part", "file")
            self._is_file = True
            self.filename = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")
        else:
            self.parts += 1
            if self.parts > MAX_FIELDS:
                raise InvalidRequest(f"too many form fields: at most {MAX_FIELDS} besides the file")

    def _data(self, data, start, end):
        if self._is_file:
            self.pending.append(bytes(data[start:end]))
        else:
            self._value += data[start:end]
            self.field_bytes += end - start
            if len(self._value) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes")
            if self.field_bytes > MAX_FIELDS_BYTES:
                raise InvalidRequest(f"form fields besides the file hold more than {MAX_FIELDS_BYTES} bytes together")

    def _part_end(self):
        if not self._is_file and self._name is not None:
            self.fields[self._name] = self._value.decode("utf-8", "replace")

    def _end(self):
        self.ended = True


async def receive_upload(request: Request, settings: Settings, quota: int | None = None) -> Received:
    """Stream the request's `file` part to disk; raises InvalidRequest (400), FileTooLarge or
    StorageQuotaExceeded (413). `quota`: bytes the caller may still store (None: no quota).

    On any error the partial file is removed: nothing is stored.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise InvalidRequest("expected a multipart/form-data body with a boundary")
    declared = request.headers.get("content-length")
    limit = settings.limits.max_file_bytes
    if declared and declared.isdigit() and int(declared) > limit + BODY_OVERHEAD:
        raise FileTooLarge(f"file is larger than {limit} bytes")  # refused before a byte is read
    upload = Upload(settings, quota)
    received = 0
    try:
        parts = _Parts(upload)
        parser = MultipartParser(options[b"boundary"], parts.callbacks())
        async for piece in request.stream():
            received += len(piece)
            if received > limit + BODY_OVERHEAD:  # a backstop: each part is bounded above, this bounds the rest
                raise FileTooLarge(f"request body is larger than the {limit} byte file limit allows")
            try:
                parser.write(piece)
            except MultipartParseError as exc:
                raise InvalidRequest(f"malformed multipart body: {exc}") from None
            if parts.pending:
                data, parts.pending = b"".join(parts.pending), []
                # Off the event loop: a slow disk must not stall other requests.
                await anyio.to_thread.run_sync(upload.write, data)
            if parts.ended:
                break
        if not parts.ended:
            raise InvalidRequest("malformed multipart body: it ends before its closing boundary")
        if parts.filename is None:
            raise InvalidRequest("missing the 'file' part", "file")
        if "purpose" not in parts.fields:
            raise InvalidRequest("missing 'purpose'", "purpose")
        return Received(upload, parts.filename, parts.fields)
    except BaseException:
        upload.abort()
        raise
