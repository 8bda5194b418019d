"""The model names that metrics labels and usage keys may carry: a bounded set.

A client names its model freely, and a route with a glob (or none) lets any name
through. Used as it came, a model name in a label makes every distinct name a new time
series and a new usage key forever (20,000 names grew ``/metrics`` to 33 MB), and a name
with a lone surrogate (``"gpt-\\udfff"``, valid JSON) made every later scrape fail.

So a model name becomes a label only if it is configured (a route's literal model
names, a target's model) or an upstream confirmed it (answered a request for it with a
status below 400), up to
:data:`MAX_LEARNED_MODELS` names learned per process, and only if it looks like a model
id. Every other name is counted as :data:`OTHER`. The access log keeps the name as
sent (quoted and cut by the log format).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Model names learned from upstream answers, per process (configured names are extra).
MAX_LEARNED_MODELS = 200
#: The label of every model name that is neither configured nor learned.
OTHER = "other"
#: What a learned model name may look like: model ids of both APIs, fine-tunes
#: (``ft:gpt-4o:org:name:id``), vendor prefixes (``anthropic.claude-3``), dates.
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}")


def _encodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


class ModelLabels:
    """Maps a request's model name to the label it is counted under."""

    __slots__ = ("_known", "learned")

    def __init__(self, known: Iterable[str], learned: set[str] | None = None) -> None:
        self._known = frozenset(name for name in known if _encodable(name))
        # Shared with the next runtime on reload, so what was learned stays learned.
        self.learned: set[str] = learned if learned is not None else set()

    def label(self, model: str | None, confirmed: bool = False) -> str:
        """The label for ``model``; ``confirmed``: an upstream accepted it just now."""
        if model is None:
            return "-"
        if model in self._known or model in self.learned:
            return model
        if confirmed:
            return self.learn(model)
        return OTHER

    def learn(self, model: str) -> str:
        """Remember ``model`` as a label if there is room and it looks like a model id."""
        learned = self.learned
        if model in learned or model in self._known:
            return model
        if len(learned) < MAX_LEARNED_MODELS and _MODEL_ID.fullmatch(model):
            learned.add(model)
            return model
        return OTHER
