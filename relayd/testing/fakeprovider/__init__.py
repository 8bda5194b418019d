"""A fake upstream that impersonates both the Anthropic and the OpenAI HTTP APIs.

relayd's integration tests run it as a separate process, the benchmarks use it
as a cheap upstream and the demo points relayd at it instead of the real
providers.  It is a real ``twisted.web`` server:

* Anthropic: ``POST /v1/messages`` (JSON or SSE), ``POST /v1/messages/count_tokens``,
  ``GET /v1/models[/{id}]``, ``POST /v1/messages/batches``,
  ``GET /v1/messages/batches/{id}[/results]``.
* OpenAI: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON or SSE),
  ``POST /v1/embeddings``, ``POST /v1/responses`` (JSON or typed SSE),
  ``GET /v1/models[/{id}]``.  ``/v1/models`` answers in the Anthropic shape when
  the request carries an ``anthropic-version`` header.
* Control (never recorded): ``GET /_fake/requests[?since=ID]``,
  ``POST /_fake/reset``, ``GET|POST /_fake/config``, ``GET /_fake/health``.

Replies are deterministic: the text is :func:`reply_chunks` (one chunk per
output token), usage is derived from the request body (:func:`input_tokens_for`)
and is identical in the JSON and the streamed form of the same request.

Tool calls: a ``/v1/messages`` or ``/v1/chat/completions`` request that declares
``tools`` (and neither sets ``tool_choice`` to none nor ends with a tool result)
is answered with the reply text followed by one call of the tool named by
``tool_choice``, else of the first tool (:mod:`.tool_calls`).  Its input is
valid against the tool's schema (:mod:`.schema_values`: the required properties,
values of the right type within the constraints); streams send it in fragments
of at most 8 characters, and it counts as one output token.
A reply cut by the token limit has no tool call.

Faults are driven by *knobs* (see :class:`Knobs`), set per instance with
``POST /_fake/config`` or per request with ``x-fake-<knob>`` headers (the header
wins).  Every API request is recorded and can be inspected with
``GET /_fake/requests``.

The modules, one concern each:

* :mod:`.knobs`: parsing and holding the misbehaviour settings;
* :mod:`.content`, :mod:`.wire`: deterministic reply content; JSON and SSE framing;
* :mod:`.families`: which API family a request is, its headers and error bodies;
* :mod:`.tool_calls`, :mod:`.schema_values`: the tool call a request gets, its input;
* :mod:`.anthropic_messages`, :mod:`.anthropic_batches`, :mod:`.openai_chat`,
  :mod:`.openai_responses`, :mod:`.openai_embeddings`, :mod:`.models`: the endpoints;
* :mod:`.exchange`: one request's timers, response writing and fault knobs;
* :mod:`.routes`, :mod:`.resource`, :mod:`.site`: dispatch, the resource, the ``Site``;
* :mod:`.cli`: ``python -m relayd.testing.fakeprovider`` / ``relayd-fake-upstream``.
"""

from __future__ import annotations

from relayd.testing.fakeprovider.cli import main
from relayd.testing.fakeprovider.content import input_tokens_for, reply_chunks, reply_text
from relayd.testing.fakeprovider.knobs import KnobError, Knobs
from relayd.testing.fakeprovider.record import RecordedRequest
from relayd.testing.fakeprovider.resource import FakeProvider
from relayd.testing.fakeprovider.site import FakeSite, make_site

__all__ = [
    "FakeProvider",
    "FakeSite",
    "KnobError",
    "Knobs",
    "RecordedRequest",
    "input_tokens_for",
    "main",
    "make_site",
    "reply_chunks",
    "reply_text",
]
