"""Content rules (``rules``): regular expressions over a request's text, checked before
any upstream contact.

The text is the client's request as it sent it, in its own API family (the system
prompt, and the conversation: messages, prompts, inputs), so an OpenAI request served by
Claude is checked as it was written. ``deny`` refuses a match with 403 in the caller's
error shape, naming the rule (never the matched text); ``flag`` lets it through with
``x-relayd-flagged`` on the answer and ``flagged=`` in the access log. Streaming requests
are checked the same way (their input is all there before anything is sent). Patterns
are compiled once per configuration; at most :data:`MAX_SCAN_CHARS` characters of each
kind of text are scanned. Answers are not checked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from relayd.config.model import RuleConfig
from relayd.providers import IProvider

__all__ = ["MAX_SCAN_CHARS", "ContentRules", "RuleVerdict"]

#: Characters of system prompt, and of conversation, a request has scanned at most.
MAX_SCAN_CHARS = 1_000_000


class _Rule:
    __slots__ = ("action", "clients", "name", "regex", "routes", "where")

    def __init__(self, config: RuleConfig) -> None:
        match = config.match
        flags = re.IGNORECASE if match.case == "insensitive" else 0
        self.name = config.name
        self.regex = re.compile(match.pattern, flags)
        self.where = match.where
        self.action = config.action
        self.clients = frozenset(config.clients) if config.clients is not None else None
        self.routes = frozenset(config.routes) if config.routes is not None else None

    def applies(self, client: str, route: str) -> bool:
        return (self.clients is None or client in self.clients) and (
            self.routes is None or route in self.routes
        )


class RuleVerdict:
    """What the rules said of one request: the denying rule, and the flagging ones."""

    __slots__ = ("denied", "flagged")

    def __init__(self) -> None:
        self.denied: str | None = None
        self.flagged: list[str] = []


class ContentRules:
    """The configuration's ``rules``, compiled."""

    __slots__ = ("_rules",)

    def __init__(self, configs: Sequence[RuleConfig]) -> None:
        self._rules = tuple(_Rule(config) for config in configs)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def check(
        self, family: IProvider, payload: dict[str, Any], client: str, route: str
    ) -> RuleVerdict | None:
        """The verdict on a request (None: no rule applies to this client and route)."""
        rules = [rule for rule in self._rules if rule.applies(client, route)]
        if not rules:
            return None
        system_parts, prompt_parts = family.texts_of(payload)
        system = _bounded(system_parts)
        prompt = _bounded(prompt_parts)
        verdict = RuleVerdict()
        for rule in rules:
            if rule.where == "system":
                hit = rule.regex.search(system)
            elif rule.where == "prompt":
                hit = rule.regex.search(prompt)
            else:
                hit = rule.regex.search(system) or rule.regex.search(prompt)
            if hit is None:
                continue
            if rule.action == "deny":
                verdict.denied = rule.name
                return verdict
            verdict.flagged.append(rule.name)
        return verdict


def _bounded(parts: list[str]) -> str:
    text = "\n".join(parts)
    return text[:MAX_SCAN_CHARS]
