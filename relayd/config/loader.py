"""Read and validate the YAML configuration into the frozen objects of :mod:`.model`.

The loader is deliberately strict: unknown keys, wrong types (a boolean is never a
number), ``null`` values and dangling references are all errors, because a typo in a
relay's configuration should stop it at startup (or at ``relayd-checkconfig``), not
silently widen access or route traffic somewhere unexpected.

Every problem is collected before anything is raised, so one run reports them all.
Error messages name the offending key by its path (``providers[0].backends[1].weight``)
and never quote a secret: API keys, key and token file contents and environment values
stay out.

What each key holds and how it is checked is stated once, on the model's fields (see
:mod:`.schema`); this module reads the document's top level with it, and holds the
rules that cross sections or list items: one listener an address (the admin listener
included), unique client names and key digests, and routes naming known providers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import yaml

from relayd.config.addresses import listen_address, normalized_host
from relayd.config.checks import Context, check_unique, items, local_path
from relayd.config.errors import ROOT_PATH, ConfigError, ConfigErrors, os_reason
from relayd.config.model import (
    DEFAULT_LISTEN_ADDRESS,
    AdminConfig,
    BackendConfig,
    ClientConfig,
    ClientSigningConfig,
    Config,
    ListenerConfig,
    RuleConfig,
)
from relayd.config.routes import Routes
from relayd.config.schema import Section, read_section
from relayd.config.secrets import read_signing_secret, secret_file
from relayd.config.state import read_state
from relayd.config.upstreams import INHERITED, Providers

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ROOT_PATH",
    "ConfigError",
    "ConfigErrors",
    "config_from_bytes",
    "load_config",
    "parse_config",
    "read_config_file",
]

DEFAULT_CONFIG_PATH = "/etc/relayd.yaml"


def load_config(path: str, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the YAML file at ``path``.

    Relative paths inside the file (TLS, API key and admin token files) are resolved against the
    file's own directory. Raises :class:`ConfigErrors` for an unreadable file, a YAML
    syntax error or any validation problem.
    """
    return config_from_bytes(read_config_file(path), path, environ=environ)


def read_config_file(path: str) -> bytes:
    """The file's bytes, or :class:`ConfigErrors` when it cannot be read."""
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except (OSError, ValueError) as exc:
        raise ConfigErrors([ConfigError(path, f"cannot read file: {os_reason(exc)}")]) from exc


def config_from_bytes(
    raw: bytes, path: str, *, environ: Mapping[str, str] | None = None
) -> Config:
    """:func:`load_config` of bytes read from ``path`` already (workers get the daemon's)."""
    data = _parse_yaml(raw, path)
    base_dir = os.path.dirname(os.path.abspath(path))
    return parse_config(data, source=path, environ=environ, base_dir=base_dir)


def parse_config(
    data: object,
    *,
    source: str = "<memory>",
    environ: Mapping[str, str] | None = None,
    base_dir: str | None = None,
) -> Config:
    """Validate already-parsed YAML ``data`` and build a :class:`Config`.

    ``environ`` supplies ``api_key_env`` variables (default: ``os.environ``);
    ``base_dir`` anchors relative paths (default: the current directory).
    ``None`` (an empty document) gives the defaults.
    """
    context = Context(
        environ=os.environ if environ is None else environ,
        base_dir=os.path.abspath(os.getcwd() if base_dir is None else base_dir),
    )
    config = _Document(context).read(data, source)
    if context.errors:
        raise ConfigErrors(context.errors)
    return config


def _parse_yaml(raw: bytes, path: str) -> object:
    """Load ``raw`` with ``yaml.safe_load``, turning syntax errors into ConfigErrors."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigErrors([_yaml_error(path, exc)]) from exc
    except (ValueError, RecursionError) as exc:  # e.g. an integer too long to convert
        message = f"cannot be loaded as YAML ({type(exc).__name__})"
        raise ConfigErrors([ConfigError(path, message)]) from exc


def _yaml_error(path: str, exc: yaml.YAMLError) -> ConfigError:
    """Describe a YAML error by file, line and column, without quoting the file's text.

    PyYAML's own ``str()`` includes a snippet of the offending line, which may hold a
    secret, so only the problem and context descriptions are kept.
    """
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = path if mark is None else f"{path}:{_mark_text(mark, ':')}"
        parts = [exc.problem or "invalid YAML"]
        if exc.context:
            since = exc.context_mark
            started = "" if since is None else f" at line {_mark_text(since, ', column ')}"
            parts.append(f"({exc.context}{started})")
        return ConfigError(where, "YAML syntax error: " + " ".join(parts))
    if isinstance(exc, yaml.reader.ReaderError):
        if exc.encoding == "unicode":  # PyYAML's marker for a non-printable character
            return ConfigError(path, f"contains a control character (character {exc.position})")
        return ConfigError(path, f"not valid {exc.encoding} text (byte {exc.position})")
    return ConfigError(path, f"invalid YAML ({type(exc).__name__})")


def _mark_text(mark: yaml.Mark, separator: str) -> str:
    """A YAML position as 1-based ``line<separator>column``."""
    return f"{mark.line + 1}{separator}{mark.column + 1}"


class _Document:
    """Reads the top level of one document: hooks for the sections that need the others.

    ``listen_addresses`` maps the (normalized host, port) of every valid listener to its
    path, for ``admin.address``; ``providers`` remembers provider types for ``routes``.
    """

    def __init__(self, context: Context) -> None:
        self.context = context
        self.listen_addresses: dict[tuple[str, int], str] = {}
        self.providers = Providers(context)

    def read(self, data: object, source: str) -> Config:
        """The whole Config (meaningful only if no error was recorded)."""
        base = Config(listen=(), source=source)
        config = read_section(
            Config,
            {} if data is None else data,
            "",
            self.context,
            base=base,
            hooks={
                "listen": self._listen,
                "admin": self._admin,
                "state": self._state,
                "clients": self._clients,
                "providers": self._providers,
                "routes": self._routes,
                "rules": self._rules,
            },
        )
        if config is None:
            return base
        self._check_regions(config)
        self._check_workers(config)
        return config

    def _check_workers(self, config: Config) -> None:
        """With several workers and the memory store, refuse what the daemon cannot share.

        Limits, budgets, usage and object owners stay exact (the daemon process holds
        the memory store for every worker), but signing nonces and ``edge.per_address``
        buckets live in each worker: a replay could pass through another worker, and an
        address would get the rate once per worker. ``auto`` counts as several, so the
        file does not break when it moves to a bigger machine.
        """
        if config.workers == 1 or config.state.store != "memory":
            return
        why = "with workers other than 1 and state.store: memory, "
        fix = "; set state.store: redis (shared by every worker), or workers: 1"
        for index, client in enumerate(config.clients):
            if client.signing is not None:
                self.context.error(
                    f"clients[{index}].signing",
                    why + "each worker would keep its own nonces, so a signed request could "
                    "be replayed through another worker" + fix,
                )
        if config.edge.per_address is not None:
            self.context.error(
                "edge.per_address",
                why + "each worker would keep its own buckets, so an address would get the "
                "rate once per worker" + fix,
            )

    def _check_regions(self, config: Config) -> None:
        """Region names used by ``regions`` maps and clients must be backends' regions."""
        everywhere = {b.region for p in config.providers for b in p.backends if b.region}
        for index, provider in enumerate(config.providers):
            own = {backend.region for backend in provider.backends if backend.region}
            for code, region in provider.regions or ():
                if region not in own:
                    self.context.error(
                        f"providers[{index}].regions.{code}",
                        f"no backend of provider {provider.name!r} has region {region!r}"
                        + (f" (its regions: {', '.join(sorted(own))})" if own else ""),
                    )
        for index, client in enumerate(config.clients):
            if client.region is not None and client.region not in everywhere:
                self.context.error(
                    f"clients[{index}].region", f"no backend has region {client.region!r}"
                )

    # -- listeners ----------------------------------------------------------------------

    def _listen(self, section: Section) -> None:
        """The ``listen`` list (one default listener if the key is absent)."""
        given = section.fields.get("listen", [{"address": DEFAULT_LISTEN_ADDRESS}])
        pairs = items(given, "listen", self.context, empty="must contain at least one listener")
        listeners = [
            read_section(
                ListenerConfig,
                item,
                each_path,
                self.context,
                hooks={"address": self._listener_address},
            )
            for each_path, item in pairs
        ]
        section.values["listen"] = tuple(listener for listener in listeners if listener is not None)

    def _listener_address(self, section: Section) -> None:
        """A listener's address; two listeners cannot both bind one (port 0 is always fresh)."""
        address = section.require("address", listen_address)
        if address is None:
            return
        if address.port != 0:
            seen = self.listen_addresses
            key = (normalized_host(address.host), address.port)
            if key in seen:
                message = f"duplicate listener (same as {seen[key]})"
                self.context.error(section.key_path("address"), message)
            else:
                seen[key] = section.path
        section.values.update(address=address.text, host=address.host, port=address.port)

    def _admin(self, section: Section) -> None:
        """The optional admin listener."""
        if "admin" not in section.fields:
            return
        admin = read_section(
            AdminConfig,
            section.fields["admin"],
            "admin",
            self.context,
            hooks={"address": self._admin_address, "token_file": self._admin_token},
        )
        if admin is not None:
            section.values["admin"] = admin

    def _admin_address(self, section: Section) -> None:
        """The admin listener's address, which no ``listen`` entry may use."""
        address = section.require("address", listen_address)
        if address is None:
            return
        if address.port != 0:
            first = self.listen_addresses.get((normalized_host(address.host), address.port))
            if first is not None:
                self.context.error(section.key_path("address"), f"already used by {first}")
        section.values.update(address=address.text, host=address.host, port=address.port)

    def _admin_token(self, section: Section) -> None:
        """The bearer token for ``/admin/*``, read from ``token_file`` at load time."""
        token_file = section.check("token_file", local_path)
        if token_file is None:
            return
        path = section.key_path("token_file")
        token = secret_file(token_file, path, "token", "a token", self.context)
        if token is not None:
            section.values.update(token_file=token_file, token=token)

    # -- the other sections ---------------------------------------------------------------

    def _state(self, section: Section) -> None:
        """The ``state`` mapping, if given."""
        if "state" in section.fields:
            state = read_state(section.fields["state"], "state", self.context)
            if state is not None:
                section.values["state"] = state

    def _clients(self, section: Section) -> None:
        """The ``clients`` list; names and key digests must be unique."""
        names: dict[str, str] = {}
        digests: dict[bytes, str] = {}

        def unique_name(client: Section) -> None:
            path = client.key_path("name")
            check_unique(client.value("name"), path, names, "client", self.context)

        def unique_digest(client: Section) -> None:
            digest, name = client.value("key_sha256"), client.value("name")
            if digest is None:
                return
            first = digests.get(digest)
            if first is None:
                digests[digest] = client.path if name is None else f"{client.path} ({name})"
            else:
                self.context.error(client.key_path("key_sha256"), f"same key digest as {first}")

        def signing(client: Section) -> None:
            if "signing" in client.fields:
                client.values["signing"] = read_section(
                    ClientSigningConfig, client.fields["signing"], client.key_path("signing"),
                    self.context, hooks={"secret": read_signing_secret},
                )

        hooks = {"name": unique_name, "key_sha256": unique_digest, "signing": signing}
        pairs = items(section.fields.get("clients", []), "clients", self.context, empty=None)
        clients = [
            read_section(ClientConfig, item, each_path, self.context, hooks=hooks)
            for each_path, item in pairs
        ]
        section.values["clients"] = tuple(client for client in clients if client is not None)

    def _providers(self, section: Section) -> None:
        """The ``providers`` list, inheriting the top level's settings read before it."""
        top = BackendConfig(name="", url="", **{key: section.get(key) for key in INHERITED})
        value = section.fields.get("providers", [])
        section.values["providers"] = self.providers.read(value, "providers", top)

    def _rules(self, section: Section) -> None:
        """The ``rules`` list: unique names, and clients and routes that exist."""
        clients = {c.name for c in section.get("clients") or ()}
        routes = {r.name or f"routes[{i}]" for i, r in enumerate(section.get("routes") or ())}
        names: dict[str, str] = {}
        found = []
        for each_path, item in items(section.fields.get("rules", []), "rules", self.context,
                                      empty=None):
            rule = read_section(RuleConfig, item, each_path, self.context)
            if rule is None:
                continue
            check_unique(rule.name, f"{each_path}.name", names, "rule", self.context)
            for kind, known, given in (("client", clients, rule.clients),
                                       ("route", routes, rule.routes)):
                for index, name in enumerate(given or ()):
                    if name not in known:
                        self.context.error(f"{each_path}.{kind}s[{index}]",
                                           f"no {kind} is named {name!r}")
            found.append(rule)
        section.values["rules"] = tuple(found)

    def _routes(self, section: Section) -> None:
        """The ``routes`` list, checked against the providers read before it."""
        routes = Routes(self.context, self.providers.types)
        section.values["routes"] = routes.read(section.fields.get("routes", []), "routes")
