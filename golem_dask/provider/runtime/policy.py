"""Which URLs a requestor's ``transfer`` commands may reach from a provider's machine.

A requestor names the far side of every transfer (an fsspec URL and its storage options).
Those run on the provider's machine, with the provider's network and files, so a stranger
must not be able to name ``file:///home/...`` (the provider's files), a chained URL that
ends in one (``simplecache::file://...``, ``zip://x::file://...``), or a host on the
provider's own networks (``http://169.254.169.254/...``, ``http://127.0.0.1:2375/...``).

:class:`TransferPolicy` says what is allowed.  :meth:`TransferPolicy.strict` (the
``golem-dask provider`` daemon) takes the schemes of ``golem.provider.transfer-schemes``
and refuses private, loopback, link-local, multicast, reserved and unspecified
addresses unless ``golem.provider.allow-private-addresses`` is set;
:meth:`TransferPolicy.trusting` (the embedded market: this machine sold to its own user)
allows everything.

The address check is made twice.  Before the copy, every host the URL and its options
name is resolved and checked, for a clear error.  During the copy, HTTP(S) and S3
connections go through :func:`checked_socket`, which checks the address each socket
really connects to: an HTTP redirect to a private address, or a name that resolves to a
public address for the first check and to a private one for the connection (DNS
rebinding), is refused there too.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from golem_dask import config
from golem_dask.errors import ActivityError, ConfigError
from golem_dask.transfer import display_url, open_fs

#: Protocols that reach the provider's own files or memory: never allowed for a stranger,
#: whatever ``--allow-scheme`` says (``memory`` is one store shared by the whole daemon).
LOCAL_PROTOCOLS = frozenset({"file", "local", "memory"})
#: Storage options that re-route fsspec to another filesystem than the URL's own.
REROUTING_OPTIONS = frozenset({"protocol", "target_protocol", "target_options", "fo", "fs", "remote_protocol",
                               "remote_options", "get_client", "session", "loop"})
_SCHEMES_HINT = "golem-dask provider --allow-scheme SCHEME, or golem.provider.transfer-schemes"
_PRIVATE_HINT = "golem-dask provider --allow-private-addresses, or golem.provider.allow-private-addresses: true"


class TransferRefused(ActivityError):
    """A transfer names a URL the provider's :class:`TransferPolicy` does not allow."""


def _refuse(url: str, why: str, hint: str | None = None) -> TransferRefused:
    return TransferRefused(f"transfer refused: {display_url(url)}: {why}" + (f" (allow it with {hint})" if hint else ""))


def address_kind(address: str) -> str | None:
    """What kind of non-public address ``address`` (an IP literal) is, or None if it is public.

    Examples
    --------
    >>> address_kind("169.254.169.254"), address_kind("::ffff:127.0.0.1"), address_kind("10.1.2.3")
    ('link-local', 'loopback', 'private')
    >>> address_kind("93.184.215.14") is None
    True
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "malformed"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


def checked_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """A socket for ``addr_info``, unless it would connect to a non-public address.

    aiohttp's ``socket_factory`` for HTTP(S) and, through aiobotocore, S3: it sees every
    address a connection is really made to, after redirects and DNS.
    """
    family, type_, proto, _, sockaddr = addr_info
    kind = address_kind(str(sockaddr[0]))
    if kind is not None:
        raise OSError(errno.EACCES, f"{sockaddr[0]} is a {kind} address, refused by the provider's transfer policy")
    return socket.socket(family=family, type=type_, proto=proto)


async def _checked_client(**kwargs: Any) -> Any:
    """HTTPFileSystem's ``get_client``: an aiohttp session whose sockets are checked."""
    import aiohttp

    kwargs.pop("connector", None)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=checked_socket), **kwargs)


def url_links(url: str) -> list[tuple[str, str]]:
    """``(protocol, link)`` for each link of an fsspec URL, outermost first, as fsspec reads it.

    A link without a protocol is a local path (``file``).  ``data:`` URLs are copied
    inline, not through fsspec's parser, so they are one link.

    Examples
    --------
    >>> url_links("simplecache::file:///etc/passwd")
    [('simplecache', 'simplecache'), ('file', 'file:///etc/passwd')]
    >>> url_links("/etc/passwd")
    [('file', '/etc/passwd')]
    """
    import fsspec
    from fsspec.core import split_protocol

    if url.startswith("data:"):
        return [("data", url)]
    if "::" not in url:
        return [(split_protocol(url)[0] or "file", url)]
    # The same reading as fsspec.core._un_chain: a bare known protocol name is a link of
    # that protocol, a lower-case word too; anything else is parsed as a URL or a path.
    known = set(fsspec.available_protocols())
    links = []
    for bit in url.split("::"):
        if bit in known or not ("://" in bit or re.match(".*[^a-z]+.*", bit)):
            links.append((bit, bit))
        else:
            links.append((split_protocol(bit)[0] or "file", bit))
    return links


def _is_plain(value: Any) -> bool:
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool, bytes))


#: Protocols whose URL names the host they connect to (``s3://bucket`` names a bucket).
HOST_IN_URL = frozenset({"http", "https", "ftp", "sftp", "ssh", "webhdfs", "hdfs", "smb"})


def _hosts(protocol: str, link: str, options: Mapping[str, Any] | None) -> Iterable[str | None]:
    """Host names a link (and, for the outermost one, its options) will connect to."""
    if protocol in HOST_IN_URL:
        yield urlsplit(link).hostname
    if options is None:
        return
    client_kwargs = options.get("client_kwargs")
    nested = client_kwargs.get("endpoint_url") if isinstance(client_kwargs, Mapping) else None
    values = [options.get("endpoint_url"), nested, options.get("host"), options.get("account_host")]
    connection = options.get("connection_string")
    if isinstance(connection, str):  # Azure: "...;BlobEndpoint=http://10.0.0.1:10000/acct;..."
        for part in connection.split(";"):
            name, _, endpoint = part.partition("=")
            if name.strip().lower().endswith("endpoint"):
                values.append(endpoint.strip())
    for value in values:
        if isinstance(value, str) and value:
            yield urlsplit(value).hostname if "://" in value else value.strip("[]")


def _credentials_problem(protocol: str, options: Mapping[str, Any]) -> str | None:
    """Why these options would let the provider's own cloud credentials be used, if they would.

    Without credentials of their own, s3fs, gcsfs and adlfs look for some on the machine
    they run on (environment, files in the home directory, the cloud's metadata service):
    the provider's.
    """
    if protocol in ("s3", "s3a"):
        if options.get("profile"):
            return "storage option 'profile' names a profile in the provider's own AWS configuration"
        if options.get("anon") is not True and not (options.get("key") and options.get("secret")):
            return ("s3 needs the requestor's own credentials in storage_options ('key' and 'secret'), or "
                    "'anon': True; the provider's own AWS credentials are never used")
    elif protocol in ("gs", "gcs"):
        token = options.get("token")
        if not (token == "anon" or isinstance(token, Mapping)):
            return ("gs needs the requestor's credentials in storage_options ('token': a dict of service account "
                    "info) or 'token': 'anon'; the provider's own credentials and files are never used")
        if isinstance(token, Mapping):
            return _google_token_problem(token)
    elif protocol in ("az", "abfs", "abfss", "adl"):
        own = ("account_key", "sas_token", "connection_string", "client_secret")
        if options.get("anon") is not True and not any(options.get(k) for k in own):
            return (f"{protocol} needs the requestor's credentials in storage_options (one of {', '.join(own)}) or "
                    "'anon': True; the provider's own credentials are never used")
    return None


def _google_token_problem(token: Mapping[str, Any]) -> str | None:
    """Why a gs ``token`` dict would make the provider read its own files or call an address
    the requestor chose (other kinds of credentials than these two read files named in them;
    a ``token_uri`` is where the provider posts to get an access token), if it would."""
    if token.get("type") not in ("service_account", "authorized_user"):
        return ("gs 'token' must be service account or authorized user info ('type': 'service_account' or "
                "'authorized_user'); other kinds read files or addresses on the provider's machine")
    for key, value in token.items():
        if not (isinstance(value, str) and "://" in value):
            continue
        host = urlsplit(value).hostname or ""
        if not (value.startswith("https://") and (host.endswith(".googleapis.com") or host == "accounts.google.com")):
            return (f"gs 'token' field {key!r} must be a Google address (https://*.googleapis.com or "
                    f"accounts.google.com), not {display_url(value)}: the provider would call it")
    return None


@dataclass(frozen=True, slots=True)
class TransferPolicy:
    """What the far side of a provider's transfers may be.

    Parameters
    ----------
    schemes:
        fsspec protocols allowed (every link of a chained URL must be one); ``None``
        allows any.
    allow_local_files:
        Whether ``file`` URLs and plain paths (the provider's own files) are allowed.
    allow_private_addresses:
        Whether hosts on private, loopback, link-local, multicast, reserved or
        unspecified addresses are allowed.

    Examples
    --------
    >>> policy = TransferPolicy(schemes=frozenset({"https", "data"}))
    >>> try:
    ...     policy.prepare("simplecache::file:///etc/passwd", None)
    ... except TransferRefused as e:
    ...     print(e)
    transfer refused: simplecache::file:///etc/passwd: scheme 'simplecache' is not allowed by this provider \
(allowed: data, https) (allow it with golem-dask provider --allow-scheme SCHEME, or golem.provider.transfer-schemes)
    """

    schemes: frozenset[str] | None
    allow_local_files: bool = False
    allow_private_addresses: bool = False

    def __post_init__(self) -> None:
        if self.schemes is not None and not self.allow_local_files:
            local = sorted(s for s in self.schemes if _is_local_protocol(s))
            if local:
                raise ConfigError(f"transfer schemes {', '.join(local)} reach the provider's own files or memory; "
                                  "a provider never allows them for remote requestors")

    @classmethod
    def strict(cls, extra_schemes: Iterable[str] = (), allow_private_addresses: bool | None = None) -> TransferPolicy:
        """For strangers: ``golem.provider.transfer-schemes`` plus ``extra_schemes``, no local files,
        and private addresses only with ``golem.provider.allow-private-addresses`` (or the argument)."""
        configured = config.get("provider.transfer-schemes") or []
        if isinstance(configured, str):
            configured = [configured]
        schemes = frozenset(str(s).strip() for s in (*configured, *extra_schemes) if str(s).strip())
        private = bool(config.get("provider.allow-private-addresses", allow_private_addresses))
        return cls(schemes, allow_local_files=False, allow_private_addresses=private)

    @classmethod
    def trusting(cls) -> TransferPolicy:
        """For this machine's own user (the embedded market): any URL, local files, any address."""
        return cls(None, allow_local_files=True, allow_private_addresses=True)

    @property
    def is_trusting(self) -> bool:
        return self.schemes is None and self.allow_local_files and self.allow_private_addresses

    def describe(self) -> str:
        """One line for the daemon's start-up output."""
        if self.is_trusting:
            return "transfers: any URL, local files included"
        schemes = "any scheme" if self.schemes is None else ", ".join(sorted(self.schemes))
        private = "allowed" if self.allow_private_addresses else "refused"
        return (f"transfers: {schemes}; local files {'allowed' if self.allow_local_files else 'refused'}; "
                f"private, loopback and link-local addresses {private}")

    def prepare(self, url: str, options: Mapping[str, Any] | None, *, writing: bool = False) -> dict[str, Any]:
        """Check ``url`` and its storage ``options``; returns the options to copy with.

        Unless private addresses are allowed, the options returned make HTTP(S) and S3
        connections through :func:`checked_socket`.  ``writing``: ``url`` is a
        transfer's destination.

        Raises
        ------
        TransferRefused
            Naming the URL (without credentials) and the setting that would allow it.
        """
        opts = dict(options or {})
        if self.is_trusting:
            return opts
        if not _is_plain(opts):
            raise _refuse(url, "storage options must be plain data (strings, numbers, lists, dicts)")
        rerouting = sorted(REROUTING_OPTIONS & set(opts))
        if rerouting:
            raise _refuse(url, f"storage options {', '.join(rerouting)} would re-route the transfer")
        links = url_links(url)
        if writing and links[0][0] == "data":
            raise _refuse(url, "a data: URL is inline content; it can only be a transfer's source")
        for protocol, _ in links:  # every link's scheme first: nothing is resolved for a refused URL
            self._check_scheme(url, protocol)
        for i, (protocol, link) in enumerate(links):
            # Top-level storage options go to the outermost link (fsspec's reading).
            self._check_link(url, protocol, link, opts if i == 0 else None)
        if self.allow_private_addresses:
            return opts
        return checked_options(links[0][0], opts)

    def open(self, url: str, options: Mapping[str, Any] | None, *, writing: bool = False) -> tuple[Any, str]:
        """:meth:`prepare`, then the fsspec filesystem and path the copy uses.

        The filesystem fsspec really built is checked too: it must be the URL's own
        protocol's, never a local or in-memory one, whatever the options said.
        """
        from fsspec.implementations.local import LocalFileSystem
        from fsspec.implementations.memory import MemoryFileSystem

        opts = self.prepare(url, options, writing=writing)
        fs, path = open_fs(url, opts)
        if self.is_trusting:
            return fs, path
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if isinstance(fs, (LocalFileSystem, MemoryFileSystem)) or url_links(url)[0][0] not in protocols:
            raise _refuse(url, f"fsspec opens it as {type(fs).__name__}")
        return fs, path

    def _check_scheme(self, url: str, protocol: str) -> None:
        if _is_local_protocol(protocol) and not self.allow_local_files:
            what = "a local path" if protocol in ("file", "local") else f"{protocol!r} is the daemon's own storage"
            raise _refuse(url, f"{what}; a provider never lets remote requestors read or write its own files")
        if self.schemes is not None and protocol not in self.schemes and not (
                self.allow_local_files and protocol in ("file", "local")):
            allowed = ", ".join(sorted(self.schemes)) or "none"
            raise _refuse(url, f"scheme {protocol!r} is not allowed by this provider (allowed: {allowed})",
                          _SCHEMES_HINT)

    def _check_link(self, url: str, protocol: str, link: str, options: Mapping[str, Any] | None) -> None:
        if protocol == "data":
            return
        if options is not None:
            problem = _credentials_problem(protocol, options)
            if problem is not None:
                raise _refuse(url, problem)
        if not self.allow_private_addresses:
            for host in _hosts(protocol, link, options):
                self._check_host(url, host)

    def _check_host(self, url: str, host: str | None) -> None:
        if not host:
            raise _refuse(url, "it names no host")
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as e:
            raise _refuse(url, f"host {host} does not resolve ({type(e).__name__})") from e
        for info in infos:
            address = str(info[4][0])
            kind = address_kind(address)
            if kind is not None:
                named = address if host == address else f"{host} resolves to {address},"
                raise _refuse(url, f"{named} a {kind} address of the provider's networks", _PRIVATE_HINT)


def _is_local_protocol(protocol: str) -> bool:
    """Whether fsspec's ``protocol`` is this machine's own files or memory (without importing it).

    Examples
    --------
    >>> [_is_local_protocol(p) for p in ("file", "local", "memory", "s3", "https")]
    [True, True, True, False, False]
    """
    if protocol in LOCAL_PROTOCOLS:
        return True
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.registry import known_implementations, registry

    cls = registry.get(protocol)
    if cls is not None:
        return issubclass(cls, (LocalFileSystem, MemoryFileSystem))
    path = str(known_implementations.get(protocol, {}).get("class", ""))
    return path.startswith(("fsspec.implementations.local.", "fsspec.implementations.memory."))


def checked_options(protocol: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with every connection's socket made by :func:`checked_socket` (HTTP(S), S3).

    Examples
    --------
    >>> checked_options("s3", {"key": "k"})["config_kwargs"]["connector_args"]["socket_factory"] is checked_socket
    True
    """
    if protocol in ("http", "https"):
        return {**options, "get_client": _checked_client}
    if protocol in ("s3", "s3a"):
        config_kwargs = dict(options.get("config_kwargs") or {})
        connector_args = dict(config_kwargs.get("connector_args") or {})
        connector_args["socket_factory"] = checked_socket
        config_kwargs["connector_args"] = connector_args
        return {**options, "config_kwargs": config_kwargs}
    return dict(options)

