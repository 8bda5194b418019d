"""Which handler answers an API request: an exact path and method table, two prefixes."""

from __future__ import annotations

from typing import Final

from relayd.testing.fakeprovider.anthropic_batches import handle_batch_create, handle_batch_get
from relayd.testing.fakeprovider.anthropic_messages import handle_count_tokens, handle_messages
from relayd.testing.fakeprovider.exchange import Exchange, Handler
from relayd.testing.fakeprovider.models import handle_model, handle_models
from relayd.testing.fakeprovider.openai_chat import handle_chat, handle_completions
from relayd.testing.fakeprovider.openai_embeddings import handle_embeddings
from relayd.testing.fakeprovider.openai_responses import handle_responses


def handle_not_found(ex: Exchange) -> None:
    """A 404 in the family's error shape."""
    ex.send_error(404, f"Not found: {ex.request.method.decode()} {ex.record.path}")


def handle_bad_method(ex: Exchange) -> None:
    """A 405 in the family's error shape: the path exists, not with this method."""
    ex.send_error(405, f"Method {ex.request.method.decode()} not allowed")


_ROUTES: Final[dict[bytes, dict[bytes, Handler]]] = {
    b"/v1/messages": {b"POST": handle_messages},
    b"/v1/messages/count_tokens": {b"POST": handle_count_tokens},
    b"/v1/messages/batches": {b"POST": handle_batch_create},
    b"/v1/models": {b"GET": handle_models},
    b"/v1/chat/completions": {b"POST": handle_chat},
    b"/v1/completions": {b"POST": handle_completions},
    b"/v1/embeddings": {b"POST": handle_embeddings},
    b"/v1/responses": {b"POST": handle_responses},
}


def route(method: bytes, path: bytes) -> Handler:
    """The handler for ``method path`` (the path without its query string)."""
    methods = _ROUTES.get(path)
    if methods is not None:
        return methods.get(method, handle_bad_method)
    if path.startswith(b"/v1/messages/batches/"):
        return handle_batch_get
    if path.startswith(b"/v1/models/"):
        return handle_model
    return handle_not_found
