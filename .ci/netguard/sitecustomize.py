"""Loaded into every Python process of a CI run (through PYTHONPATH), kernels included.

Blocks any connection that leaves this machine: the book must build and test offline. A blocked
attempt raises ``OSError`` and is also appended to ``$NETGUARD_LOG``, so CI fails even when a
library catches the error and carries on quietly.
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


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
