"""``make run``: relayd on the example config, with the fake upstream standing in for providers.

Starts the fake upstream on 127.0.0.1:8900 (where ``etc/relayd.yaml`` points its
backends), then runs ``twistd -n relayd -c etc/relayd.yaml`` in the foreground until
Ctrl-C, and stops the fake upstream on the way out.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from relayd.testing.processes import FakeUpstreamProcess

REPO = Path(__file__).resolve().parents[2]

BANNER = """
relayd demo: relay on http://127.0.0.1:8080, fake upstream on http://{upstream}
Try (relay key sk-relay-demo):
  curl -s http://127.0.0.1:8080/v1/messages -H 'x-api-key: sk-relay-demo' \\
    -H 'anthropic-version: 2023-06-01' -H 'content-type: application/json' \\
    -d '{{"model": "claude-sonnet-4-5", "max_tokens": 64,
         "messages": [{{"role": "user", "content": "Hi"}}]}}'
Ctrl-C stops both.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", default=str(REPO / "etc" / "relayd.yaml"))
    parser.add_argument("--upstream", default="127.0.0.1:8900")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="relayd-demo-") as workdir:
        upstream = FakeUpstreamProcess(Path(workdir), "fake-upstream", listen=args.upstream)
        upstream.start()
        print(BANNER.format(upstream=args.upstream), flush=True)
        twistd = str(Path(sys.executable).with_name("twistd"))
        relay = subprocess.Popen([twistd, "-n", "--pidfile=", "relayd", "-c", args.config])
        # SIGTERM (a service manager, `kill`) drains relayd like Ctrl-C does.
        signal.signal(signal.SIGTERM, lambda signum, frame: relay.send_signal(signum))
        try:
            return relay.wait()
        except KeyboardInterrupt:  # Ctrl-C reached relayd too (same process group)
            relay.wait()
            return 0
        finally:
            upstream.stop()


if __name__ == "__main__":
    sys.exit(main())
