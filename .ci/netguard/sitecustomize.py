"""Loaded into every Python process of a CI run (through PYTHONPATH), kernels included.

Blocks Python-level network access that leaves this machine: TCP/UDP ``connect`` to a non-loopback
address and name lookups (``getaddrinfo``) of any host other than this one. The book must build and
test offline. A blocked attempt raises ``OSError`` and is also appended to ``$NETGUARD_LOG``, so CI
fails even when a library catches the error and carries on quietly. (Native code that opens its own
sockets is not covered; ``HF_HUB_OFFLINE=1`` keeps the Hugging Face clients from trying.)
"""
import ipaddress
import os
import socket
import traceback

_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _is_local(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if host in ("localhost", "") or isinstance(address, (str, bytes)):  # AF_UNIX paths are local
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse(address):
    message = f"netguard: blocked a network connection to {address!r} (CI is offline)"
    log = os.environ.get("NETGUARD_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(f"{message} in process {os.getpid()}\n{''.join(traceback.format_stack(limit=12))}\n")
    raise OSError(message)


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
        _refuse(address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
        _refuse(address)
    return _connect_ex(self, address)


_getaddrinfo = socket.getaddrinfo
_LOCAL_NAMES = {None, "", "localhost", socket.gethostname()}


def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name not in _LOCAL_NAMES:
        try:
            ipaddress.ip_address(name)  # an address literal: connect() judges it
        except ValueError:
            _refuse(name)
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.getaddrinfo = getaddrinfo
