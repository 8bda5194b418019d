"""``twistd relayd``: command-line options and the service factory."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from relayd.config import DEFAULT_CONFIG_PATH, ConfigErrors, config_from_bytes, read_config_file
from relayd.config.model import Config


class Options(usage.Options):
    """``twistd [-n] relayd [-c FILE]``."""

    synopsis = "[-c FILE]"
    longdesc = "Relay Anthropic and OpenAI API traffic to weighted, pooled upstream backends."
    optParameters = [
        ["config", "c", DEFAULT_CONFIG_PATH, "The YAML configuration file."],
    ]

    config: Config
    raw: bytes  # the file as validated (workers get these bytes, not a second read)

    def postOptions(self) -> None:
        """Load and validate the file now, so a bad config fails before anything starts."""
        try:
            self.raw = read_config_file(self["config"])
            self.config = config_from_bytes(self.raw, self["config"])
        except ConfigErrors as exc:
            raise usage.UsageError(
                f"invalid configuration {self['config']}:\n{exc}"
            ) from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor  # the process entry point owns the reactor

    from relayd.logs import batch_access_lines

    service: IService
    if options.config.workers != 1:
        from relayd.workers.daemon import WorkerDaemon

        service = WorkerDaemon(
            options.config, options.raw, reactor, config_path=options["config"],
            install_signal_handlers=True,
        )
    else:
        from relayd.service import RelayService

        service = RelayService(
            options.config, reactor, config_path=options["config"], install_signal_handlers=True
        )
    # twistd starts its log observer after it made this service: once the reactor runs,
    # the journal observer exists and can take the access lines in batches.
    reactor.callWhenRunning(batch_access_lines, reactor)
    return service
