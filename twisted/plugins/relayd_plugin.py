"""The ``twistd relayd`` plugin: a lazy ServiceMaker, so importing it costs nothing."""

from twisted.application.service import ServiceMaker

relayd = ServiceMaker(
    "relayd",
    "relayd.tap",
    "Relay Anthropic and OpenAI API traffic over weighted, pooled backends.",
    "relayd",
)
