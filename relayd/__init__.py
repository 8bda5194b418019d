"""relayd: a Twisted relay for Anthropic and OpenAI API traffic."""

__version__ = "0.1.0"
