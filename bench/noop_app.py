"""The baseline for bench/http.py: a Granian ASGI endpoint that decodes the
same scoring request with msgspec and answers a fixed score, doing no work.
Whatever MUSE adds (auth, routing, batching, the model, calibration, metrics)
shows up as the gap between the two."""

from __future__ import annotations

import msgspec

from muse.server.schemas import ScoreRequest, ScoreResponse

_decoder = msgspec.json.Decoder(ScoreRequest)
_encoder = msgspec.json.Encoder()
_JSON = [(b"content-type", b"application/json")]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    length = int(dict(scope["headers"]).get(b"content-length", -1))
    body = b""
    while True:  # complete at content-length bytes, as muse.server.asgi.Request.body reads it
        message = await receive()
        body += message.get("body", b"")
        if len(body) == length or not message.get("more_body"):
            break
    if scope["path"] == "/v1/score":
        r = _decoder.decode(body)
        out = _encoder.encode(ScoreResponse("noop", "1", 0, [0.5] * len(r.events)))
    else:
        out = b'{"ready": true}'
    await send(
        {"type": "http.response.start", "status": 200, "headers": [*_JSON, (b"content-length", str(len(out)).encode())]}
    )
    await send({"type": "http.response.body", "body": out})
