"""``python -m relayd.testing.fakeprovider``: run the fake upstream (see :mod:`.cli`)."""

from relayd.testing.fakeprovider.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
