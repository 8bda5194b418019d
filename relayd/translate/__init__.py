"""OpenAI Chat Completions <-> Anthropic Messages translation, with no I/O.

Pure functions for request and response bodies and errors, and incremental translators
for SSE streams. What cannot be translated is decided by one table,
:data:`relayd.translate.mapping.LOSSY_FEATURES`, which ``docs/translation.md`` embeds.
"""

from relayd.translate.mapping import (
    LOSSY_FEATURES,
    Family,
    LossyFeature,
    TranslationError,
    lossy_table_markdown,
    normalize_tool_call_id,
)
from relayd.translate.requests import (
    TranslatedRequest,
    anthropic_to_openai_request,
    openai_to_anthropic_request,
)
from relayd.translate.responses import (
    anthropic_to_openai_response,
    openai_to_anthropic_response,
    translate_error,
)
from relayd.translate.streams import AnthropicToOpenAIStream, OpenAIToAnthropicStream

__all__ = [
    "LOSSY_FEATURES",
    "AnthropicToOpenAIStream",
    "Family",
    "LossyFeature",
    "OpenAIToAnthropicStream",
    "TranslatedRequest",
    "TranslationError",
    "anthropic_to_openai_request",
    "anthropic_to_openai_response",
    "lossy_table_markdown",
    "normalize_tool_call_id",
    "openai_to_anthropic_request",
    "openai_to_anthropic_response",
    "translate_error",
]
